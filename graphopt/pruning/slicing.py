"""Physically removing channels: slice parameters, buffers and constants along an axis and
rebuild the modules that hold them with consistent attributes (in/out channels, groups,
features). Shared by every pass that shrinks layers."""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn as nn
from torch import fx

from graphopt.ir import Graph
from graphopt.shapes import SHAPE_KEY


def keep_index(length: int, removed: set[int], device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([i for i in range(length) if i not in removed], dtype=torch.long, device=device)


def _fix_attributes(module: nn.Module, depthwise: bool) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if depthwise:
            module.groups = module.in_channels = module.out_channels = w.shape[0]
        else:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.RNNBase):
        module.input_size = module.weight_ih_l0.shape[1]


def _sliced(tensor: torch.Tensor, cuts: dict[int, set[int]]) -> torch.Tensor:
    out = tensor.detach()
    for dim, removed in cuts.items():
        out = out.index_select(dim, keep_index(out.shape[dim], removed, out.device))
    return out.clone()


def apply_cuts(graph: Graph, cuts: dict[str, dict[int, set[int]]], depthwise: set[str] = frozenset()) -> None:
    """Remove positions from tensors. ``cuts`` maps a tensor's qualified name (``layer.weight``
    or a root attribute) to {axis: positions to remove}. Modules owning cut tensors are
    replaced by resized copies; ``depthwise`` names convs whose groups shrink with them."""
    by_owner: dict[str, dict[str, dict[int, set[int]]]] = defaultdict(dict)
    for name, axes in cuts.items():
        owner, _, attr = name.rpartition(".")
        by_owner[owner][attr] = axes
    for owner, tensors in by_owner.items():
        module = graph.gm.get_submodule(owner) if owner else graph.gm
        if owner and not isinstance(module, torch.fx.GraphModule):
            module = copy.deepcopy(module)
        for attr, axes in tensors.items():
            value = getattr(module, attr)
            new = _sliced(value, axes)
            if isinstance(value, nn.Parameter):
                setattr(module, attr, nn.Parameter(new, requires_grad=value.requires_grad))
            elif attr in dict(module.named_buffers(recurse=False)):
                module.register_buffer(attr, new)
            else:
                setattr(module, attr, new)
        _fix_attributes(module, owner in depthwise)
        if owner:
            graph.replace_module(owner, module)


def resize_group_norm(graph: Graph, target: str, removed: set[int]) -> None:
    """Remove channels (whole groups of them) from a GroupNorm; num_groups follows."""
    module = copy.deepcopy(graph.gm.get_submodule(target))
    per_group = module.num_channels // module.num_groups
    for attr in ("weight", "bias"):
        value = getattr(module, attr)
        if value is not None:
            setattr(module, attr, nn.Parameter(_sliced(value, {0: removed}), requires_grad=value.requires_grad))
    module.num_channels -= len(removed)
    module.num_groups = module.num_channels // per_group
    graph.replace_module(target, module)


def split_sizes(node: fx.Node, dim: int, removed: dict[int, int]) -> None:
    """Rewrite a split/chunk along ``dim`` as a split with explicit sizes, output ``i``
    ``removed[i]`` channels smaller (equal chunks need not stay equal)."""
    sizes = [shape[dim] - removed.get(i, 0) for i, shape in enumerate(node.meta[SHAPE_KEY])]
    if isinstance(node.target, torch._ops.OpOverload):
        node.target = torch.ops.aten.split_with_sizes.default
    elif node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args, node.kwargs = (node.args[0], sizes, dim), {}
