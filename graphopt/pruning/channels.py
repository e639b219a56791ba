"""Channel dependency groups: every tensor axis that must shrink together.

The analysis walks the graph once in topological order and tracks, for each tensor, which
*channel spaces* lie along one of its axes (``Layout``; the algebra is in
``graphopt.pruning.spaces``). Conv/linear/embedding outputs create spaces; elementwise ops,
norms and pooling carry them; concat lays them side by side and split/chunk cut them into
index ranges; flatten spreads each channel over a block of features; residual adds,
depthwise convs and GLU halves unite spaces. A grouped conv unites its input groups
position by position (one weight column serves every group) and writes its output as one
space repeated per group, so every group keeps the same size. A view of the channel axis
as two axes (``view(B, T, H, d)``) is a *grid*: attention (matmul,
scaled_dot_product_attention) and reductions within a row make whole rows (heads) the unit; merging the axes back in the
other order (a channel shuffle) makes every row keep the same columns. A view that cuts the
channels into equal ranges along a new axis (fused q/k/v: ``reshape(B, N, 3, H, d)``) is a
*stack*, followed through permutes until unbind or an index takes it apart. GroupNorm makes
whole groups the unit. Constants combined with a tensor are followed from their parameter
through gathers, views and permutes (relative-position bias tables). Every place a space
lives is a ``Member``: a weight slice to cut, a norm to shrink, a constant to slice, a size
literal (or a size read at run time) or split size to rewrite.

Anything not understood **blocks** the spaces that reach it, with the reason recorded;
nothing is guessed to be elementwise. A group is prunable only if nothing blocked it.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from torch import fx

from graphopt.analysis import register_analysis
from graphopt.pruning.spaces import Layout, Seg, Spaces, Unaligned
from graphopt.ops import OpKind, op_name

if TYPE_CHECKING:
    from graphopt.ir import Graph

# Member roles: where a channel space lives and what pruning it cuts.
OUT, IN, DEPTHWISE, NORM, PARAM, EMBED, SHAPE_ARG = "out", "in", "depthwise", "norm", "param", "embed", "shape_arg"
HEADS = "heads"  # whole attention heads: q/k/v rows of in_proj (inner = head_dim)
SPLIT = "split"  # the size of one output of a split/chunk along the channels
SLICE = "slice"  # a bound (``target``: "start" or "stop") of a slice object indexing the channels

__all__ = ["ChannelGroup", "ChannelPlan", "Layout", "Member", "ParamRef", "Seg", "channel_groups",
           "DEPTHWISE", "EMBED", "HEADS", "IN", "NORM", "OUT", "PARAM", "SHAPE_ARG", "SLICE", "SPLIT"]


@dataclass(frozen=True)
class Stack:
    """A tensor axis whose entries hold different channels: fused q/k/v viewed as
    ``reshape(B, N, 3, H, d)``. Entry ``i`` carries ``items[i]``, a layout over the other axes
    (numbered as in the whole tensor). Permutes move it; ``unbind`` or an integer index on its
    axis takes it apart; any other op blocks it."""

    axis: int
    items: tuple


@dataclass(frozen=True)
class ParamRef:
    """A get_attr constant, or a tensor derived from one by gathering rows, viewing, permuting
    or expanding (a relative-position bias table): sliced if combined with a tracked tensor.
    ``shape`` is the tensor's; ``axes[i]`` is the constant's axis that tensor axis ``i`` is
    intact (None: an axis the constant's slices do not follow)."""

    target: str
    shape: tuple
    axes: tuple = ()


@dataclass(frozen=True)
class Member:
    """One place a channel space lives. ``target`` is a module (parameters/buffers) or an
    attribute; ``axis`` is the axis cut; unit ``c`` of the group occupies positions
    ``offset + c * inner + [0, inner)`` along it.

    SHAPE_ARG: a size literal of node ``node``: ``node.args[arg]`` itself (``axis`` = -1)
    or element ``axis`` of that sequence; it shrinks by the positions removed. ``size`` is
    set when the graph reads that size at run time (``B, N, C = x.shape``): channel counts
    are fixed, so the read is replaced by -1, or by ``size`` less what was removed.
    SPLIT: output ``axis`` of the split/chunk ``node`` along dim ``arg``.
    SLICE: bound ``target`` ("start"/"stop") of the slice at element ``axis`` of the index
    ``node.args[arg]`` (-1: the index is that slice itself); it moves down by the positions removed."""

    role: str
    target: str
    node: str
    axis: int = 0
    offset: int = 0
    inner: int = 1
    arg: int = 0
    size: int = 0


@dataclass(frozen=True)
class RuntimeSize:
    """A size of a reshape's channel axis that the graph reads at run time; ``size`` as traced."""

    size: int


@dataclass
class ChannelGroup:
    id: int
    size: int
    name: str                      # the producing layer(s), for reports
    members: list[Member]
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked and any(m.role in (OUT, EMBED, HEADS) for m in self.members)

    @property
    def unit(self) -> int:
        """Channels a producing layer loses per pruning unit: head_dim for attention heads, the
        group size of a GroupNorm, the groups of a grouped conv (one row in each), 1 for plain
        channels."""
        per_layer: dict[str, int] = defaultdict(int)
        for m in self.members:
            if m.role in (OUT, EMBED):
                per_layer[m.target] += m.inner
            elif m.role == HEADS:  # the q, k and v rows of a head are one head
                per_layer[m.target] = m.inner
        return min(per_layer.values(), default=1)

    def targets(self, role: str) -> list[str]:
        return sorted({m.target for m in self.members if m.role == role})


@dataclass
class ChannelPlan:
    groups: list[ChannelGroup]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def blocked(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.prunable]


def _landing(ins: tuple, outs: tuple, axis: int) -> int | None:
    """The output axis a reshape keeps input ``axis`` on intact, if any."""
    prefix = math.prod(ins[:axis])
    for j in range(len(outs)):
        if math.prod(outs[:j]) == prefix and outs[j] == ins[axis]:
            return j
    return None


def _positions(layout: Layout) -> Layout:
    """A row-aligned grid seen one position per row (what attention's batch axis sees)."""
    w = layout.width
    return Layout(layout.axis, [Seg(s.space, s.length, s.inner // w) for s in layout.segs])


Entry = tuple[Any, Any]  # (literal int or None, (node name, arg index, element index or -1) or None)


class _Analysis:
    def __init__(self, graph: "Graph", protected: set[str]):
        self.graph = graph
        self.modules = graph.modules()
        self.protected = protected
        self.spaces = Spaces()
        self.values: dict[fx.Node, Any] = {}
        self.grids: list[tuple[str, Layout]] = []                 # every grid view, to decide at the end
        self.grid_literals: list[tuple[Layout, Entry, Entry]] = []
        self.first_calls: dict[str, fx.Node] = {}                 # module with weights -> its first call

    # -- spaces ------------------------------------------------------------------------
    def new_space(self, size: int, name: str) -> int:
        return self.spaces.new(size, [name])

    def block_space(self, sid: int, reason: str) -> None:
        self.spaces.block(Seg(sid, self.spaces.size[sid]), reason)

    def block(self, value: Any, reason: str) -> None:
        for layout in _layouts(value):
            for seg in layout.segs:
                self.spaces.block(seg, reason)

    def add_members(self, layout: Layout, role: str, target: str, node: fx.Node, axis: int) -> None:
        for seg, offset in zip(layout.segs, layout.offsets()):
            self.spaces.add_member(seg, Member(role, target, node.name, axis, offset))

    def protect(self, sid: int, target: str) -> None:
        if target in self.protected:
            self.block_space(sid, f"{target} is protected")

    def get(self, arg: Any) -> Any:
        """The value tracked for ``arg``, its layouts resolved to the current spaces."""
        return self.resolved(self.values.get(arg)) if isinstance(arg, fx.Node) else None

    def resolved(self, value: Any) -> Any:
        if isinstance(value, Layout):
            return self.spaces.layout(value)
        if isinstance(value, Stack):
            return Stack(value.axis, tuple(self.spaces.layout(item) for item in value.items))
        if isinstance(value, (list, tuple)):
            return tuple(self.resolved(v) for v in value)
        return value

    def as_rows(self, layout: Layout) -> Layout:
        """A grid whose units are whole rows (heads)."""
        return Layout(layout.axis, self.spaces.blocks(layout.segs, layout.width), layout.sub, layout.width)

    # -- the walk ----------------------------------------------------------------------
    def run(self) -> ChannelPlan:
        self.graph.analysis("shapes")
        for node in self.graph.nodes:
            try:
                self.values[node] = self.visit(node)
            except Unaligned as exc:  # the structure this op needs cannot be expressed: block
                for parent in node.all_input_nodes:
                    self.block(self.get(parent), f"{node.name}: {exc}")
                self.values[node] = None
            except Exception as exc:  # a rule that cannot handle this node: block, never guess
                for parent in node.all_input_nodes:
                    self.block(self.get(parent), f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")
                self.values[node] = None
        self.decide_grids()
        return self.plan()

    def decide_grids(self) -> None:
        """A pruned grid must stay rectangular: grids nothing decided lose whole rows."""
        for name, grid in self.grids:
            try:
                if not (self.spaces.is_rows(grid.segs, grid.width) or self.spaces.is_columns(grid.segs, grid.width)):
                    self.spaces.blocks(grid.segs, grid.width)
            except Unaligned as exc:
                self.block(grid, f"{name}: {exc}")
        for grid, rows_literal, columns_literal in self.grid_literals:
            segs, w = self.spaces.resolve_segs(grid.segs), grid.width
            if self.spaces.is_rows(segs, w):
                self.literal(rows_literal, [Seg(s.space, s.length, s.inner // w) for s in segs])
            if self.spaces.is_columns(segs, w):
                self.literal(columns_literal, self.spaces.row_lists(segs, w)[0])

    def plan(self) -> ChannelPlan:
        groups = []
        for sid in self.spaces.roots():
            names = list(dict.fromkeys(self.spaces.names[sid]))
            groups.append(ChannelGroup(len(groups), self.spaces.size[sid], " + ".join(names[:3]) +
                                       (f" (+{len(names) - 3})" if len(names) > 3 else ""),
                                       _distinct(self.spaces.members[sid]),
                                       list(self.spaces.reasons[sid])))
        _block_shared_literals(groups)
        return ChannelPlan(groups)

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            value = self.graph.attr(node.target)
            if not isinstance(value, torch.Tensor):
                return None
            return ParamRef(node.target, tuple(value.shape), tuple(range(value.dim())))
        if node.op == "output":
            for arg in node.all_input_nodes:
                self.block(self.get(arg), "reaches the model output")
            return None
        kind = self.graph.kind(node)
        if any(isinstance(self.values.get(arg), Stack) for arg in node.all_input_nodes):
            return self.stacked(node, kind)
        if node.op == "call_module":
            value = self.visit_module(node, self.modules[node.target], kind)
            self.values[node] = value
            self.share_weights(node)
            return self.get(node)
        return self.visit_function(node, kind)

    def share_weights(self, node: fx.Node) -> None:
        """A module with weights called again (weight sharing) must see the same channels on
        every call: its inputs are united with its first call's, and so are its outputs."""
        module = self.modules[node.target]
        if next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None:
            return
        first = self.first_calls.setdefault(node.target, node)
        if first is node:
            return
        pairs = [(self.get(first.args[0]) if first.args else None, self.get(node.args[0]) if node.args else None),
                 (self.get(first), self.get(node))]
        for a, b in pairs:
            if a is None and b is None:
                continue
            if not (isinstance(a, Layout) and isinstance(b, Layout) and a.axis == b.axis and a.sub is None
                    and b.sub is None and a.positions == b.positions) or len(node.args) > 1 or node.kwargs:
                reason = f"{node.name}: {node.target} is called more than once with channels that cannot be matched"
                self.block(a, reason)
                self.block(b, reason)
                continue
            self.spaces.align(a.segs, b.segs)

    def visit_module(self, node: fx.Node, module: nn.Module, kind: OpKind) -> Any:
        x = self.get(node.args[0]) if node.args else None
        shape = self.graph.shape(node)
        target = str(node.target)
        x = x if isinstance(x, Layout) else None
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return self.conv(node, module, x, target)
        if isinstance(module, nn.Linear):
            return self.linear(node, module, x, target)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            if x is not None:
                if x.axis != 1 or x.sub is not None:
                    self.block(x, f"{node.name}: {type(module).__name__} over an untracked axis")
                elif module.weight is not None or module.running_mean is not None:
                    self.add_members(x, NORM, target, node, 0)
            return x
        if isinstance(module, nn.LayerNorm):
            return self.layer_norm(node, x, len(shape) - len(module.normalized_shape))
        if isinstance(module, nn.GroupNorm):
            return self.group_norm(node, module, x, target)
        if isinstance(module, nn.Embedding):
            sid = self.new_space(module.embedding_dim, target)
            self.spaces.members[sid].append(Member(EMBED, target, node.name, 1))
            self.protect(sid, target)
            return Layout(len(shape) - 1, [Seg(sid, module.embedding_dim)])
        if isinstance(module, nn.PReLU):
            if x is not None and module.num_parameters > 1:
                if x.axis != 1 or x.sub is not None:
                    self.block(x, f"{node.name}: PReLU weights lie on axis 1, channels elsewhere")
                else:
                    self.add_members(x, NORM, target, node, 0)
            return x
        if isinstance(module, nn.MultiheadAttention):
            return self.attention(node, module, target)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, module.dim)
        if isinstance(module, nn.Flatten):
            return self.reshape(node, "flatten")
        if kind in (OpKind.ACTIVATION, OpKind.IDENTITY):
            return x
        if kind == OpKind.POOL:
            return self.pool(node, x, type(module).__name__)
        for arg in node.all_input_nodes:
            self.block(self.get(arg), f"{node.name}: {type(module).__name__} is not understood by the "
                                      "channel analysis")
        return None

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, target: str) -> Any:
        """Whole heads are a group of their own; the embedding width in and out is kept."""
        for arg in node.all_input_nodes:
            self.block(self.get(arg), f"{node.name}: MultiheadAttention keeps its embedding width")
        rank = len(self.graph.shape(node.args[0]))
        out = self.new_space(module.embed_dim, f"{target}.out_proj")
        self.block_space(out, f"{node.name}: MultiheadAttention keeps its embedding width")
        if module._qkv_same_embed_dim and module.num_heads > 1:
            heads = self.new_space(module.num_heads, f"{target} (heads)")
            self.protect(heads, target)
            d, e = module.head_dim, module.embed_dim
            for offset in (0, e, 2 * e):
                self.spaces.members[heads].append(Member(HEADS, target, node.name, 0, offset, d))
            self.spaces.members[heads].append(Member(IN, f"{target}.out_proj", node.name, 1, 0, d))
        return (Layout(rank - 1, [Seg(out, module.embed_dim)]), None)

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
        self.protect(sid, target)
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
        self.protect(sid, target)
        self.spaces.members[sid].append(Member(OUT, target, node.name, 0))
        return Layout(rank - 1, [Seg(sid, module.out_features)])

    def layer_norm(self, node: fx.Node, x: Layout | None, first: int) -> Any:
        """LayerNorm over the last axes from ``first``: its statistics must not span the channels;
        within a row of a grid (per-head normalisation) the rows become the unit."""
        if x is None:
            return None
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

    # -- functions and methods ---------------------------------------------------------
    def visit_function(self, node: fx.Node, kind: OpKind) -> Any:
        name = op_name(node)
        if kind == OpKind.SHAPE:
            return None
        if kind in (OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.IDENTITY):
            if node.op == "call_method" and name == "masked_fill":
                return self.elementwise(node, [node.args[0], node.args[1]])
            if kind == OpKind.IDENTITY:
                return self.get(node.args[0])
            return self.elementwise(node, list(node.args) + list(node.kwargs.values()))
        if kind == OpKind.POOL:
            return self.pool(node, self.get(node.args[0]), name)
        if kind == OpKind.CONCAT and name in ("cat", "concat"):
            return self.concat(node)
        if kind == OpKind.SPLIT and name in ("split", "split_with_sizes", "chunk", "unbind"):
            return self.split(node, name)
        if kind == OpKind.INDEX:
            return self.index(node, name)
        if kind == OpKind.RESHAPE:
            return self.reshape(node, name)
        if kind == OpKind.PERMUTE:
            return self.permute(node, name)
        if kind == OpKind.REDUCE:
            return self.reduce(node)
        if kind == OpKind.SOFTMAX:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self.softmax(node, self.get(node.args[0]), dim)
        if kind == OpKind.MATMUL and name in ("matmul", "bmm"):
            return self.matmul(node)
        if kind == OpKind.MATMUL and name == "einsum":
            return self.einsum(node)
        if kind == OpKind.ATTENTION and name == "scaled_dot_product_attention":
            return self.sdpa(node)
        for arg in node.all_input_nodes:
            self.block(self.get(arg), f"{node.name}: {name} ({kind.value}) is not understood by the "
                                      "channel analysis")
        return None

    def elementwise(self, node: fx.Node, operands: list) -> Any:
        out_shape = self.graph.shape(node)
        if not isinstance(out_shape, tuple):
            for a in operands:
                self.block(self.get(a), f"{node.name}: non-tensor result")
            return None
        rank = len(out_shape)
        result: Layout | None = None
        others = []
        for a in operands:
            if not isinstance(a, fx.Node):
                continue
            v = self.get(a)
            if isinstance(v, Layout):
                v = v.shifted(rank - len(self.graph.shape(a)))
                result = v if result is None else self.unify(node, result, v)
            else:
                others.append((a, v))
        if result is None:
            return None
        for a, v in others:
            a_shape = v.shape if isinstance(v, ParamRef) else self.graph.shape(a)
            if not isinstance(a_shape, tuple):
                continue
            lead = rank - len(a_shape)
            along = [ax - lead >= 0 and a_shape[ax - lead] != 1 for ax in result.axes()]
            if result.sub is not None:
                if along[0]:
                    self.block(result, f"{node.name}: combined with {a.name} along the rows of a grid of channels")
                elif along[1]:  # the same row of constants for every row: rows must stay whole
                    result = self.as_rows(result)
                continue
            if not along[0]:
                continue  # broadcast along the channels: nothing to cut
            if isinstance(v, ParamRef) and v.axes[result.axis - lead] is not None:
                self.add_members(result, PARAM, v.target, node, v.axes[result.axis - lead])
            elif isinstance(v, ParamRef):
                self.block(result, f"{node.name}: combined with {a.name}, a constant whose slices along "
                                   "the channels the analysis does not follow")
            else:
                self.block(result, f"{node.name}: combined with {a.name}, whose channels are not tracked")
        return result

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        if (a.axis, a.sub, a.width) != (b.axis, b.sub, b.width):
            self.block(a, f"{node.name}: operands' channel layouts differ")
            self.block(b, f"{node.name}: operands' channel layouts differ")
            return a
        self.spaces.align(a.segs, b.segs)
        return self.spaces.layout(a)

    def concat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(self.graph.shape(node))
        dim = dim % rank
        values = [self.get(t) for t in tensors]
        layouts = [v for v in values if isinstance(v, Layout)]
        if not layouts:
            return None
        axis = layouts[0].axis
        if any(l.axis != axis for l in layouts):
            for l in layouts:
                self.block(l, f"{node.name}: concatenated tensors track different axes")
            return None
        if all(dim not in l.axes() for l in layouts):  # along another axis: the inputs share their channels
            return self.elementwise(node, list(tensors))
        if any(l.sub is not None for l in layouts):
            raise Unaligned("concatenates grids of channels")
        segs = []
        for t, v in zip(tensors, values):
            if isinstance(v, Layout):
                segs += v.segs
            else:
                size = self.graph.shape(t)[axis]
                sid = self.new_space(size, f"{node.name}:untracked")
                self.block_space(sid, f"{node.name}: concatenated with {t.name}, whose channels are not tracked")
                segs.append(Seg(sid, size))
        return Layout(axis, segs)

    def split(self, node: fx.Node, name: str) -> Any:
        """split/chunk: each output takes an index range of the channels (the inverse of concat)."""
        x = self.get(node.args[0])
        if not isinstance(x, Layout):
            return None
        shapes = self.graph.shape(node)
        rank = len(self.graph.shape(node.args[0]))
        at = 1 if name == "unbind" else 2
        dim = (node.args[at] if len(node.args) > at else node.kwargs.get("dim", 0)) % rank
        if name == "unbind":
            if dim in x.axes():
                raise Unaligned("unbind along the channels (one output per channel)")
            return tuple(x.mapped(lambda a: a - (a > dim)) for _ in shapes)
        if dim not in x.axes():
            return tuple(x for _ in shapes)
        if x.sub is not None:
            raise Unaligned("splits a grid of channels")
        sizes = [s[dim] for s in shapes]
        if 0 in sizes:
            raise Unaligned("split with an empty output")
        bounds = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        outs: list[list[Seg]] = [[] for _ in sizes]
        at_pos = 0
        for seg in self.spaces.cut(x.segs, set(bounds[:-1])):
            outs[next(i for i, b in enumerate(bounds) if at_pos < b)].append(seg)
            at_pos += seg.positions
        layouts = tuple(Layout(x.axis, segs) for segs in outs)
        for i, layout in enumerate(layouts):
            for seg, offset in zip(layout.segs, layout.offsets()):
                self.spaces.add_member(seg, Member(SPLIT, "", node.name, i, offset, arg=dim))
        return layouts

    def index(self, node: fx.Node, name: str) -> Any:
        source = node.args[0]
        value = self.get(source)
        if isinstance(value, ParamRef):  # rows gathered by an index tensor: the other axes stay intact
            idx = node.args[1] if len(node.args) > 1 else None
            idx_shape = self.graph.shape(idx) if isinstance(idx, fx.Node) else None
            out_shape = self.graph.shape(node)
            if name in ("getitem", "__getitem__") and isinstance(idx_shape, tuple) and isinstance(out_shape, tuple) \
                    and len(out_shape) == len(idx_shape) + len(value.shape) - 1:  # not a mask over several axes
                return self.derived(node, value, [None] * len(idx_shape) + list(value.axes[1:]))
            return None
        if isinstance(value, (list, tuple)):
            idx = node.args[1]
            return value[idx] if isinstance(idx, int) and idx < len(value) else None
        if not isinstance(value, Layout):
            return None
        in_shape = self.graph.shape(source)
        rank = len(in_shape)
        def literal(arg: int) -> Callable[[int], Member]:   # ``node.args[arg]``, an int bound
            return lambda offset: Member(SHAPE_ARG, "", node.name, -1, offset, arg=arg)

        if name == "slice":  # aten.slice.Tensor(x, dim, start, end, step)
            dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
            if dim % rank not in value.axes():
                return value
            return self.channel_range(value, in_shape[dim % rank], start, end, step, literal(2), literal(3))
        if name == "narrow":  # torch.narrow(x, dim, start, length)
            dim, start, length = node.args[1:4]
            if dim % rank not in value.axes():
                return value
            if not (isinstance(start, int) and isinstance(length, int)) or start < 0:
                raise Unaligned("narrows the channels with bounds the analysis cannot rewrite")
            return self.channel_range(value, in_shape[dim % rank], start, start + length, 1, literal(2), literal(3),
                                      length_from_start=True)
        if name == "select":  # aten.select.int(x, dim, index)
            dim = node.args[1] % rank
            if dim in value.axes():
                raise Unaligned("selects one channel")
            return value.mapped(lambda a: a - (a > dim))
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        where: list[int | None] = list(range(len(items)))  # each item's element in ``idx`` (None: from an Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
            items = items[:at] + [slice(None)] * (rank - consumed) + items[at + 1:]
            where = where[:at] + [None] * (rank - consumed) + where[at + 1:]
        mapping, in_axis, out_axis, ranged = {}, 0, 0, None
        for element, item in zip(where, items):
            if item is None:
                out_axis += 1
                continue
            if isinstance(item, int) and not isinstance(item, bool):
                if in_axis in value.axes():
                    raise Unaligned("indexes into the channels")
                in_axis += 1
                continue
            if not isinstance(item, slice):
                raise Unaligned("advanced indexing")
            if in_axis in value.axes() and item != slice(None):
                if in_axis != value.axis or element is None:
                    raise Unaligned("indexes into the channels")
                ranged = (element, item, in_axis)
            mapping[in_axis] = out_axis
            in_axis, out_axis = in_axis + 1, out_axis + 1
        while in_axis < rank:
            mapping[in_axis] = out_axis
            in_axis, out_axis = in_axis + 1, out_axis + 1
        if ranged is not None:
            element, item, axis = ranged
            at = -1 if not isinstance(idx, tuple) else element
            value = self.channel_range(value, in_shape[axis], item.start, item.stop, item.step,
                                       lambda offset: Member(SLICE, "start", node.name, at, offset, arg=1),
                                       lambda offset: Member(SLICE, "stop", node.name, at, offset, arg=1))
        return value.mapped(mapping.__getitem__)

    def channel_range(self, x: Layout, size: int, start: Any, stop: Any, step: Any,
                      start_member: Callable[[int], Member], stop_member: Callable[[int], Member],
                      length_from_start: bool = False) -> Layout:
        """``x[start:stop]`` along its channel axis: the output holds those channels (cut into
        their own spaces), and every channel pruned before a bound moves that bound down (for
        ``narrow``'s length: every channel pruned inside the range)."""
        start = 0 if start is None else start
        stop = size if stop is None or (isinstance(stop, int) and stop >= size) else stop
        if not (isinstance(start, int) and isinstance(stop, int)) or step not in (None, 1):
            raise Unaligned("slices the channels with a computed bound or a step")
        if start < 0 or stop < 0:
            raise Unaligned("slices the channels with negative bounds")
        if start == 0 and stop == size:
            return x
        if x.sub is not None:
            raise Unaligned("slices a grid of channels")
        if start >= stop:
            raise Unaligned("slices the channels to an empty range")
        kept, at = [], 0
        for seg in self.spaces.cut(x.segs, {start, stop} - {0, size}):
            if at < start:
                self.spaces.add_member(seg, start_member(at))
                if stop < size and not length_from_start:
                    self.spaces.add_member(seg, stop_member(at))
            elif at < stop:
                kept.append(seg)
                if stop < size or length_from_start:
                    self.spaces.add_member(seg, stop_member(at))
            at += seg.positions
        return Layout(x.axis, kept)

    def reshape(self, node: fx.Node, name: str) -> Any:
        x = self.get(node.args[0])
        if isinstance(x, ParamRef):
            return self.reshaped_param(node, name, x)
        if not isinstance(x, Layout):
            return None
        if name == "contiguous":
            return x
        in_shape, out_shape = self.graph.shape(node.args[0]), self.graph.shape(node)
        entries = self.size_entries(node, name, len(out_shape))
        if entries is None:
            raise Unaligned(f"{name} sizes are computed in a way the analysis cannot rewrite")
        entries = [(RuntimeSize(out_shape[i]) if isinstance(v, fx.Node) else v, w) for i, (v, w) in enumerate(entries)]
        if name == "expand":
            out = x.shifted(len(out_shape) - len(in_shape))
        else:
            out = self.reshaped(node, x, in_shape, out_shape)
        if out is None:
            raise Unaligned(f"{name} splits or reorders the channels in a way the analysis does not follow")
        for layout in (out.items if isinstance(out, Stack) else (out,)):
            if layout.sub is None:
                self.literal(entries[layout.axis], layout.segs)
            else:
                self.grid_literals.append((layout, entries[layout.axis], entries[layout.sub]))
        return out

    def reshaped(self, node: fx.Node, x: Layout, ins: tuple, outs: tuple) -> Layout | None:
        """Where a row-major reshape from ``ins`` to ``outs`` puts the tracked channels."""
        if x.sub is None:
            n, prefix = ins[x.axis], math.prod(ins[:x.axis])
            for j in range(len(outs)):
                if math.prod(outs[:j]) != prefix:
                    continue
                if outs[j] == n:
                    return x.at(j, None)
                if outs[j] % n == 0 and math.prod(ins[x.axis:]) % outs[j] == 0:  # merged with following axes
                    return x.moved(j, outs[j] // n)
                if j + 1 < len(outs) and outs[j] * outs[j + 1] == n and min(outs[j], outs[j + 1]) > 1:
                    grid = Layout(j, list(x.segs), j + 1, outs[j + 1])  # viewed as rows x columns (heads)
                    self.grids.append((node.name, grid))
                    return grid
                if 1 < outs[j] < n and n % outs[j] == 0:
                    return self.stack(node, x, j, outs)
            return None
        rows, cols = _landing(ins, outs, x.axis), _landing(ins, outs, x.sub)
        if rows is not None and cols is not None:
            return x.at(rows, cols)
        lo, hi = sorted((x.axis, x.sub))
        if hi != lo + 1:
            return None
        for j in range(len(outs)):
            if math.prod(outs[:j]) == math.prod(ins[:lo]) and outs[j] == ins[lo] * ins[hi]:
                if x.axis < x.sub:  # rows then columns: the channels in their own order again
                    return Layout(j, list(x.segs))
                # columns then rows: a channel shuffle. Every row keeps the same columns.
                first_row = self.spaces.columns(x.segs, x.width)
                return Layout(j, [Seg(s.space, s.length, s.inner * x.rows) for s in first_row])
        return None

    def stack(self, node: fx.Node, x: Layout, j: int, outs: tuple) -> Stack | None:
        """The channels cut into ``outs[j]`` equal ranges laid along axis ``j``, each range
        viewed as a grid on the next two axes (``reshape(B, N, 3, H, d)``). (Ranges on one
        axis, ``reshape(B, N, 3, C)``, are a grid of three rows, found before this.)"""
        count, part = outs[j], x.positions // outs[j]
        rest = outs[j + 1:]
        if not (len(rest) > 1 and rest[0] * rest[1] == part and min(rest[0], rest[1]) > 1):
            return None
        ranges: list[list[Seg]] = [[] for _ in range(count)]
        at = 0
        for seg in self.spaces.cut(x.segs, {part * i for i in range(1, count)}):
            ranges[at // part].append(seg)
            at += seg.positions
        items = tuple(Layout(j + 1, segs, j + 2, rest[1]) for segs in ranges)
        self.grids.extend((node.name, item) for item in items)
        return Stack(j, items)

    def derived(self, node: fx.Node, x: ParamRef, axes: list) -> ParamRef | None:
        """``x`` after ``node``, its constant's axes at ``axes`` (None if none is left)."""
        shape = self.graph.shape(node)
        if not isinstance(shape, tuple) or all(a is None for a in axes):
            return None
        return ParamRef(x.target, shape, tuple(axes))

    def reshaped_param(self, node: fx.Node, name: str, x: ParamRef) -> ParamRef | None:
        """A constant's axes through a reshape: those that land intact and whose size is not
        written in the graph (a written size would not shrink with them)."""
        if name == "contiguous":
            return x
        in_shape, out_shape = self.graph.shape(node.args[0]), self.graph.shape(node)
        if name == "expand":
            return self.derived(node, x, [None] * (len(out_shape) - len(in_shape)) + list(x.axes))
        entries = self.size_entries(node, name, len(out_shape))
        if entries is None:
            return None
        axes: list = [None] * len(out_shape)
        for i, axis in enumerate(x.axes):
            j = _landing(in_shape, out_shape, i)
            if axis is not None and j is not None and (entries[j][1] is None or entries[j][0] == -1):
                axes[j] = axis
        return self.derived(node, x, axes)

    def size_entries(self, node: fx.Node, name: str, rank: int) -> list[Entry] | None:
        """Per output axis: the literal size written in the graph and where, or (None, None)
        where the size is read at run time. None if the sizes cannot be located."""
        dynamic: list[Entry] = [(None, None)] * rank
        if name in ("view", "reshape", "expand", "_unsafe_view"):
            if node.kwargs:
                return None
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                entries = [_entry(v, (node.name, 1, i)) for i, v in enumerate(sizes[0])]
            elif len(sizes) == 1 and isinstance(sizes[0], fx.Node):
                entries = self.computed_sizes(sizes[0], rank)
            else:
                entries = [_entry(v, (node.name, 1 + i, -1)) for i, v in enumerate(sizes)]
            return entries if entries is not None and len(entries) == rank else None
        if name == "unflatten":
            dim, sizes = node.args[1], node.args[2]
            dim %= rank - len(sizes) + 1
            return dynamic[:dim] + [_entry(v, (node.name, 2, i)) for i, v in enumerate(sizes)] + \
                dynamic[dim + len(sizes):]
        return dynamic  # flatten, squeeze, unsqueeze: no sizes written

    def computed_sizes(self, sizes: fx.Node, rank: int) -> list[Entry] | None:
        """``x.size()[:-1] + (heads, head_dim)``: sizes read at run time joined with literals."""
        if self.is_runtime_size(sizes):
            return [(None, None)] * rank
        if not (sizes.op == "call_function" and sizes.target is operator.add and len(sizes.args) == 2):
            return None
        pieces = []
        for i, arg in enumerate(sizes.args):
            if isinstance(arg, (list, tuple)):
                pieces.append([_entry(v, (sizes.name, i, j)) for j, v in enumerate(arg)])
            elif isinstance(arg, fx.Node) and self.is_runtime_size(arg):
                pieces.append(None)
            else:
                return None
        known = sum(len(p) for p in pieces if p is not None)
        return [e for p in pieces for e in (p if p is not None else [(None, None)] * (rank - known))]

    def is_runtime_size(self, node: fx.Node) -> bool:
        if self.graph.kind(node) == OpKind.SHAPE:
            return True
        return self.graph.kind(node) == OpKind.INDEX and isinstance(node.args[0], fx.Node) and \
            self.graph.kind(node.args[0]) == OpKind.SHAPE

    def literal(self, entry: Entry, segs: list[Seg]) -> None:
        """A size of the channel axis written in the graph shrinks with every position removed,
        whether a literal or read at run time (a size read from another tensor, such as the
        embedding width in ``reshape(B, N, C)`` after attention, would not follow)."""
        value, where = entry
        if where is None or value == -1 or not isinstance(value, (int, RuntimeSize)):
            return
        node, arg, element = where
        size = value.size if isinstance(value, RuntimeSize) else 0
        offset = 0
        for seg in segs:
            self.spaces.add_member(seg, Member(SHAPE_ARG, "", node, element, offset, arg=arg, size=size))
            offset += seg.positions

    def permute(self, node: fx.Node, name: str) -> Any:
        x = self.get(node.args[0])
        if isinstance(x, ParamRef):
            where = self.axis_map(node, name)
            axes: list = [None] * len(x.axes)
            for i, axis in enumerate(x.axes):
                axes[where(i)] = axis
            return self.derived(node, x, axes)
        if not isinstance(x, Layout):
            return None
        return x.mapped(self.axis_map(node, name))

    def axis_map(self, node: fx.Node, name: str) -> Callable[[int], int]:
        """Where permute/transpose/swapaxes ``node`` sends each input axis."""
        rank = len(self.graph.shape(node))
        if name == "permute":
            dims = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
            return [d % rank for d in dims].index
        d0, d1 = (0, 1) if name == "t" else (node.args[1] % rank, node.args[2] % rank)
        return lambda a: d1 if a == d0 else d0 if a == d1 else a

    def stacked(self, node: fx.Node, kind: OpKind) -> Any:
        """Ops on a ``Stack``: permutes move it, ``contiguous`` keeps it, ``unbind`` or an
        integer index on its axis hands out its entries."""
        name = op_name(node)
        x = self.get(node.args[0]) if node.args else None
        if not isinstance(x, Stack) or sum(isinstance(self.values.get(a), Stack) for a in node.all_input_nodes) > 1:
            raise Unaligned(f"{name} on channels stacked along one axis (fused q/k/v) is not followed")
        rank = len(self.graph.shape(node.args[0]))
        if name == "contiguous" and not node.kwargs:
            return x
        if kind == OpKind.PERMUTE:
            where = self.axis_map(node, name)
            return Stack(where(x.axis), tuple(i.mapped(where) for i in x.items))
        entries = tuple(i.mapped(lambda a: a - (a > x.axis)) for i in x.items)  # the stack's axis gone
        if name == "unbind":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim % rank == x.axis:
                return entries
        if kind == OpKind.INDEX and name in ("getitem", "__getitem__") and x.axis == 0 \
                and isinstance(node.args[1], int) and not isinstance(node.args[1], bool):
            return entries[node.args[1]]
        if name == "select" and node.args[1] % rank == x.axis:   # torch.export's qkv[0]: aten.select.int
            return entries[node.args[2]]
        raise Unaligned(f"{name} on channels stacked along one axis (fused q/k/v) is not followed")

    def reduce(self, node: fx.Node) -> Any:
        x = self.get(node.args[0])
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or dims == []:
            self.block(x, f"{node.name}: reduces over every axis")
            return None
        dims = {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if x.axis in dims:
            self.block(x, f"{node.name}: reduces over the channels")
            return None
        if x.sub is not None and x.sub in dims:  # within each row: rows stay whole, the columns are gone
            x = _positions(self.as_rows(x))
        if not keepdim:
            x = x.mapped(lambda a: a - sum(d < a for d in dims))
        out = self.graph.shape(node)
        return (x, x) if out and isinstance(out[0], tuple) else x  # max/min(dim): values and indices

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> Any:
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node))
        if dim is None or dim % rank == x.axis:
            self.block(x, f"{node.name}: softmax over the channels")
            return None
        return self.as_rows(x) if x.sub is not None and dim % rank == x.sub else x

    def pool(self, node: fx.Node, x: Any, name: str) -> Any:
        if not isinstance(x, Layout):
            return None
        spatial = next((int(c) for c in ("1", "2", "3") if f"{c}d" in name.lower()), 2)
        rank = len(self.graph.shape(node.args[0]))
        if any(a >= rank - spatial for a in x.axes()):
            raise Unaligned(f"{name} pools over the channels")
        return x

    def heads(self, layout: Layout, rank: int, contracted: int, kept: int | None,
              out_rank: int) -> tuple[Layout, Layout | None]:
        """An attention operand seen one position per head on its batch axis (in output
        numbering), and the operand as a grid of whole heads when its columns survive on
        axis ``kept`` (None: no axis of this operand reaches the output)."""
        if layout.axis >= rank - 2:
            raise Unaligned("attention or matmul over the channels")
        lead = out_rank - rank
        if layout.sub is None:
            return layout.shifted(lead), None
        if layout.sub not in (contracted, kept):
            raise Unaligned("attention over a grid of channels whose columns do not lie on the head dim")
        rows = self.as_rows(layout)
        return _positions(rows).shifted(lead), (rows if layout.sub == kept else None)

    def attend(self, node: fx.Node, operands: list, out_rank: int) -> Layout:
        """Unite the heads of every operand ``(layout, source, contracted axis, kept axis)``;
        the result carries them on the shared batch axis."""
        positions, kept = [], None
        for layout, source, contracted, keeps in operands:
            rank = len(self.graph.shape(source))
            keeps = None if keeps is None else keeps % rank
            pos, grid = self.heads(layout, rank, contracted % rank, keeps, out_rank)
            positions.append(pos)
            if grid is not None:
                if kept is not None:
                    raise Unaligned("both operands keep a grid of channels")
                kept = (grid, keeps + out_rank - rank)
        if len({p.axis for p in positions}) > 1:
            raise Unaligned("operands carry their heads on different axes")
        for other in positions[1:]:
            self.spaces.align(positions[0].segs, other.segs)
        axis = positions[0].axis
        if kept is not None:
            grid, sub = kept
            return Layout(axis, self.spaces.resolve_segs(grid.segs), sub, grid.width)
        return Layout(axis, self.spaces.resolve_segs(positions[0].segs))

    def untracked_heads(self, node: fx.Node, other: Any, axis: int, out_rank: int) -> None:
        """An operand without tracked channels must broadcast along the heads."""
        shape = self.graph.shape(other) if isinstance(other, fx.Node) else None
        if isinstance(shape, tuple):
            at = axis - (out_rank - len(shape))
            if at >= 0 and shape[at] != 1:
                raise Unaligned(f"combined with {other.name}, whose heads are not tracked")

    def matmul(self, node: fx.Node) -> Any:
        """Batched matmul over heads (q @ k^T, weights @ v): heads are a batch axis."""
        a, b = node.args[0], node.args[1]
        return self.batched_matmul(node, a, b, self.get(a), self.get(b))

    def einsum(self, node: fx.Node) -> Any:
        """An einsum that is a batched matmul, either operand transposed: ``"bhid,bhjd->bhij"``
        (q @ k^T) or ``"bhij,bhjd->bhid"`` (weights @ v), with the same batch letters, in the
        same order, leading both operands and the output."""
        equation = node.args[0]
        operands = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))) \
            else node.args[1]
        if not isinstance(equation, str) or len(operands) != 2 or equation.count("->") != 1 or "." in equation:
            raise Unaligned("einsum that is not a two-operand batched matmul")
        inputs, eo = equation.replace(" ", "").split("->")
        ea, eb = (inputs.split(",") + [""])[:2]
        shared = set(ea[-2:]) & set(eb[-2:])
        if not (len(eo) >= 2 and ea[:-2] == eb[:-2] == eo[:-2] and len(shared) == 1
                and set(ea[-2:]) == {eo[-2], *shared} and set(eb[-2:]) == {eo[-1], *shared}
                and len(set(eo)) == len(eo)):
            raise Unaligned(f"einsum {equation!r} is not a batched matmul")
        (k,) = shared
        a, b = operands
        la, lb = self.get(a), self.get(b)
        if ea[-1] != k:   # a given as (k, i): seen as its transpose
            la = _swap_last(la, len(ea))
        if eb[-2] != k:   # b given as (j, k)
            lb = _swap_last(lb, len(eb))
        return self.batched_matmul(node, a, b, la, lb)

    def batched_matmul(self, node: fx.Node, a: Any, b: Any, la: Any, lb: Any) -> Any:
        tracked = [(v, src, c, k) for v, src, c, k in ((la, a, -1, -2), (lb, b, -2, -1)) if isinstance(v, Layout)]
        if not tracked:
            return None
        out_rank = len(self.graph.shape(node))
        if min(len(self.graph.shape(a)), len(self.graph.shape(b))) < 2:
            raise Unaligned("matmul with a vector")
        out = self.attend(node, tracked, out_rank)
        if len(tracked) == 1:
            self.untracked_heads(node, b if isinstance(la, Layout) else a, out.axis, out_rank)
        return out

    def sdpa(self, node: fx.Node) -> Any:
        """scaled_dot_product_attention: query, key and value carry the same heads; the output
        carries value's."""
        names = ("query", "key", "value", "attn_mask")
        args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args):]]
        q, k, v, mask = args[:4]
        layouts = [self.get(t) for t in (q, k, v)]
        if not any(isinstance(l, Layout) for l in layouts) and not isinstance(self.get(mask), Layout):
            return None
        if not all(isinstance(l, Layout) for l in layouts) or node.kwargs.get("enable_gqa"):
            raise Unaligned("query, key and value do not all carry the heads")
        out_rank = len(self.graph.shape(node))
        out = self.attend(node, [(layouts[0], q, -1, -2), (layouts[1], k, -1, None), (layouts[2], v, -2, -1)],
                          out_rank)
        m = self.get(mask)
        if isinstance(m, Layout):
            m = m.shifted(out_rank - len(self.graph.shape(mask)))
            if m.sub is not None or m.axis != out.axis:
                raise Unaligned("the attention mask carries other channels")
            self.spaces.align(_positions(self.as_rows(out)).segs if out.sub is not None else out.segs, m.segs)
        elif isinstance(mask, fx.Node):
            self.untracked_heads(node, mask, out.axis, out_rank)
        return out


def _entry(value: Any, where: tuple) -> Entry:
    """A written size and where it is written: a literal int, or a node read at run time."""
    if isinstance(value, fx.Node) or (isinstance(value, int) and not isinstance(value, bool)):
        return (value, where)
    return (None, None)


def _block_shared_literals(groups: list[ChannelGroup]) -> None:
    """One size literal read for two tensors whose channels are pruned independently (a shared
    ``view`` shape) cannot follow both: block the groups involved."""
    spans: dict[tuple, list[tuple[int, int, ChannelGroup]]] = defaultdict(list)
    for g in groups:
        for m in g.members:
            if m.role == SHAPE_ARG:
                spans[(m.node, m.arg, m.axis)].append((m.offset, m.offset + g.size * m.inner, g))
    for (node, _, _), found in spans.items():
        for i, (lo, hi, g) in enumerate(found):
            for lo2, hi2, g2 in found[i + 1:]:
                if g2 is not g and lo < hi2 and lo2 < hi:
                    reason = f"{node}: one size literal serves channel groups that are pruned independently"
                    for x in (g, g2):
                        if reason not in x.blocked:
                            x.blocked.append(reason)


def _distinct(members: list[Member]) -> list[Member]:
    """Members without repeats; a shared module's weight slices count once, whichever call added them."""
    weights = (OUT, IN, DEPTHWISE, NORM, PARAM, EMBED, HEADS)
    return list(dict.fromkeys(replace(m, node="") if m.role in weights else m for m in members))


def _swap_last(value: Any, rank: int) -> Any:
    """A layout as its tensor's transpose of the last two axes would carry it."""
    if not isinstance(value, Layout):
        return value
    swap = lambda a: rank - 1 if a == rank - 2 else rank - 2 if a == rank - 1 else a  # noqa: E731
    return value.mapped(swap)


def _layouts(value: Any) -> list[Layout]:
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, Stack):
        return list(value.items)
    if isinstance(value, (list, tuple)):
        return [l for v in value for l in _layouts(v)]
    return []


def channel_groups(graph: "Graph", protected: set[str] | frozenset[str] = frozenset()) -> ChannelPlan:
    """The channel groups of ``graph``; spaces produced by ``protected`` layers are blocked."""
    return _Analysis(graph, set(protected)).run()


@register_analysis("channel_groups")
def _channel_groups_analysis(graph: "Graph") -> ChannelPlan:
    return channel_groups(graph)
