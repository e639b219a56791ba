"""Channel rules of the layers that hold weights (conv, linear, norms, embedding, PReLU,
multi-head attention): which axis each cuts, and the channel spaces their outputs create."""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch import fx

from graphopt.modules import PrunedLayerNorm
from graphopt.pruning.groups import DEPTHWISE, EMBED, HEADS, IN, NORM, OUT, Member
from graphopt.pruning.rules import channel_rule
from graphopt.pruning.spaces import Layout, Seg, Unaligned


class LayerRules:
    """Rules for layers called as modules (a mixin of ``ChannelAnalysis``)."""

    def conv(self, node: fx.Node, module: nn.Module, x: Layout | None, target: str) -> Any:
        rank = len(self.graph.shape(node))
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if depthwise:
            if x is not None and x.axis == 1 and x.sub is None:
                self.add_members(x, DEPTHWISE, target, node, 0)
                return x
            self.block(x, f"{node.name}: depthwise conv over an untracked axis")
            sid = self.new_space(module.out_channels, target)
            self.block_space(sid, f"{node.name}: depthwise conv on an input whose channels are not tracked")
            return Layout(1, [Seg(sid, module.out_channels)])
        if x is not None:
            if x.axis != 1 or x.sub is not None:
                self.block(x, f"{node.name}: conv input tracked on axis {x.axis}, not channels")
            elif module.groups > 1:
                self.grouped_input(node, module, x, target)
            else:
                self.add_members(x, IN, target, node, 1)
        # Every group must keep as many output channels as the others: a unit is the same row
        # in each of the ``groups`` blocks of rows (one block for a plain conv).
        width = module.out_channels // module.groups
        sid = self.new_space(width, target)
        for g in range(module.groups):
            self.spaces.members[sid].append(Member(OUT, target, node.name, 0, g * width))
        return Layout(1 if rank > 1 else 0, [Seg(sid, width)] * module.groups)

    def grouped_input(self, node: fx.Node, module: nn.Module, x: Layout, target: str) -> None:
        """A grouped conv's weight has one column per position within a group, shared by every
        group: a unit is the same position in each of the ``groups`` input blocks, so the
        blocks' spaces are united (as a channel shuffle unites its rows)."""
        width = module.in_channels // module.groups
        if width == 1:  # a depthwise multiplier: one unit would be every input channel at once
            self.block(x, f"{node.name}: conv with one input channel per group and {module.out_channels} outputs "
                          f"(groups={module.groups})")
            return
        try:
            first = self.spaces.columns(x.segs, width)
        except Unaligned as exc:
            self.block(x, f"{node.name}: grouped conv (groups={module.groups}) input: {exc}")
            return
        self.add_members(Layout(1, first), IN, target, node, 1)

    def linear(self, node: fx.Node, module: nn.Linear, x: Layout | None, target: str) -> Any:
        rank = len(self.graph.shape(node))
        if x is not None:
            if x.axis != rank - 1 or x.sub is not None:
                self.block(x, f"{node.name}: linear input tracked on axis {x.axis}, not features")
            else:
                self.add_members(x, IN, target, node, 1)
        sid = self.new_space(module.out_features, target)
        self.spaces.members[sid].append(Member(OUT, target, node.name, 0))
        return Layout(rank - 1, [Seg(sid, module.out_features)])

    def layer_norm(self, node: fx.Node, x: Layout | None, first: int, target: str = "") -> Any:
        """LayerNorm over the last axes from ``first``: its statistics must not span the channels;
        within a row of a grid (per-head normalisation) the rows become the unit. A LayerNorm
        module over the channel axis alone (``target``) is the exception: pruned, it becomes a
        ``PrunedLayerNorm`` that counts the removed channels as the zeros they are in the
        masked original, whose every producer of them the pass then zeroes too."""
        if x is None:
            return None
        rank = len(self.graph.shape(node))
        if target and first == rank - 1 and x.axis == first and x.sub is None:
            self.add_members(x, NORM, target, node, 0)
            return x
        if x.axis >= first:
            self.block(x, f"{node.name}: LayerNorm normalises over these channels "
                          "(pruning would change its statistics)")
            return x
        return self.as_rows(x) if x.sub is not None and x.sub >= first else x

    def group_norm(self, node: fx.Node, module: nn.GroupNorm, x: Layout | None, target: str) -> Any:
        """GroupNorm statistics are per group: whole groups are the unit (num_groups is rewritten)."""
        if x is None:
            return None
        if x.axis != 1 or x.sub is not None:
            self.block(x, f"{node.name}: GroupNorm over an untracked axis")
            return x
        if module.num_groups == 1:
            self.block(x, f"{node.name}: GroupNorm with one group normalises over all channels")
            return x
        size = module.num_channels // module.num_groups
        try:
            x = Layout(1, self.spaces.blocks(x.segs, size))
        except Unaligned as exc:
            raise Unaligned(f"GroupNorm groups of {size} channels: {exc}") from None
        self.add_members(x, NORM, target, node, 0)
        return x

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, target: str) -> Any:
        """Whole heads are a group of their own; the embedding width in and out is kept."""
        for arg in node.all_input_nodes:
            self.block(self.get(arg), f"{node.name}: MultiheadAttention keeps its embedding width")
        rank = len(self.graph.shape(node.args[0]))
        out = self.new_space(module.embed_dim, f"{target}.out_proj")
        self.block_space(out, f"{node.name}: MultiheadAttention keeps its embedding width")
        if module._qkv_same_embed_dim and module.num_heads > 1:
            heads = self.new_space(module.num_heads, f"{target} (heads)")
            d, e = module.head_dim, module.embed_dim
            for offset in (0, e, 2 * e):
                self.spaces.members[heads].append(Member(HEADS, target, node.name, 0, offset, d))
            self.spaces.members[heads].append(Member(IN, f"{target}.out_proj", node.name, 1, 0, d))
        return (Layout(rank - 1, [Seg(out, module.embed_dim)]), None)


