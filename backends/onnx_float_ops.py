"""Float ONNX lowerings of the activations and elementwise ops between int8 layers.

The direct int8 lowering (``onnx_int8``) writes conv, linear, add, pooling, reshapes and ReLU on
uint8 itself; what runs in float between them (SiLU, GELU, LeakyReLU, the squeeze-excitation
product ``x * sigmoid(gate)``, ``x.mean((2, 3), keepdim=True)``, arithmetic with constants, split and
chunk, LayerNorm) is
written here in standard ONNX ops, so the CNNs of timm and torchvision (EfficientNet, MobileNet,
RegNet, CSPNet, ...) lower op by op instead of going through torch.onnx. Each rule returns the
name of its output, or None when the node is not one it knows.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np
import torch
from onnx import helper
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_BINARY = [(_MUL, "Mul"), (_ADD, "Add"), (_SUB, "Sub"), (_DIV, "Div")]


def _target(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _is(node: fx.Node, module: nn.Module | None, types: tuple, functions: tuple = (), methods: tuple = ()) -> bool:
    return (module is not None and isinstance(module, types)) or \
        (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


def _gelu(lowering, x: str, approximate: str) -> str:
    half_x = lowering.emit("Mul", [x, lowering.const("half", np.array(0.5, np.float32))], "gelu_half")
    if approximate == "tanh":
        cube = lowering.emit("Mul", [x, lowering.emit("Mul", [x, x], "gelu_sq")], "gelu_cube")
        inner = lowering.emit("Add", [x, lowering.emit("Mul", [cube, lowering.const("c", np.array(0.044715, np.float32))],
                                                       "gelu_c")], "gelu_inner")
        scaled = lowering.emit("Mul", [inner, lowering.const("k", np.array(math.sqrt(2 / math.pi), np.float32))],
                               "gelu_k")
        curve = lowering.emit("Tanh", [scaled], "gelu_tanh")
    else:
        curve = lowering.emit("Erf", [lowering.emit("Div", [x, lowering.const("sqrt2", np.array(math.sqrt(2), np.float32))],
                                                    "gelu_div")], "gelu_erf")
    one_plus = lowering.emit("Add", [curve, lowering.const("one", np.array(1.0, np.float32))], "gelu_add")
    return lowering.emit("Mul", [half_x, one_plus], "gelu")


def activation(lowering, node: fx.Node, m: nn.Module | None) -> str | None:
    """Single-input activations: SiLU, GELU, LeakyReLU, ELU, Hardsigmoid, Mish, Softplus, and the
    sigmoid/tanh/relu tensor methods."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return None
    if _is(node, m, (nn.SiLU,), (F.silu,), ("silu", "silu_")):
        xf = lowering.as_float(x)
        return lowering.emit("Mul", [xf, lowering.emit("Sigmoid", [xf], "silu_gate")], "silu")
    if _is(node, m, (nn.GELU,), (F.gelu,)):
        approximate = m.approximate if m is not None else node.kwargs.get("approximate", "none")
        return _gelu(lowering, lowering.as_float(x), approximate)
    if _is(node, m, (nn.LeakyReLU,), (F.leaky_relu,)):
        slope = m.negative_slope if m is not None else (node.args[1] if len(node.args) > 1
                                                         else node.kwargs.get("negative_slope", 0.01))
        return lowering.emit("LeakyRelu", [lowering.as_float(x)], "leaky_relu", alpha=float(slope))
    if _is(node, m, (nn.ELU,)) or (node.op == "call_function" and node.target is F.elu and len(node.args) == 1):
        alpha = m.alpha if m is not None else node.kwargs.get("alpha", 1.0)
        return lowering.emit("Elu", [lowering.as_float(x)], "elu", alpha=float(alpha))
    if _is(node, m, (nn.Hardsigmoid,), (F.hardsigmoid,)):
        return lowering.emit("HardSigmoid", [lowering.as_float(x)], "hardsigmoid", alpha=1 / 6, beta=0.5)
    if _is(node, m, (nn.Mish,), (F.mish,)):
        return lowering.emit("Mish", [lowering.as_float(x)], "mish")
    if (m is not None and isinstance(m, nn.Softplus) and m.beta == 1) or \
            (node.op == "call_function" and node.target is F.softplus and len(node.args) == 1 and not node.kwargs):
        return lowering.emit("Softplus", [lowering.as_float(x)], "softplus")
    for methods, op in ((("sigmoid", "sigmoid_"), "Sigmoid"), (("tanh", "tanh_"), "Tanh"), (("relu", "relu_"), "Relu")):
        if node.op == "call_method" and node.target in methods and len(node.args) == 1:
            return lowering.emit(op, [lowering.as_float(x)], op.lower())
    return None


