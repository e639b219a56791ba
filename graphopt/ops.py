"""The op vocabulary: every IR node is classified into one ``OpKind``.

Passes match on kinds rather than on torch types, so one table here decides what a
"conv" or a "reshape" is for the whole framework. Anything not listed is ``UNKNOWN``:
analyses must treat unknown ops conservatively, never as elementwise.
"""
from __future__ import annotations

import enum
import operator
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx


from graphopt.modules import PrunedLayerNorm, PrunedMultiheadAttention


class OpKind(str, enum.Enum):
    INPUT = "input"
    OUTPUT = "output"
    CONSTANT = "constant"
    CONV = "conv"
    LINEAR = "linear"
    NORM = "norm"
    ACTIVATION = "activation"
    ELEMENTWISE = "elementwise"
    CONCAT = "concat"
    SPLIT = "split"
    INDEX = "index"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    POOL = "pool"
    MATMUL = "matmul"
    ATTENTION = "attention"
    SOFTMAX = "softmax"
    REDUCE = "reduce"
    EMBEDDING = "embedding"
    IDENTITY = "identity"
    SHAPE = "shape"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    UNKNOWN = "unknown"


_MODULE_KINDS: list[tuple[tuple[type, ...], OpKind]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), OpKind.CONV),
    ((nn.Linear, nn.Bilinear), OpKind.LINEAR),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
      nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, PrunedLayerNorm), OpKind.NORM),
    ((nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
      nn.LeakyReLU, nn.ELU, nn.PReLU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU), OpKind.ACTIVATION),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
      nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), OpKind.POOL),
    ((nn.MultiheadAttention, PrunedMultiheadAttention), OpKind.ATTENTION),
    ((nn.Softmax, nn.LogSoftmax), OpKind.SOFTMAX),
    ((nn.Embedding, nn.EmbeddingBag), OpKind.EMBEDDING),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity), OpKind.IDENTITY),
    ((nn.Flatten, nn.Unflatten), OpKind.RESHAPE),
]

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp,
    torch.sqrt, torch.rsqrt, torch.pow, operator.pow, torch.clamp, torch.where,
}
_ACTIVATION_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
    F.softplus, F.hardtanh, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_FUNCTION_KINDS: dict[Callable, OpKind] = {
    **{f: OpKind.ELEMENTWISE for f in _ELEMENTWISE_FUNCS},
    **{f: OpKind.ACTIVATION for f in _ACTIVATION_FUNCS},
    F.conv1d: OpKind.CONV, F.conv2d: OpKind.CONV, F.conv3d: OpKind.CONV,
    F.linear: OpKind.LINEAR,
    F.batch_norm: OpKind.NORM, F.layer_norm: OpKind.NORM, F.group_norm: OpKind.NORM,
    F.instance_norm: OpKind.NORM,
    torch.cat: OpKind.CONCAT, torch.concat: OpKind.CONCAT, torch.stack: OpKind.CONCAT,
    torch.split: OpKind.SPLIT, torch.chunk: OpKind.SPLIT, torch.unbind: OpKind.SPLIT,
    operator.getitem: OpKind.INDEX, torch.narrow: OpKind.INDEX,
    torch.flatten: OpKind.RESHAPE, torch.reshape: OpKind.RESHAPE, torch.broadcast_to: OpKind.RESHAPE,
    torch.squeeze: OpKind.RESHAPE, torch.unsqueeze: OpKind.RESHAPE,
    torch.permute: OpKind.PERMUTE, torch.transpose: OpKind.PERMUTE, torch.swapaxes: OpKind.PERMUTE,
    torch.swapdims: OpKind.PERMUTE,
    F.max_pool1d: OpKind.POOL, F.max_pool2d: OpKind.POOL, F.avg_pool1d: OpKind.POOL,
    F.avg_pool2d: OpKind.POOL, F.adaptive_avg_pool1d: OpKind.POOL, F.adaptive_avg_pool2d: OpKind.POOL,
    F.adaptive_max_pool2d: OpKind.POOL,
    torch.matmul: OpKind.MATMUL, operator.matmul: OpKind.MATMUL, torch.bmm: OpKind.MATMUL,
    torch.mm: OpKind.MATMUL, torch.einsum: OpKind.MATMUL, torch.baddbmm: OpKind.MATMUL,
    F.scaled_dot_product_attention: OpKind.ATTENTION,
    F.softmax: OpKind.SOFTMAX, torch.softmax: OpKind.SOFTMAX, F.log_softmax: OpKind.SOFTMAX,
    torch.mean: OpKind.REDUCE, torch.sum: OpKind.REDUCE, torch.amax: OpKind.REDUCE,
    torch.norm: OpKind.REDUCE, torch.linalg.vector_norm: OpKind.REDUCE,
    torch.addcmul: OpKind.ELEMENTWISE,
    F.embedding: OpKind.EMBEDDING,
    getattr: OpKind.SHAPE,
    torch.quantize_per_tensor: OpKind.QUANTIZE, torch.quantize_per_channel: OpKind.QUANTIZE,
    torch.dequantize: OpKind.DEQUANTIZE,
    torch.fake_quantize_per_tensor_affine: OpKind.QUANTIZE,
    torch.fake_quantize_per_channel_affine: OpKind.QUANTIZE,
}
_METHOD_KINDS: dict[str, OpKind] = {
    **{m: OpKind.ELEMENTWISE for m in ("add", "add_", "sub", "mul", "mul_", "div", "neg", "abs",
                                         "exp", "sqrt", "rsqrt", "pow", "clamp", "masked_fill", "addcmul")},
    # dtype/device casts: the same values per channel in another type
    **{m: OpKind.ELEMENTWISE for m in ("to", "float", "half", "double", "bfloat16", "type_as")},
    **{m: OpKind.ACTIVATION for m in ("relu", "relu_", "sigmoid", "tanh", "sigmoid_")},
    **{m: OpKind.RESHAPE for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "expand", "broadcast_to",
                                     "contiguous", "unflatten", "expand_as", "reshape_as", "view_as")},
    **{m: OpKind.PERMUTE for m in ("permute", "transpose", "swapaxes", "swapdims")},
    **{m: OpKind.SPLIT for m in ("split", "chunk", "unbind", "tensor_split")},
    **{m: OpKind.REDUCE for m in ("mean", "sum", "amax", "max", "min", "norm")},
    **{m: OpKind.SHAPE for m in ("size", "dim")},
    "matmul": OpKind.MATMUL, "bmm": OpKind.MATMUL,
    "softmax": OpKind.SOFTMAX, "narrow": OpKind.INDEX,
    "dequantize": OpKind.DEQUANTIZE,
}
# torch.export graphs carry aten overloads; classify them by their packet name.
_ATEN_KINDS: dict[str, OpKind] = {
    "convolution": OpKind.CONV, "conv2d": OpKind.CONV, "conv1d": OpKind.CONV,
    "linear": OpKind.LINEAR, "addmm": OpKind.LINEAR,
    "_native_batch_norm_legit_no_training": OpKind.NORM, "batch_norm": OpKind.NORM,
    "layer_norm": OpKind.NORM, "native_layer_norm": OpKind.NORM, "group_norm": OpKind.NORM,
    # activations, and their in-place forms (torch.export keeps ``inplace=True`` layers as ``silu_`` ...)
    **{f"{name}{suffix}": OpKind.ACTIVATION
       for name in ("relu", "relu6", "gelu", "silu", "sigmoid", "hardtanh", "hardswish", "hardsigmoid", "tanh",
                    "leaky_relu", "elu", "celu", "selu", "mish", "softplus")
       for suffix in ("", "_")},
    **{name: OpKind.ELEMENTWISE for name in (
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
        "reciprocal", "pow", "square", "erf", "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "maximum",
        "minimum", "rsub", "addcmul")},
    "cat": OpKind.CONCAT, "stack": OpKind.CONCAT, "split": OpKind.SPLIT, "split_with_sizes": OpKind.SPLIT,
    "chunk": OpKind.SPLIT, "unbind": OpKind.SPLIT, "getitem": OpKind.INDEX, "slice": OpKind.INDEX, "select": OpKind.INDEX,
    "narrow": OpKind.INDEX,
    "view": OpKind.RESHAPE, "reshape": OpKind.RESHAPE, "flatten": OpKind.RESHAPE,
    "unsqueeze": OpKind.RESHAPE, "squeeze": OpKind.RESHAPE, "expand": OpKind.RESHAPE, "unflatten": OpKind.RESHAPE,
    "broadcast_to": OpKind.RESHAPE,
    "expand_as": OpKind.RESHAPE, "reshape_as": OpKind.RESHAPE, "view_as": OpKind.RESHAPE,
    "permute": OpKind.PERMUTE, "transpose": OpKind.PERMUTE, "t": OpKind.PERMUTE,
    "max_pool2d": OpKind.POOL, "avg_pool2d": OpKind.POOL, "adaptive_avg_pool2d": OpKind.POOL,
    "mean": OpKind.REDUCE, "sum": OpKind.REDUCE, "linalg_vector_norm": OpKind.REDUCE,
    "matmul": OpKind.MATMUL, "mm": OpKind.MATMUL, "bmm": OpKind.MATMUL,
    "softmax": OpKind.SOFTMAX, "_softmax": OpKind.SOFTMAX,
    "scaled_dot_product_attention": OpKind.ATTENTION,
    "embedding": OpKind.EMBEDDING, "dropout": OpKind.IDENTITY, "clone": OpKind.IDENTITY, "alias": OpKind.IDENTITY,
    "_to_copy": OpKind.ELEMENTWISE, "to": OpKind.ELEMENTWISE, "type_as": OpKind.ELEMENTWISE,
    "contiguous": OpKind.RESHAPE,
}


# Kinds users registered (register_op_kind); their module types are also traced as leaves.
_USER_MODULE_KINDS: dict[type, OpKind] = {}
_USER_FUNCTIONS: list[Callable] = []


def register_op_kind(kind: OpKind | str, *, module: type | tuple[type, ...] = (), function: Callable | tuple = (),
                     method: str | tuple[str, ...] = (), aten: str | tuple[str, ...] = ()) -> None:
    """Teach graphopt what kind of op a user's layer, function, tensor method or aten op is.
    A module type registered here is also kept whole when torch.fx traces a model (a leaf, as
    torch.nn's layers are), so a layer fx cannot trace through still traces, and so is a call
    to a registered module-level Python function; a channel rule
    (``graphopt.pruning.channel_rule``) then says how it moves channels. Giving a key a second,
    different kind is refused."""
    from graphopt.errors import GraphoptError

    kind = OpKind(kind)
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    tables = [(_USER_MODULE_KINDS, m, f"module {getattr(m, '__qualname__', m)}") for m in as_tuple(module)]
    tables += [(_FUNCTION_KINDS, f, f"function {getattr(f, '__qualname__', f)}") for f in as_tuple(function)]
    tables += [(_METHOD_KINDS, m, f"method {m!r}") for m in as_tuple(method)]
    tables += [(_ATEN_KINDS, a, f"aten op {a!r}") for a in as_tuple(aten)]
    if not tables:
        raise GraphoptError("register_op_kind needs module=, function=, method= or aten=")
    for table, key, what in tables:
        if table is _USER_MODULE_KINDS and not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise GraphoptError(f"register_op_kind(module=...) takes nn.Module classes, got {key!r}")
        if table.get(key, kind) != kind:
            raise GraphoptError(f"{what} is already of kind {table[key].value!r}, not {kind.value!r}")
    for table, key, _ in tables:
        table[key] = kind
        if table is _FUNCTION_KINDS and not isinstance(key, torch._ops.OpOverload) and hasattr(key, "__code__"):
            _USER_FUNCTIONS.append(key)


def registered_functions() -> tuple[Callable, ...]:
    """Plain Python functions users registered: torch.fx keeps calls to them whole (autowrap)."""
    return tuple(f for f in _USER_FUNCTIONS)


def is_registered_layer(module: nn.Module) -> bool:
    """Whether a user registered ``module``'s type (or a base of it) with ``register_op_kind``."""
    return any(cls in _USER_MODULE_KINDS for cls in type(module).__mro__)


def module_kind(module: nn.Module) -> OpKind:
    """Kind of a leaf module, by type (subclasses of a listed type count; a user's registration
    first, the most derived type winning)."""
    for cls in type(module).__mro__:
        if cls in _USER_MODULE_KINDS:
            return _USER_MODULE_KINDS[cls]
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return OpKind.UNKNOWN


def op_name(node: fx.Node) -> str:
    """The op a node calls, by name: ``linear`` for torch.export's ``aten.linear.default``, the
    method name for ``call_method``, the function's or the module path otherwise."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


# Functions that are the identity unless their ``training`` argument (at this position;
# default True) is set: dropout, and torchvision's stochastic depth (EfficientNet, ConvNeXt,
# Swin). Called with training=False, as an eval-mode trace records them, they pass values through.
_TRAINING_ARG: dict[Callable, int] = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2,
                                      F.alpha_dropout: 2}


def _training_arg(target) -> int | None:
    """Position of ``target``'s training argument, if it is one of those functions. torchvision
    is looked up only once the model has imported it (importing it here cost graphopt 2 s)."""
    if target in _TRAINING_ARG:
        return _TRAINING_ARG[target]
    ops = sys.modules.get("torchvision.ops")
    return 3 if ops is not None and target is getattr(ops, "stochastic_depth", None) else None


def _training_off(node: fx.Node, index: int) -> bool:
    training = node.kwargs.get("training", node.args[index] if len(node.args) > index else True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
    return training is False or p == 0


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind:
    """Kind of one fx node; ``modules`` is ``dict(graph_module.named_modules())``."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "get_attr":
        return OpKind.CONSTANT
    if node.op == "call_module":
        module = modules.get(node.target)
        return module_kind(module) if module is not None else OpKind.UNKNOWN
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, OpKind.UNKNOWN)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return _ATEN_KINDS.get(op_name(node), OpKind.UNKNOWN)
        try:
            index = _training_arg(target)
            if index is not None:
                return OpKind.IDENTITY if _training_off(node, index) else OpKind.UNKNOWN
            return _FUNCTION_KINDS.get(target, OpKind.UNKNOWN)
        except TypeError:  # unhashable callable
            return OpKind.UNKNOWN
    return OpKind.UNKNOWN