# -- registrations ------------------------------------------------------------------------
@channel_rule(module=nn.modules.conv._ConvNd)
def _conv(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    return a.conv(node, module, x, str(node.target))


@channel_rule(module=nn.modules.conv._ConvTransposeNd)
def _conv_transpose(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    return a.not_understood(node, type(module).__name__)


@channel_rule(module=nn.Linear)
def _linear(a, node: fx.Node, module: nn.Linear, x: Layout | None) -> Any:
    return a.linear(node, module, x, str(node.target))


@channel_rule(module=(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
def _batch_norm(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    """Per-channel statistics and affine weights on axis 1: cut with the channels."""
    if x is not None:
        if x.axis != 1 or x.sub is not None:
            a.block(x, f"{node.name}: {type(module).__name__} over an untracked axis")
        elif module.weight is not None or module.running_mean is not None:
            a.add_members(x, NORM, str(node.target), node, 0)
    return x


@channel_rule(module=(nn.LayerNorm, PrunedLayerNorm))
def _layer_norm(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    return a.layer_norm(node, x, len(a.graph.shape(node)) - len(module.normalized_shape), str(node.target))


@channel_rule(op="layer_norm")
def _layer_norm_call(a, node: fx.Node) -> Any:
    """F.layer_norm / aten.layer_norm left as a call (no affine weights, or weights read elsewhere)."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    x = a.get(node.args[0])
    return a.layer_norm(node, x if isinstance(x, Layout) else None, len(a.graph.shape(node)) - len(shape))


@channel_rule(module=nn.GroupNorm)
def _group_norm(a, node: fx.Node, module: nn.GroupNorm, x: Layout | None) -> Any:
    return a.group_norm(node, module, x, str(node.target))


@channel_rule(module=nn.RNNBase)
def _recurrent(a, node: fx.Node, module: nn.RNNBase, x: Layout | None) -> Any:
    """LSTM/GRU/RNN: the input features are read through the first layer's input weights (both
    directions), which lose their columns; the hidden state is the layer's own and stays whole."""
    if x is not None:
        rank = len(a.graph.shape(node.args[0]))
        if x.axis != rank - 1 or x.sub is not None or len(node.args) > 1 or node.kwargs:
            a.block(x, f"{node.name}: {type(module).__name__} input not on the last axis, or given a state")
        else:
            names = ("weight_ih_l0", "weight_ih_l0_reverse") if module.bidirectional else ("weight_ih_l0",)
            a.add_members(x, IN, str(node.target), node, 1, tensors=names)
    return None


@channel_rule(module=nn.Embedding)
def _embedding(a, node: fx.Node, module: nn.Embedding, x: Layout | None) -> Any:
    """A table's columns are channels of their own (created here, like a layer's outputs)."""
    target = str(node.target)
    sid = a.new_space(module.embedding_dim, target)
    a.spaces.members[sid].append(Member(EMBED, target, node.name, 1))
    return Layout(len(a.graph.shape(node)) - 1, [Seg(sid, module.embedding_dim)])


@channel_rule(module=nn.PReLU)
def _prelu(a, node: fx.Node, module: nn.PReLU, x: Layout | None) -> Any:
    if x is not None and module.num_parameters > 1:
        if x.axis != 1 or x.sub is not None:
            a.block(x, f"{node.name}: PReLU weights lie on axis 1, channels elsewhere")
        else:
            a.add_members(x, NORM, str(node.target), node, 0)
    return x


@channel_rule(module=nn.MultiheadAttention)
def _multihead_attention(a, node: fx.Node, module: nn.MultiheadAttention, x: Layout | None) -> Any:
    return a.attention(node, module, str(node.target))


@channel_rule(module=(nn.Softmax, nn.LogSoftmax))
def _softmax_module(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    return a.softmax(node, x, module.dim)


@channel_rule(module=nn.Flatten)
def _flatten_module(a, node: fx.Node, module: nn.Module, x: Layout | None) -> Any:
    return a.reshape(node, "flatten")
