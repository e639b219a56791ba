"""Turn functional layer calls on graph constants back into ``call_module`` layers.

torch.export hands back ``aten.linear(x, self.a.b.weight, self.a.b.bias)`` where torch.fx
would have kept ``call_module a.b``. Every weight-editing pass (pruning, low-rank, QDQ)
matches layers as modules, so both capture paths are brought to one IR here: each
``linear``/``conv2d``/``layer_norm``/``embedding`` whose weight (and bias) are parameters read
by that call alone becomes a call to an ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm``/
``nn.Embedding`` that holds the very same Parameter objects, at the module path the weight
came from (``group_norm`` too); a layer applied to several tensors (one weight read by several identical calls, as
ALBERT shares its layers) becomes one module called several times. ``addmm(bias, x, W)`` on a
``W`` of shape (in, out) (GPT-2's ``Conv1D``) becomes a Linear holding ``W`` transposed; a linear
whose bias is computed in the graph (BEiT's ``cat(q_bias, k_bias, v_bias)``) becomes a Linear
without bias and an add of that bias. Eval-mode dropout (``train=False``) is an identity and is removed, as are torch.export's
``_assert_tensor_metadata`` checks (nothing uses their result).

Eval-mode batch norm called as a function on a layer's own statistics (``aten.batch_norm`` in an
export graph; ``F.batch_norm`` in a torch.fx graph, as in timm's norm + activation layers such as
``BatchNormAct2d``, which fx traces through) becomes an ``nn.BatchNorm1d/2d/3d`` holding the same
Parameters and running statistics, so BatchNorm folding, pruning and int8 placement see a norm
layer, at the path of the module that made the call where that module held nothing else (its
submodules, such as the activation, move into the BatchNorm): names and state-dict keys stay the
model's.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.ir import owner_and_leaf

aten = torch.ops.aten


def _param_of(gm: fx.GraphModule, node, users: set[fx.Node]) -> tuple[str, nn.Parameter] | None:
    """(qualname, Parameter) when ``node`` is a get_attr of a Parameter read by ``users`` alone."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or set(node.users) != users:
        return None
    value = getattr(*owner_and_leaf(gm, node.target), None)
    return (node.target, value) if isinstance(value, nn.Parameter) else None


def _with_weights(layer: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _linear(args, kwargs, weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    return _with_weights(layer, weight, bias), (args[0],)


def _addmm(args, kwargs, weight, bias):
    """``addmm(bias, x, W)`` with ``W`` of shape (in, out) (Hugging Face's GPT-2 ``Conv1D``): a
    Linear holding ``W`` transposed (a new Parameter; the only lifted layer that is not the
    model's own tensor)."""
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or bias is None or bias.dim() != 1:
        return None
    layer = nn.Linear(weight.shape[0], weight.shape[1], device="meta")
    return _with_weights(layer, nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad), bias), (args[1],)


def _matmul(args, kwargs, weight, bias):
    """``x @ W`` with ``W`` a 2-D parameter of shape (in, out) (Falcon's ``FalconLinear`` computes
    ``x @ self.weight.T``; the transpose is folded first): a Linear holding ``W`` transposed."""
    if weight.dim() != 2 or kwargs:
        return None
    layer = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
    return _with_weights(layer, nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad), None), (args[0],)


def _conv2d(args, kwargs, weight, bias):
    stride, padding, dilation, groups = (list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]):])
    if isinstance(padding, str):
        return None
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                      padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta")
    return _with_weights(layer, weight, bias), (args[0],)


def _layer_norm(args, kwargs, weight, bias):
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    layer = nn.LayerNorm(list(args[1]), eps=eps, elementwise_affine=True, bias=bias is not None, device="meta")
    return _with_weights(layer, weight, bias), (args[0],)


def _group_norm(args, kwargs, weight, bias):
    groups = args[1] if len(args) > 1 else None
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if not isinstance(groups, int) or weight.dim() != 1 or bias is None:
        return None
    layer = nn.GroupNorm(groups, weight.shape[0], eps=eps, device="meta")
    return _with_weights(layer, weight, bias), (args[0],)


def _embedding(args, kwargs, weight, bias):
    if len(args) > 3 and (args[3] or (len(args) > 4 and args[4])):  # scale_grad / sparse: keep as is
        return None
    padding_idx = args[2] if len(args) > 2 and args[2] != -1 else None
    layer = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, device="meta")
    return _with_weights(layer, weight, bias), (args[1],)


