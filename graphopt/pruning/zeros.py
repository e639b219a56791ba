"""Which tensors are zero in every removed channel of the masked original.

The masked original (the pruning oracle) zeroes the producers of a group's removed channels
when some op needs them to be zeros: a LayerNorm over a residual stream, a mean over the
channels (RMSNorm, global response norm). Such an op is rewritten to count the removed channels
as the zeros they are, which is exact only if nothing between the producers and the op turns a
zero into something else (``x + 1``, a sigmoid, a LayerNorm without weights). This walk proves
it, node by node in graph order; anything it does not know is not proven."""
from __future__ import annotations

from numbers import Number
from typing import Any

import torch.nn as nn
from torch import fx

from graphopt.modules import PrunedLayerNorm
from graphopt.ops import op_name
from graphopt.pruning.groups import ParamRef
from graphopt.pruning.spaces import Layout

# f(0) = 0 for one tensor operand (the first)
_UNARY = {"relu", "relu_", "gelu", "silu", "silu_", "tanh", "hardswish", "leaky_relu", "neg", "abs", "square",
          "view", "reshape", "_unsafe_view", "permute", "transpose", "contiguous", "flatten", "unflatten",
          "unsqueeze", "squeeze", "clone", "dropout", "to", "type_as", "expand", "norm", "linalg_vector_norm",
          "sum", "mean", "alias", "detach", "getitem", "__getitem__", "select", "slice", "dropout_"}
_ZERO_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.ReLU,
                 nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.Dropout)


def keeps_zeros(values: dict[fx.Node, Any], zeros: dict[fx.Node, bool], modules: dict[str, nn.Module],
                node: fx.Node) -> bool:
    """Whether ``node``'s tracked channels are zero where their producers are zeroed, given the
    answer for every node before it (``zeros``)."""
    if not isinstance(values.get(node), Layout):
        return False
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.LayerNorm, PrunedLayerNorm)):   # its weight and bias are zeroed too
            return module.weight is not None and module.bias is not None
        return isinstance(module, _ZERO_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    name = op_name(node)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if name in ("mul", "mul_"):                                      # 0 * anything
        return any(zeros.get(a, False) for a in tensors)
    if name in ("div", "div_", "truediv"):
        return bool(tensors) and tensors[0] is node.args[0] and zeros.get(tensors[0], False)
    if name in ("add", "add_", "sub", "sub_"):
        numbers = [a for a in node.args if isinstance(a, Number)]
        return not numbers and all(zeros.get(a, False) or isinstance(values.get(a), ParamRef) for a in tensors)
    if name == "addcmul":                                          # input + t1 * t2
        zero = [zeros.get(a, False) or isinstance(values.get(a), ParamRef) if isinstance(a, fx.Node) else False
                for a in node.args[:3]]
        return len(zero) == 3 and zero[0] and (zero[1] or zero[2])
    if name == "pow":
        exponent = node.args[1] if len(node.args) > 1 else None
        return isinstance(exponent, Number) and exponent > 0 and zeros.get(node.args[0], False)
    if name in _UNARY:
        return bool(tensors) and tensors[0] is node.args[0] and zeros.get(tensors[0], False)
    return False
