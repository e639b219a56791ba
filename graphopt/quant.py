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
from graphopt.targets import TARGET_KEY, TARGETS, Target, get_target

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


# -- checks shared by the int8 backends ---------------------------------------------------
def output_steps(graph) -> list[float | None]:
    """Quantization step of each graph output (None where an output is float)."""
    out = next(n for n in graph.nodes if n.op == "output")
    return [qparams(a).scale if qparams(a) else None for a in flatten_args(out.args[0])]


def flatten_args(value) -> list:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in flatten_args(item)]
    return [value]


def within_one_step(reference, outputs, steps: list[float | None]) -> float:
    """Share of output elements within one quantization step of the reference
    (within 1e-4 of the largest magnitude for a float output)."""
    from graphopt.verify import flatten_outputs

    within = total = 0
    for ref, out, step in zip(flatten_outputs(reference), flatten_outputs(outputs), steps):
        ref, out = ref.detach().double(), out.detach().double()
        tol = step * 1.001 if step else 1e-4 * max(ref.abs().max().item(), 1e-12)
        within += int(((ref - out).abs() <= tol).sum())
        total += ref.numel()
    return within / max(total, 1)


def int8_mac_share(graph, int8_layers: list[str]) -> float:
    """Share of the conv/linear/matmul MACs done by the named (integer-kernel) nodes."""
    from graphopt.ops import OpKind

    cost = graph.analysis("cost")
    macs = {n.name: cost.nodes[n.name].macs for n in graph.nodes
            if graph.kind(n) in (OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL)}
    return sum(macs.get(n, 0) for n in int8_layers) / max(sum(macs.values()), 1)


class _TeacherForced(fx.Interpreter):
    """Runs the simulated-quant graph, but every quantized tensor the artifact also produced is
    replaced by the artifact's value before later nodes read it; records what the graph computed."""

    def __init__(self, gm: fx.GraphModule, forced: dict):
        super().__init__(gm)
        self.forced, self.computed = forced, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.forced:
            self.computed[n.name] = value
            return self.forced[n.name].to(value.dtype)
        return value


def layerwise_within_one_step(graph, inputs: tuple, artifact: dict[str, torch.Tensor]) -> tuple[float, str | None]:
    """Share of quantized elements the artifact computes within one step of the simulated-quant
    graph, each layer fed the artifact's own inputs (so rounding differences do not compound
    through depth); also the node with the most elements off by more than a step."""
    interpreter = _TeacherForced(graph.gm, artifact)
    with torch.no_grad():
        interpreter.run(*inputs)
    within = total = 0
    worst, worst_count = None, 0
    nodes = {n.name: n for n in graph.nodes}
    for name, ref in interpreter.computed.items():
        step = qparams(nodes[name]).scale * 1.001
        off = int(((ref.double() - artifact[name].double()).abs() > step).sum())
        within += ref.numel() - off
        total += ref.numel()
        if off > worst_count:
            worst, worst_count = name, off
    return within / max(total, 1), worst


def gather_int8_rows(graph) -> int:
    """Rewrite ``F.embedding(ids, dequantize_per_channel(q, s, 1))`` as ``embedding(ids, q) * s``:
    the backends then gather int8 rows and dequantize only those, instead of the whole table on
    every run. Bit-identical (per-column scales survive the row gather). Returns how many."""
    g = graph.gm.graph
    count = 0
    for node in list(g.nodes):
        if not (node.op == "call_function" and node.target is F.embedding and len(node.args) >= 2
                and is_weight_dq(node.args[1]) and node.args[1].args[2] == 1 and len(node.args[1].users) == 1):
            continue
        dq = node.args[1]
        codes, scales, _ = dq.args
        last = len(graph.shape(node)) - 1
        with g.inserting_before(node):
            rows = g.call_function(F.embedding, (node.args[0], codes, *node.args[2:]), dict(node.kwargs))
            value = g.call_function(dequantize_per_channel, (rows, scales, last))
        value.meta.update(node.meta)
        node.replace_all_uses_with(value)
        g.erase_node(node)
        g.erase_node(dq)
        count += 1
    if count:
        graph.commit()
    return count


def quant_target(graph) -> Target:
    """The target a quantized graph was built for (``insert_qdq`` records it); for a graph without
    the record, the narrowest target its int8 weight codes fit (7-bit codes run exactly anywhere)."""
    if TARGET_KEY in graph.meta:
        return get_target(graph.meta[TARGET_KEY])
    widest = max((int(graph.attr(n.args[0].target).abs().max()) for n in graph.nodes
                  if is_weight_dq(n) and n.args[0].op == "get_attr"), default=0)
    return next(t for t in sorted(TARGETS.values(), key=lambda t: t.weight_qmax)
                if t.weight_qmax >= widest and t.arch == "x86")