_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn_call(node: fx.Node) -> dict | None:
    """The arguments of an eval-mode batch norm call (F.batch_norm or aten.batch_norm), by name;
    None for anything else, or a batch norm in training mode."""
    if node.op != "call_function":
        return None
    if node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    elif node.target is aten.batch_norm.default:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled")
        defaults = {}
    else:
        return None
    call = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    if call.get("training") is not False or not all(k in call for k in names[:5]):
        return None
    return call


def _tensor_of(gm: fx.GraphModule, node, only_user: fx.Node) -> tuple[str, torch.Tensor] | None:
    """(qualname, tensor) when ``node`` is a get_attr of a tensor read only by ``only_user``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or set(node.users) != {only_user}:
        return None
    value = getattr(*owner_and_leaf(gm, node.target), None)
    return (node.target, value) if isinstance(value, torch.Tensor) else None


def _rank(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dim()
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _lift_batch_norm(gm: fx.GraphModule, node: fx.Node, call: dict) -> str | None:
    """Replace one eval-mode batch norm call by an ``nn.BatchNorm*d`` call (see the module
    docstring); the module path, or None where the call is left as it is."""
    stats = [_tensor_of(gm, call[k], node) for k in ("running_mean", "running_var")]
    affine = [_tensor_of(gm, call[k], node) if call[k] is not None else None for k in ("weight", "bias")]
    rank = _rank(call["input"]) if isinstance(call["input"], fx.Node) else None
    if None in stats or rank not in _BATCH_NORMS or (call["weight"] is None) != (call["bias"] is None) \
            or (call["weight"] is not None and (None in affine or not all(isinstance(a[1], nn.Parameter)
                                                                           for a in affine))):
        return None
    read = [t for t in stats + affine if t is not None]
    owners = {name.rpartition(".")[0] for name, _ in read}
    if len(owners) != 1:
        return None
    owner_path = owners.pop()
    norm = _BATCH_NORMS[rank](stats[0][1].shape[0], eps=float(call["eps"]), momentum=call["momentum"],
                              affine=call["weight"] is not None, device="meta")
    for (_, tensor), key in zip(read, ("running_mean", "running_var", "weight", "bias")):
        setattr(norm, key, tensor) if isinstance(tensor, nn.Parameter) else norm.register_buffer(key, tensor)
    norm.num_batches_tracked = torch.zeros((), dtype=torch.long, device=stats[0][1].device)
    norm.train(False)
    for name, _ in read:
        holder, leaf = owner_and_leaf(gm, name)
        holder._parameters.pop(leaf, None)
        holder._buffers.pop(leaf, None)
    owner = gm.get_submodule(owner_path) if owner_path else gm
    counter = owner._buffers.get("num_batches_tracked")
    if isinstance(counter, torch.Tensor) and counter.dim() == 0:   # torch.export keeps every buffer
        norm.num_batches_tracked = owner._buffers.pop("num_batches_tracked")
    # A GraphModule holds what a call reads in plain holder modules. A holder left with nothing but
    # submodules (timm's BatchNormAct2d: its drop and act layers) becomes the BatchNorm, holding them.
    if owner_path and type(owner) is nn.Module and not owner._parameters and not owner._buffers \
            and not any(n.op == "call_module" and n.target == owner_path for n in gm.graph.nodes):
        for name, child in owner.named_children():
            norm.add_module(name, child)
        path = owner_path
    else:
        path = _free_name(gm, owner_path or f"lifted_{node.name}")
    _install(gm, path, norm)
    with gm.graph.inserting_before(node):
        lifted = gm.graph.call_module(path, (call["input"],))
    lifted.meta.update(node.meta)
    node.replace_all_uses_with(lifted)
    gm.graph.erase_node(node)
    for key in ("running_mean", "running_var", "weight", "bias"):
        attr = call[key]
        if isinstance(attr, fx.Node) and not attr.users:
            gm.graph.erase_node(attr)
    return path


# op -> (index of weight, index of bias or None, index of the layer's input, module builder)
_LIFTERS: dict[object, tuple[int, int | None, int, Callable]] = {
    aten.linear.default: (1, 2, 0, _linear),
    aten.addmm.default: (2, 0, 1, _addmm),
    aten.matmul.default: (1, None, 0, _matmul),
    torch.matmul: (1, None, 0, _matmul),
    operator.matmul: (1, None, 0, _matmul),
    aten.conv2d.default: (1, 2, 0, _conv2d),
    aten.layer_norm.default: (2, 3, 0, _layer_norm),
    aten.group_norm.default: (2, 3, 0, _group_norm),
    aten.embedding.default: (0, None, 1, _embedding),
}


# torch.fx graphs record the functions themselves (timm calls F.layer_norm in LayerNorm2d, F.linear
# and F.conv2d in some layers): the same lifting, once their keyword arguments are made positional
_FUNCTIONS = {F.linear: ("input", "weight", "bias"),
              F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
              F.group_norm: ("input", "num_groups", "weight", "bias", "eps")}
_LIFTERS.update({F.linear: _LIFTERS[aten.linear.default], F.conv2d: _LIFTERS[aten.conv2d.default],
                 F.layer_norm: _LIFTERS[aten.layer_norm.default], F.group_norm: _LIFTERS[aten.group_norm.default]})
_DEFAULTS = {"bias": None, "weight": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "eps": 1e-5}


def _positional(node: fx.Node) -> None:
    """Rewrite a call of one of ``_FUNCTIONS`` with positional arguments only (same call)."""
    names = _FUNCTIONS[node.target]
    if not node.kwargs or not set(node.kwargs) <= set(names):
        return
    values = dict(zip(names, node.args)) | dict(node.kwargs)
    last = max(names.index(k) for k in values)
    node.args = tuple(values.get(k, _DEFAULTS.get(k)) for k in names[:last + 1])
    node.kwargs = {}


def _same_layer_calls(node: fx.Node, w_index: int, input_index: int) -> set[fx.Node] | None:
    """Every call reading ``node``'s weight, when all are the same op with the same arguments but
    their input (a layer applied to several tensors, as ALBERT shares its layers): they become
    calls of one module. None when the weight is read any other way (tied embeddings stay functional)."""
    weight = node.args[w_index] if w_index < len(node.args) else None
    if not isinstance(weight, fx.Node):
        return None
    calls = set(weight.users)

    def rest(n: fx.Node) -> tuple:
        return tuple(a for i, a in enumerate(n.args) if i != input_index), tuple(sorted(n.kwargs.items()))

    if not all(c.op == "call_function" and c.target is node.target and len(c.args) == len(node.args)
               and rest(c) == rest(node) for c in calls):
        return None
    return calls


def _free_name(gm: fx.GraphModule, wanted: str) -> str:
    """``wanted`` if that path is free or an emptied holder of parameters (one the graph does
    not call), else ``wanted_1``, ..."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    name, i = wanted, 0
    while True:
        try:
            existing = gm.get_submodule(name)
        except AttributeError:
            return name
        if not existing._modules and not existing._parameters and not existing._buffers and name not in called:
            return name
        i += 1
        name = f"{wanted}_{i}"


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (replacing the emptied holder that may be there)."""
    owner, leaf = owner_and_leaf(gm, path)
    owner.add_module(leaf, module)


def _weight_only_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes computing ``node`` in graph order, when it is computed from the model's own
    parameters and buffers alone (no graph input reaches it) by functions and tensor methods;
    else None."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        if current.op not in ("get_attr", "call_function", "call_method"):
            return None
        seen[current] = None
        stack.extend(current.all_input_nodes)
    if all(n.op == "get_attr" for n in seen):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def fold_weight_computations(gm: fx.GraphModule) -> int:
    """A conv/linear whose weight the model computes from its parameters on every call
    (weight standardisation in timm's ``StdConv2d``/``ScaledStdConv2d`` of the NF-nets,
    ``gain * weight``, reshapes) gets that weight computed once, here, in eval mode: the
    result replaces the weight Parameter at its own path, the layer then lifts like any other,
    and parameters the computation alone read (the gain) leave the model. Exact: eval-mode
    inference computes the very same tensor on every call."""
    folded = 0
    for node in list(gm.graph.nodes):
        spec = _LIFTERS.get(node.target) if node.op == "call_function" else None
        if spec is None or spec[0] >= len(node.args) or not isinstance(node.args[spec[0]], fx.Node):
            continue
        weight_node = node.args[spec[0]]
        if weight_node.op == "get_attr" or len(weight_node.users) != 1:
            continue
        chain = _weight_only_inputs(weight_node)
        if chain is None:
            continue
        params = [n for n in chain if n.op == "get_attr"
                  and isinstance(getattr(*owner_and_leaf(gm, n.target), None), nn.Parameter)]
        source = next((n for n in params if n.target.endswith("weight")), params[0] if params else None)
        if source is None:
            continue
        values: dict[fx.Node, object] = {}
        with torch.no_grad():
            for n in chain:
                if n.op == "get_attr":
                    values[n] = getattr(*owner_and_leaf(gm, n.target))
                    continue
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                values[n] = n.target(*args, **kwargs) if n.op == "call_function" \
                    else getattr(args[0], n.target)(*args[1:], **kwargs)
        value = values[weight_node]
        if not isinstance(value, torch.Tensor):
            continue
        holder, leaf = owner_and_leaf(gm, source.target)
        holder.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad
                                                     or getattr(holder, leaf).requires_grad))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(source.target)
        node.replace_input_with(weight_node, attr)
        for n in reversed(chain):
            if not n.users and n is not source:
                gm.graph.erase_node(n)
        if not source.users:
            gm.graph.erase_node(source)
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for n in params:
            if n.target not in read and n.target != source.target:
                owner, name = owner_and_leaf(gm, n.target)
                owner._parameters.pop(name, None)
        folded += 1
    return folded


def merge_bias_adds(gm: fx.GraphModule) -> int:
    """``linear(x) + b`` with ``b`` a parameter of the layer's width read there alone (a linear
    written as ``x @ W.T + b``) becomes the Linear's own bias: the same sum, and pruning slices
    it with the layer."""
    merged = 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, aten.add.Tensor, torch.add) \
                or len(node.args) != 2 or node.kwargs:
            continue
        layer_node, bias_node = node.args
        if getattr(bias_node, "op", None) == "call_module":
            layer_node, bias_node = bias_node, layer_node
        layer = modules.get(layer_node.target) if getattr(layer_node, "op", None) == "call_module" else None
        if not isinstance(layer, nn.Linear) or layer.bias is not None or len(layer_node.users) != 1 \
                or sum(n.op == "call_module" and n.target == layer_node.target for n in gm.graph.nodes) != 1:
            continue
        bias = _param_of(gm, bias_node, {node})
        if bias is None or bias[1].shape != (layer.out_features,):
            continue
        holder, leaf = owner_and_leaf(gm, bias[0])
        holder._parameters.pop(leaf, None)
        layer.bias = bias[1]
        node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(node)
        gm.graph.erase_node(bias_node)
        home = bias[0].rpartition(".")[0]   # the layer's own path, now that its holder is empty
        if home and layer_node.target != home and _free_name(gm, home) == home:
            _install(gm, home, layer)
            owner, leaf = owner_and_leaf(gm, layer_node.target)
            delattr(owner, leaf)
            layer_node.target = home
        merged += 1
    return merged


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


_RANK_READS = {"ndim", "dim"}
_CONDITION_OPS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
                  operator.or_, operator.not_}


def _reads_rank_only(node) -> bool:
    """Whether ``node`` is computed from tensor ranks and constants alone."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _RANK_READS:
        return True
    if node.op == "call_method" and node.target == "dim":
        return True
    return node.op == "call_function" and node.target in _CONDITION_OPS and all(
        _reads_rank_only(a) for a in node.args)


def drop_rank_asserts(gm: fx.GraphModule) -> int:
    """Remove ``torch._assert`` checks of tensor ranks (timm's norm layers assert ``x.ndim == 4``),
    with the reads they alone used. Every graph graphopt runs keeps its example inputs' ranks
    (batches are checked against them), so the checks hold by construction; left in, they are an
    extra user of each layer's output that keeps BatchNorm folding and int8 fusion from it."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and not node.users \
                and node.args and _reads_rank_only(node.args[0]):
            inputs = list(node.all_input_nodes)
            gm.graph.erase_node(node)
            dropped += 1
            while inputs:
                parent = inputs.pop()
                if parent.op in ("call_function", "call_method") and not parent.users and parent.graph is gm.graph:
                    inputs += parent.all_input_nodes
                    gm.graph.erase_node(parent)
    # a message argument reading ``x.ndim`` leaves an unused read behind
    for node in list(gm.graph.nodes):
        if not node.users and _reads_rank_only(node) and node.op in ("call_function", "call_method"):
            gm.graph.erase_node(node)
    if dropped:
        gm.recompile()
    return dropped


def constant_tensor_metadata(gm: fx.GraphModule) -> int:
    """Replace reads of a parameter's or buffer's ``.dtype`` / ``.device`` (timm's EdgeNeXt reads
    ``self.token_projection.weight.device``) by their values, as torch.export records them; left in,
    they keep a layer's weight read outside the layer, and a pass that rebuilds the layer (int8
    weights, low-rank factors) would leave the read dangling."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
                and node.args[1] in ("dtype", "device") and getattr(node.args[0], "op", None) == "get_attr":
            tensor = getattr(*owner_and_leaf(gm, node.args[0].target), None)
            if not isinstance(tensor, torch.Tensor):
                continue
            source = node.args[0]
            node.replace_all_uses_with(getattr(tensor, node.args[1]))
            gm.graph.erase_node(node)
            if not source.users:
                gm.graph.erase_node(source)
            folded += 1
    if folded:
        gm.recompile()
    return folded


def lift_batch_norms(gm: fx.GraphModule, example_inputs: tuple | None = None) -> int:
    """Lift every eval-mode functional batch norm on a layer's own tensors (see the module
    docstring); torch.fx graphs get their ranks from one run on ``example_inputs``."""
    calls = [(node, call) for node in list(gm.graph.nodes) if (call := _bn_call(node)) is not None]
    if calls and example_inputs is not None and any(isinstance(c["input"], fx.Node) and _rank(c["input"]) is None
                                                    for _, c in calls):
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    lifted = sum(_lift_batch_norm(gm, node, call) is not None for node, call in calls)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def _count(lifted: dict[str, int], key: str, count: int) -> None:
    """Record a clean-up that changed something (the summary names only what happened)."""
    if count:
        lifted[key] = count


def lift_functional_layers(gm: fx.GraphModule, example_inputs: tuple | None = None) -> dict[str, int]:
    """Rewrite ``gm`` in place; returns how many of each op became a module. ``example_inputs``
    give a torch.fx graph's batch norms their ranks (torch.export graphs carry them)."""
    lifted: dict[str, int] = {}
    _count(lifted, "rank_asserts_removed", drop_rank_asserts(gm))
    _count(lifted, "metadata_reads_folded", constant_tensor_metadata(gm))
    _count(lifted, "batch_norm", lift_batch_norms(gm, example_inputs))
    _count(lifted, "weight_computations_folded", fold_weight_computations(gm))
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        spec = _LIFTERS.get(node.target) if node.op == "call_function" and node not in erased else None
        if spec is None:
            continue
        if node.target in _FUNCTIONS:
            _positional(node)
        w_index, b_index, input_index, build = spec
        calls = _same_layer_calls(node, w_index, input_index)
        if calls is None:
            continue
        args = list(node.args)
        weight = _param_of(gm, args[w_index], calls)
        bias_node = args[b_index] if b_index is not None and b_index < len(args) else None
        bias = _param_of(gm, bias_node, calls) if bias_node is not None else None
        added = None   # a bias computed in the graph (BEiT: cat(q_bias, k_bias, v_bias)): added after the layer
        if bias_node is not None and bias is None and build is _linear and len(calls) == 1:
            added, bias_node = bias_node, None
            args[b_index] = None
        if weight is None or (bias_node is not None and bias is None):
            continue
        built = build(args, node.kwargs, weight[1], bias[1] if bias is not None else None)
        if built is None:
            continue
        module, _ = built
        for qualname, _ in (weight, bias) if bias is not None else (weight,):
            holder, leaf = owner_and_leaf(gm, qualname)
            holder._parameters.pop(leaf, None)
        path = _free_name(gm, weight[0].rpartition(".")[0] or f"lifted_{node.name}")
        _install(gm, path, module)
        for use in [n for n in gm.graph.nodes if n in calls]:   # in graph order
            with gm.graph.inserting_before(use):
                call = gm.graph.call_module(path, (use.args[input_index],))
                out = call if added is None else gm.graph.call_function(operator.add, (call, added))
            call.meta.update(use.meta)
            out.meta.update(use.meta)
            use.replace_all_uses_with(out)
            gm.graph.erase_node(use)
            erased.add(use)
        for attr in (args[w_index], bias_node):
            if isinstance(attr, fx.Node) and not attr.users:
                gm.graph.erase_node(attr)
        key = getattr(node.target, "__name__", str(node.target)).split(".")[0]   # linear, conv2d, matmul
        lifted[key] = lifted.get(key, 0) + len(calls)
    _count(lifted, "bias_adds_merged", merge_bias_adds(gm))
    _count(lifted, "dropout_removed", _drop_eval_dropout(gm))
    _count(lifted, "metadata_asserts_removed", _drop_metadata_asserts(gm))
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted
