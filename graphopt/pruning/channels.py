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

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import fx

from graphopt.analysis import register_analysis
from graphopt.ops import OpKind, op_name
from graphopt.pruning.attention_rules import AttentionRules
from graphopt.pruning.batch_rules import BatchRules
from graphopt.pruning.elementwise_rules import ElementwiseRules
from graphopt.pruning.groups import (DEPTHWISE, EMBED, HEADS, IN, MEAN, NORM, OUT, PARAM, SHAPE_ARG, SIZE_READ, SLICE,
                                     SPLIT, Entry,
                                     ChannelGroup, ChannelPlan, Member, Merged, ParamRef, Stack, _block_shared_literals,
                                     _distinct, _layouts, _size_reads)
from graphopt.pruning.index_rules import IndexRules
from graphopt.pruning.layer_rules import LayerRules
from graphopt.pruning.reshape_rules import ReshapeRules
from graphopt.pruning.rules import is_strict, module_rule, op_rule, rule_failed
from graphopt.pruning.spaces import Layout, Seg, Spaces, Unaligned
from graphopt.pruning.zeros import keeps_zeros

if TYPE_CHECKING:
    from graphopt.ir import Graph

__all__ = ["ChannelAnalysis", "ChannelGroup", "ChannelPlan", "Layout", "Member", "ParamRef", "Seg", "channel_groups",
           "DEPTHWISE", "EMBED", "HEADS", "IN", "MEAN", "NORM", "OUT", "PARAM", "SHAPE_ARG", "SIZE_READ", "SLICE", "SPLIT"]


class ChannelAnalysis(LayerRules, ElementwiseRules, IndexRules, ReshapeRules, AttentionRules, BatchRules):
    """One walk of the graph in topological order; each node's value is given by the rule
    registered for its module type or op (``graphopt.pruning.rules``)."""

    def __init__(self, graph: "Graph"):
        self.graph = graph
        self.modules = graph.modules()
        self.rule: Any = None                                     # the rule visiting the current node
        self.spaces = Spaces()
        self.values: dict[fx.Node, Any] = {}
        self.grids: list[tuple[str, Layout]] = []                 # every grid view, to decide at the end
        self.grid_literals: list[tuple[Layout, Entry, Entry, int]] = []   # (grid, rows, columns, rows repeated)
        self.first_calls: dict[str, fx.Node] = {}                 # module with weights -> its first call
        self.zeros: dict[fx.Node, bool] = {}                      # zero where its producers are zeroed
        self.uniform_uses: dict[tuple, list[Seg]] = {}            # a uniform tensor's size literal -> first channels

    def new_space(self, size: int, name: str) -> int:
        return self.spaces.new(size, [name])

    def block_space(self, sid: int, reason: str) -> None:
        self.spaces.block(Seg(sid, self.spaces.size[sid]), reason)

    def block(self, value: Any, reason: str) -> None:
        for layout in _layouts(value):
            for seg in layout.segs:
                self.spaces.block(seg, reason)

    def add_members(self, layout: Layout, role: str, target: str, node: fx.Node, axis: int,
                    tensors: tuple[str, ...] = ()) -> None:
        """Record that ``layout``'s channels lie along ``axis`` of module ``target``'s weights
        (``role`` says which: OUT/IN/NORM/...); ``tensors`` names them where the role's usual
        names (weight, bias, running statistics) do not fit, as in a user's own layer."""
        for seg, offset in zip(layout.segs, layout.offsets()):
            self.spaces.add_member(seg, Member(role, target, node.name, axis, offset, tensors=tuple(tensors)))

    def get(self, arg: Any) -> Any:
        """The value tracked for ``arg``, its layouts resolved to the current spaces."""
        return self.resolved(self.values.get(arg)) if isinstance(arg, fx.Node) else None

    def resolved(self, value: Any) -> Any:
        if isinstance(value, Layout):
            return self.spaces.layout(value)
        if isinstance(value, Stack):
            return Stack(value.axis, tuple(self.spaces.layout(item) for item in value.items))
        if isinstance(value, Merged):
            return replace(value, layout=self.spaces.layout(value.layout))
        if isinstance(value, (list, tuple)):
            return tuple(self.resolved(v) for v in value)
        return value

    def as_rows(self, layout: Layout) -> Layout:
        """A grid whose units are whole rows (heads)."""
        return Layout(layout.axis, self.spaces.blocks(layout.segs, layout.width), layout.sub, layout.width)

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
                if is_strict():
                    raise rule_failed(node, self.rule, exc) from exc
                for parent in node.all_input_nodes:
                    self.block(self.get(parent), f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")
                self.values[node] = None
            self.zeros[node] = keeps_zeros(self.values, self.zeros, self.modules, node)
        self.decide_grids()
        self.check_size_reads()
        return self.plan()

    def decide_grids(self) -> None:
        """A pruned grid must stay rectangular: grids nothing decided lose whole rows."""
        for name, grid in self.grids:
            try:
                if not (self.spaces.is_rows(grid.segs, grid.width) or self.spaces.is_columns(grid.segs, grid.width)):
                    self.spaces.blocks(grid.segs, grid.width)
            except Unaligned as exc:
                self.block(grid, f"{name}: {exc}")
        for grid, rows_literal, columns_literal, repeat in self.grid_literals:
            segs, w = self.spaces.resolve_segs(grid.segs), grid.width
            if self.spaces.is_rows(segs, w):
                self.literal(rows_literal, [Seg(s.space, s.length, s.inner // w * repeat) for s in segs])
            if self.spaces.is_columns(segs, w):
                self.literal(columns_literal, self.spaces.row_lists(segs, w)[0])

    def check_size_reads(self) -> None:
        """A width of tracked channels read at run time (``b, t, d = x.shape``) is fixed by the
        weights, so where these channels are pruned the read becomes the traced width: sizes
        of other groups' reshapes (``attn.reshape(B, N, C)``, ``sr(x).reshape(B, C, -1)``) and
        derived sizes (``d // heads``) keep their meaning, and this group's own reshapes are
        rewritten as literals. A read that leaves the graph keeps the channels whole."""
        for node in self.graph.nodes:
            if self.graph.kind(node) != OpKind.SHAPE or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            layout = self.get(node.args[0])
            if not isinstance(layout, Layout):
                continue
            rank = len(self.graph.shape(node.args[0]))
            for read, dim in _size_reads(node):
                if dim % rank not in layout.axes() or self.keeps_size(layout, dim % rank):
                    continue
                if any(user.op == "output" for user in read.users):
                    self.block(layout, f"{read.name}: the width of these channels is read at run time and "
                                       "leaves the graph")
                    continue
                size = self.graph.shape(node.args[0])[dim]
                for seg in layout.segs:
                    self.spaces.add_member(seg, Member(SIZE_READ, "", read.name, dim % rank, size=size))

    def keeps_size(self, layout: Layout, axis: int) -> bool:
        """Whether pruning leaves ``axis`` of a grid its size: its rows go whole (heads), so the
        width of a row does not change, or its columns do, so the number of rows does not."""
        if layout.sub is None:
            return False
        segs = self.spaces.resolve_segs(layout.segs)
        return (axis == layout.sub and self.spaces.is_rows(segs, layout.width)) or \
            (axis == layout.axis and self.spaces.is_columns(segs, layout.width))

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
        if any(isinstance(self.values.get(arg), Merged) for arg in node.all_input_nodes):
            return self.merged_op(node, kind)
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
        x = x if isinstance(x, Layout) else None
        self.rule = module_rule(module)
        if self.rule is not None:
            return self.rule(self, node, module, x)
        if kind in (OpKind.ACTIVATION, OpKind.IDENTITY):   # one input, one output, channels untouched
            return x
        if kind == OpKind.POOL:
            return self.pool(node, x, type(module).__name__)
        return self.not_understood(node, type(module).__name__)

    def visit_function(self, node: fx.Node, kind: OpKind) -> Any:
        name = op_name(node)
        self.rule = op_rule(name, kind)
        if self.rule is not None:
            return self.rule(self, node)
        return self.not_understood(node, f"{name} ({kind.value})")

    def not_understood(self, node: fx.Node, what: str) -> None:
        """Block every space reaching ``node``: no rule says how ``what`` moves channels."""
        for arg in node.all_input_nodes:
            self.block(self.get(arg), f"{node.name}: {what} is not understood by the channel analysis")
        return None


@register_analysis("channel_groups")
def _channel_groups_analysis(graph: "Graph") -> ChannelPlan:
    return ChannelAnalysis(graph).run()


def channel_groups(graph: "Graph", protected: set[str] | frozenset[str] = frozenset()) -> ChannelPlan:
    """The channel groups of ``graph`` (the cached ``channel_groups`` analysis), with every group
    that a ``protected`` layer produces (its output channels, an embedding's columns, attention
    heads) blocked. The caller gets its own copy to edit."""
    groups = []
    for g in graph.analysis("channel_groups").groups:
        hit = sorted({m.target for m in g.members if m.role in (OUT, EMBED, HEADS) and m.target in protected})
        groups.append(replace(g, members=list(g.members), blocked=list(g.blocked) + [f"{t} is protected"
                                                                                    for t in hit]))
    return ChannelPlan(groups)
