"""Quantization parameters and the int8 arithmetic every quantization pass and backend shares.

The IR keeps quantization explicit and executable (the simulated-quant graph is the numeric
reference for every backend):

- an activation quantized per tensor is a ``torch.fake_quantize_per_tensor_affine`` node whose
  ``node.meta[QPARAMS_KEY]`` holds its ``QParams`` (uint8 affine by default);
- a weight quantized per output channel is, after ``insert_qdq``, a
  ``torch.fake_quantize_per_channel_affine`` node over the float weight and, after
  ``fold_qdq``, an int8 constant read through ``dequantize_per_channel`` (bit-identical).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.ops import OpKind
from graphopt.quant.targets import TARGET_KEY, TARGETS, Target, get_target

if TYPE_CHECKING:
    from graphopt.ir import Graph

QPARAMS_KEY = "graphopt.qparams"      # QParams of a fake-quant node
FUSED_KEY = "graphopt.fused"          # activations a conv/linear/add absorbed (names, for reports)
FLOAT_REASON_KEY = "graphopt.float"   # why a conv/linear stayed float (mixed precision, no kernel, ...)

_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # full-range default: symmetric, restricted (no -128), zero point 0


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine parameters: real = (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    dtype: str = "uint8"

    @property
    def qmin(self) -> int:
        return _RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return _RANGES[self.dtype][1]

    @property
    def real_range(self) -> tuple[float, float]:
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale


def affine_qparams(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Parameters covering [lo, hi] (widened to include 0, so zero is exact).

    The caller handles a zero range (all-zero activations): there is no scale to pick."""
    if dtype not in _RANGES:
        raise ValueError(f"activation dtype must be one of {', '.join(_RANGES)}, got {dtype!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = _RANGES[dtype]
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0:
        raise ValueError("zero range")
    zero_point = int(min(qmax, max(qmin, round(qmin - lo / scale))))
    # float32 round trip so the graph and every backend use the same scale
    return QParams(float(torch.tensor(scale, dtype=torch.float32)), zero_point, dtype)


def weight_scales(weight: torch.Tensor, axis: int = 0, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Per-channel symmetric scales (float32) along ``axis`` for codes in [-qmax, qmax] (the
    target's weight range); all-zero channels get scale 1."""
    dims = [d for d in range(weight.dim()) if d != axis]
    amax = weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()
    scales = (amax / qmax).float()
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def fake_quantize_weight(weight: torch.Tensor, scales: torch.Tensor, axis: int = 0, qmin: int = WEIGHT_QMIN,
                         qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    zeros = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scales, zeros, axis, qmin, qmax)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, axis: int = 0, qmin: int = WEIGHT_QMIN,
                    qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """The int8 codes of ``fake_quantize_weight`` (same rounding, so dequantizing is bit-exact)."""
    shape = [1] * weight.dim()
    shape[axis] = -1
    fq = fake_quantize_weight(weight, scales, axis, qmin, qmax)
    return torch.round(fq / scales.view(shape)).to(torch.int8)


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """Float weight from int8 codes (the folded IR's weight read)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.to(torch.float32) * scales.view(shape)


# -- recognising quantization nodes in the IR -------------------------------------------
def is_activation_fq(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.fake_quantize_per_tensor_affine


def is_weight_fq(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.fake_quantize_per_channel_affine


def is_weight_dq(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is dequantize_per_channel


def qparams(node: fx.Node) -> QParams | None:
    return node.meta.get(QPARAMS_KEY) if isinstance(node, fx.Node) else None


def make_fq_args(x: fx.Node, qp: QParams) -> tuple:
    return (x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)


_CLAMP_MODULES = {nn.ReLU: (0.0, float("inf")), nn.ReLU6: (0.0, 6.0)}
_CLAMP_FUNCS = {F.relu: (0.0, float("inf")), torch.relu: (0.0, float("inf")), F.relu6: (0.0, 6.0)}
_GRID_KINDS = {OpKind.RESHAPE, OpKind.IDENTITY, OpKind.PERMUTE}
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d}


def clamp_bounds(graph: Graph, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) of a clamping activation (ReLU, ReLU6, Hardtanh, as module, function or method),
    None if the node is not one: the one place the quantization passes and backends read them."""
    if node.op == "call_module":
        m = graph.module(node)
        if isinstance(m, nn.Hardtanh):          # ReLU6 is a Hardtanh(0, 6)
            return float(m.min_val), float(m.max_val)
        return _CLAMP_MODULES.get(type(m))
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return float(lo), float(hi)
    if node.op == "call_function" and node.target in _CLAMP_FUNCS:
        return _CLAMP_FUNCS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, float("inf")
    return None


def is_zero_clamp(graph: Graph, node: fx.Node) -> bool:
    """An activation whose output is clamp(x, 0, hi): a quantized output with zero point 0 absorbs it."""
    bounds = clamp_bounds(graph, node)
    return bounds is not None and bounds[0] == 0.0


def is_plain_relu(graph: Graph, node: fx.Node) -> bool:
    """max(x, 0): keeps a quantized tensor on its grid (zero is a grid point); ReLU6 does not."""
    return clamp_bounds(graph, node) == (0.0, float("inf"))


def keeps_grid(graph: Graph, node: fx.Node) -> bool:
    """An op whose output values are among its input's (reshapes, permutes, max pooling, ReLU):
    a quantized input stays on the same grid, so it needs no parameters of its own."""
    if graph.kind(node) in _GRID_KINDS or is_plain_relu(graph, node):
        return True
    if node.op == "call_module":
        return isinstance(graph.module(node), MAX_POOLS)
    return node.op == "call_function" and node.target in MAX_POOL_FUNCS


# Functional layers the quantization passes rewrite modules into (and the backends read).
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def quant_target(graph) -> Target:
    """The target a quantized graph was built for (``insert_qdq`` records it); for a graph without
    the record, the narrowest target its int8 weight codes fit (7-bit codes run exactly anywhere)."""
    if TARGET_KEY in graph.meta:
        return get_target(graph.meta[TARGET_KEY])
    widest = max((int(graph.attr(n.args[0].target).abs().max()) for n in graph.nodes
                  if is_weight_dq(n) and n.args[0].op == "get_attr"), default=0)
    return next(t for t in sorted(TARGETS.values(), key=lambda t: t.weight_qmax)
                if t.weight_qmax >= widest and t.arch == "x86")