def _operand(lowering, value: Any) -> str | None:
    if isinstance(value, fx.Node):
        return lowering.as_float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lowering.const("scalar", np.array(value, np.float32))
    return None


def elementwise(lowering, node: fx.Node) -> str | None:
    """Binary arithmetic on float values (either operand a tensor or a Python number), negation,
    and means over axes: ``x * gate``, ``x / 6``, ``1 - x``, ``x.mean((2, 3), keepdim=True)``."""
    target = _target(node)
    if target is None or node.kwargs and target not in (torch.mean, "mean"):
        return None
    try:
        hash(target)
    except TypeError:
        return None
    for names, op in _BINARY:
        if target in names and len(node.args) == 2:
            a, b = (_operand(lowering, v) for v in node.args)
            if a is None or b is None or not any(isinstance(v, fx.Node) for v in node.args):
                return None
            return lowering.emit(op, [a, b], op.lower())
    if target in (operator.neg, torch.neg, "neg") and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
        return lowering.emit("Neg", [lowering.as_float(node.args[0])], "neg")
    if target in (torch.mean, "mean") and isinstance(node.args[0], fx.Node):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        extra = set(node.kwargs) - {"dim", "keepdim"}
        if dims is None or extra or not isinstance(keepdim, bool):
            return None
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        axes = lowering.const("axes", np.array(dims, np.int64))
        return lowering.emit("ReduceMean", [lowering.as_float(node.args[0]), axes], "mean", keepdims=int(keepdim))
    return None


def layer_norm(lowering, node: fx.Node, m: nn.Module | None) -> str | None:
    """``nn.LayerNorm`` as LayerNormalization over its last axes."""
    if not isinstance(m, nn.LayerNorm) or not isinstance(node.args[0], fx.Node) or len(node.args) != 1:
        return None
    weight = m.weight.detach().numpy() if m.weight is not None else np.ones(m.normalized_shape, np.float32)
    inputs = [lowering.as_float(node.args[0]), lowering.const("ln_weight", weight)]
    if m.bias is not None:
        inputs.append(lowering.const("ln_bias", m.bias.detach().numpy()))
    return lowering.emit("LayerNormalization", inputs, "layer_norm", axis=-len(m.normalized_shape),
                         epsilon=float(m.eps))


_SPLITS = {torch.split, torch.chunk, "split", "chunk"}


def split(lowering, node: fx.Node) -> str | None:
    """split/chunk along one axis as an ONNX Split (sizes from the traced shapes); the outputs are
    taken apart by the ``getitem`` nodes after it."""
    target = _target(node)
    try:
        if target not in _SPLITS or not isinstance(node.args[0], fx.Node):
            return None
    except TypeError:
        return None
    shapes = lowering.graph.shape(node)
    rank = len(lowering.graph.shape(node.args[0]))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int) or not isinstance(shapes, tuple) or not all(isinstance(t, tuple) for t in shapes):
        return None
    dim %= rank
    sizes = lowering.const("split", np.array([t[dim] for t in shapes], np.int64))
    outs = [lowering.fresh("split") for _ in shapes]
    lowering.nodes.append(helper.make_node("Split", [lowering.as_float(node.args[0]), sizes], outs,
                                           name=outs[0], axis=dim))
    parts = getattr(lowering, "split_outputs", None)
    if parts is None:
        parts = lowering.split_outputs = {}
    parts[node.name] = outs
    return outs[0]


def item(lowering, node: fx.Node) -> str | None:
    """``parts[i]`` of a lowered split."""
    parts = getattr(lowering, "split_outputs", {})
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].name in parts and isinstance(node.args[1], int):
        return parts[node.args[0].name][node.args[1]]
    return None


RULES: list[Callable] = [lambda lowering, node, m: activation(lowering, node, m),
                         layer_norm,
                         lambda lowering, node, m: elementwise(lowering, node) if m is None else None,
                         lambda lowering, node, m: split(lowering, node) if m is None else None,
                         lambda lowering, node, m: item(lowering, node) if m is None else None]


def lower(lowering, node: fx.Node, m: nn.Module | None) -> str | None:
    """The ONNX output of ``node`` in float, or None when no rule here knows it."""
    for rule in RULES:
        out = rule(lowering, node, m)
        if out is not None:
            return out
    return None
