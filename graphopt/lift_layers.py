"""Turn functional layer calls on graph constants back into ``call_module`` layers.

torch.export hands back ``aten.linear(x, self.a.b.weight, self.a.b.bias)`` where torch.fx
would have kept ``call_module a.b``. Every weight-editing pass (pruning, low-rank, QDQ)
matches layers as modules, so both capture paths are brought to one IR here: each
``linear``/``conv2d``/``layer_norm``/``embedding`` whose weight (and bias) are parameters read
by that call alone becomes a call to an ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm``/
``nn.Embedding`` that holds the very same Parameter objects, at the module path the weight
came from. Eval-mode dropout (``train=False``) is an identity and is removed, as are torch.export's
``_assert_tensor_metadata`` checks (nothing uses their result).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import fx

from graphopt.ir import owner_and_leaf

aten = torch.ops.aten


def _param_of(gm: fx.GraphModule, node, only_user: fx.Node) -> tuple[str, nn.Parameter] | None:
    """(qualname, Parameter) when ``node`` is a get_attr of a Parameter read only by ``only_user``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or set(node.users) != {only_user}:
        return None
    value = getattr(*owner_and_leaf(gm, node.target), None)
    return (node.target, value) if isinstance(value, nn.Parameter) else None


def _linear(args, kwargs, weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    return layer, (args[0],)


def _conv2d(args, kwargs, weight, bias):
    stride, padding, dilation, groups = (list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]):])
    if isinstance(padding, str):
        return None
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                      padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta")
    return layer, (args[0],)


def _layer_norm(args, kwargs, weight, bias):
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    layer = nn.LayerNorm(list(args[1]), eps=eps, elementwise_affine=True, bias=bias is not None, device="meta")
    return layer, (args[0],)


def _embedding(args, kwargs, weight, bias):
    if len(args) > 3 and (args[3] or (len(args) > 4 and args[4])):  # scale_grad / sparse: keep as is
        return None
    padding_idx = args[2] if len(args) > 2 and args[2] != -1 else None
    layer = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, device="meta")
    return layer, (args[1],)


# op -> (index of weight, index of bias or None, module builder)
_LIFTERS: dict[object, tuple[int, int | None, Callable]] = {
    aten.linear.default: (1, 2, _linear),
    aten.conv2d.default: (1, 2, _conv2d),
    aten.layer_norm.default: (2, 3, _layer_norm),
    aten.embedding.default: (0, None, _embedding),
}


def _free_name(gm: fx.GraphModule, wanted: str) -> str:
    """``wanted`` if that path is free or an emptied holder of parameters, else ``wanted_1``, ..."""
    name, i = wanted, 0
    while True:
        try:
            existing = gm.get_submodule(name)
        except AttributeError:
            return name
        if type(existing) is nn.Module and not existing._modules and not existing._parameters \
                and not existing._buffers:
            return name
        i += 1
        name = f"{wanted}_{i}"


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (replacing the emptied holder that may be there)."""
    owner, leaf = owner_and_leaf(gm, path)
    owner.add_module(leaf, module)


def _drop_eval_dropout(gm: fx.GraphModule) -> int:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.dropout.default and len(node.args) > 2 \
                and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def _drop_metadata_asserts(gm: fx.GraphModule) -> int:
    """torch.export records a ``.to(dtype)`` as a cast plus ``aten._assert_tensor_metadata``, a
    check on a traced value's dtype that returns nothing; it holds by construction in the captured
    graph, and left in, it is an op of unknown kind on every channel it touches."""
    target = getattr(aten, "_assert_tensor_metadata", None)
    dropped = 0
    for node in list(gm.graph.nodes):
        if target is not None and node.op == "call_function" and node.target is target.default and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def lift_functional_layers(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite ``gm`` in place; returns how many of each op became a module."""
    lifted: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        spec = _LIFTERS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        w_index, b_index, build = spec
        args = list(node.args)
        weight = _param_of(gm, args[w_index], node) if w_index < len(args) else None
        bias_node = args[b_index] if b_index is not None and b_index < len(args) else None
        bias = _param_of(gm, bias_node, node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            continue
        built = build(args, node.kwargs, weight[1], bias)
        if built is None:
            continue
        module, call_args = built
        module.weight = weight[1]
        if bias is not None:
            module.bias = bias[1]
        for qualname, _ in (weight, bias) if bias is not None else (weight,):
            holder, leaf = owner_and_leaf(gm, qualname)
            holder._parameters.pop(leaf, None)
        path = _free_name(gm, weight[0].rpartition(".")[0] or f"lifted_{node.name}")
        _install(gm, path, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, tuple(call_args))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in (args[w_index], bias_node):
            if isinstance(attr, fx.Node) and not attr.users:
                gm.graph.erase_node(attr)
        key = str(node.target).split(".")[1]
        lifted[key] = lifted.get(key, 0) + 1
    dropped = _drop_eval_dropout(gm)
    if dropped:
        lifted["dropout_removed"] = dropped
    asserts = _drop_metadata_asserts(gm)
    if asserts:
        lifted["metadata_asserts_removed"] = asserts
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted
