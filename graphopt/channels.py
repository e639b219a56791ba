"""Channel dependency groups: every tensor axis that must shrink together.

The analysis walks the graph once in topological order and tracks, for each tensor, which
*channel spaces* lie along one of its axes (``Layout``). Conv/linear/embedding outputs
create spaces; elementwise ops, norms and pooling carry them; concat lays them side by
side; flatten spreads each channel over a block of features; residual adds and
depthwise convs merge spaces (union-find). Every place a space lives is a ``Member``:
a weight slice to cut, a norm to shrink, a constant to slice, a shape literal to rewrite.

Anything not understood **blocks** the spaces that reach it, with the reason recorded;
nothing is guessed to be elementwise. A group is prunable only if nothing blocked it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import fx

from graphopt.analysis import register_analysis
from graphopt.ops import OpKind

if TYPE_CHECKING:
    from graphopt.ir import Graph

# Member roles: where a channel space lives and what pruning it cuts.
OUT, IN, DEPTHWISE, NORM, PARAM, EMBED, SHAPE_ARG = "out", "in", "depthwise", "norm", "param", "embed", "shape_arg"
HEADS = "heads"  # whole attention heads: q/k/v rows of in_proj (inner = head_dim)


@dataclass(frozen=True)
class Seg:
    """``length`` channels of one space along an axis, each spread over ``inner`` elements."""

    space: int
    length: int
    inner: int = 1


@dataclass
class Layout:
    """The tracked axis of a tensor and the spaces along it, in order."""

    axis: int
    segs: list[Seg]

    def moved(self, axis: int, inner: int = 1) -> "Layout":
        return Layout(axis, [Seg(s.space, s.length, s.inner * inner) for s in self.segs])

    def offsets(self) -> list[int]:
        out, at = [], 0
        for s in self.segs:
            out.append(at)
            at += s.length * s.inner
        return out


@dataclass(frozen=True)
class ParamRef:
    """A get_attr constant (possibly expanded): sliced if combined with a tracked tensor."""

    target: str
    shape: tuple


@dataclass(frozen=True)
class Member:
    """One place a channel space lives. ``tensor`` is a module parameter/buffer prefix
    (``target``) or an attribute; ``axis`` is the axis cut; channel ``c`` of the space
    occupies positions ``offset + c * inner + [0, inner)`` along it."""

    role: str
    target: str
    node: str
    axis: int = 0
    offset: int = 0
    inner: int = 1
    arg: int = 0  # SHAPE_ARG: 1 if the sizes are one tuple argument, 0 if given one per argument


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
        """Tensor elements per pruning unit: head_dim for a group of attention heads, else 1."""
        return next((m.inner for m in self.members if m.role == HEADS), 1)

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


class _Analysis:
    def __init__(self, graph: "Graph", protected: set[str]):
        self.graph = graph
        self.modules = graph.modules()
        self.protected = protected
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.names: dict[int, list[str]] = defaultdict(list)
        self.members: dict[int, list[Member]] = defaultdict(list)
        self.reasons: dict[int, list[str]] = defaultdict(list)
        self.values: dict[fx.Node, Any] = {}

    # -- union-find over spaces ------------------------------------------------------
    def new_space(self, size: int, name: str) -> int:
        sid = len(self.parent)
        self.parent[sid], self.size[sid] = sid, size
        self.names[sid].append(name)
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.block_space(ra, f"{where}: joins {self.size[ra]} with {self.size[rb]} channels")
            self.block_space(rb, f"{where}: joins {self.size[ra]} with {self.size[rb]} channels")
        self.parent[rb] = ra
        self.names[ra] += self.names.pop(rb, [])
        self.members[ra] += self.members.pop(rb, [])
        self.reasons[ra] += self.reasons.pop(rb, [])

    def block_space(self, sid: int, reason: str) -> None:
        root = self.find(sid)
        if reason not in self.reasons[root]:
            self.reasons[root].append(reason)

    def block(self, value: Any, reason: str) -> None:
        for layout in _layouts(value):
            for seg in layout.segs:
                self.block_space(seg.space, reason)

    def add_member(self, seg: Seg, member: Member) -> None:
        self.members[self.find(seg.space)].append(member)

    def add_members(self, layout: Layout, role: str, target: str, node: fx.Node, axis: int) -> None:
        for seg, offset in zip(layout.segs, layout.offsets()):
            self.add_member(seg, Member(role, target, node.name, axis, offset, seg.inner))

    # -- the walk --------------------------------------------------------------------
    def run(self) -> ChannelPlan:
        self.graph.analysis("shapes")
        for node in self.graph.nodes:
            try:
                self.values[node] = self.visit(node)
            except Exception as exc:  # a rule that cannot handle this node: block, never guess
                for parent in node.all_input_nodes:
                    self.block(self.values.get(parent), f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")
                self.values[node] = None
        groups = []
        for sid in sorted({self.find(s) for s in self.parent}):
            names = list(dict.fromkeys(self.names[sid]))
            groups.append(ChannelGroup(len(groups), self.size[sid], " + ".join(names[:3]) +
                                       (f" (+{len(names) - 3})" if len(names) > 3 else ""),
                                       list(dict.fromkeys(self.members[sid])), list(self.reasons[sid])))
        return ChannelPlan(groups)

    def arg_value(self, arg: Any) -> Any:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            value = self.graph.attr(node.target)
            return ParamRef(node.target, tuple(value.shape)) if isinstance(value, torch.Tensor) else None
        if node.op == "output":
            for arg in node.all_input_nodes:
                self.block(self.values.get(arg), "reaches the model output")
            return None
        kind = self.graph.kind(node)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], kind)
        return self.visit_function(node, kind)

    def visit_module(self, node: fx.Node, module: nn.Module, kind: OpKind) -> Any:
        x = self.arg_value(node.args[0]) if node.args else None
        shape = self.graph.shape(node)
        target = str(node.target)
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return self.conv(node, module, x, target)
        if isinstance(module, nn.Linear):
            return self.linear(node, module, x, target)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            if isinstance(x, Layout):
                if x.axis != 1:
                    self.block(x, f"{node.name}: {type(module).__name__} over an untracked axis")
                elif module.weight is not None or module.running_mean is not None:
                    self.add_members(x, NORM, target, node, 0)
            return x if isinstance(x, Layout) else None
        if isinstance(module, nn.LayerNorm):
            if isinstance(x, Layout) and x.axis >= len(shape) - len(module.normalized_shape):
                self.block(x, f"{node.name}: LayerNorm normalises over these channels "
                              "(pruning would change its statistics)")
            return x if isinstance(x, Layout) else None
        if isinstance(module, nn.GroupNorm):
            self.block(x, f"{node.name}: GroupNorm statistics span channels")
            return x if isinstance(x, Layout) else None
        if isinstance(module, nn.Embedding):
            sid = self.new_space(module.embedding_dim, target)
            self.members[sid].append(Member(EMBED, target, node.name, 1))
            self.protect(sid, target)
            return Layout(len(shape) - 1, [Seg(sid, module.embedding_dim)])
        if isinstance(module, nn.PReLU):
            if isinstance(x, Layout) and module.num_parameters > 1:
                self.add_members(x, NORM, target, node, 0)
            return x if isinstance(x, Layout) else None
        if isinstance(module, nn.MultiheadAttention):
            return self.attention(node, module, target)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, module.dim)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        if kind in (OpKind.ACTIVATION, OpKind.IDENTITY, OpKind.POOL):
            return x if isinstance(x, Layout) else None
        for arg in node.all_input_nodes:
            self.block(self.values.get(arg), f"{node.name}: {type(module).__name__} is not understood by the "
                                             "channel analysis")
        return None

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, target: str) -> Any:
        """Whole heads are a group of their own; the embedding width in and out is kept."""
        for arg in node.all_input_nodes:
            self.block(self.values.get(arg), f"{node.name}: MultiheadAttention keeps its embedding width")
        rank = len(self.graph.shape(node.args[0]))
        out = self.new_space(module.embed_dim, f"{target}.out_proj")
        self.block_space(out, f"{node.name}: MultiheadAttention keeps its embedding width")
        if module._qkv_same_embed_dim and module.num_heads > 1:
            heads = self.new_space(module.num_heads, f"{target} (heads)")
            self.protect(heads, target)
            d, e = module.head_dim, module.embed_dim
            for offset in (0, e, 2 * e):
                self.members[heads].append(Member(HEADS, target, node.name, 0, offset, d))
            self.members[heads].append(Member(IN, f"{target}.out_proj", node.name, 1, 0, d))
        return (Layout(rank - 1, [Seg(out, module.embed_dim)]), None)

    def protect(self, sid: int, target: str) -> None:
        if target in self.protected:
            self.block_space(sid, f"{target} is protected")

    def conv(self, node: fx.Node, module: nn.Module, x: Any, target: str) -> Any:
        rank = len(self.graph.shape(node))
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if depthwise:
            if isinstance(x, Layout) and x.axis == 1:
                self.add_members(x, DEPTHWISE, target, node, 0)
                return x
            self.block(x, f"{node.name}: depthwise conv over an untracked axis")
            sid = self.new_space(module.out_channels, target)
            self.block_space(sid, f"{node.name}: depthwise conv on an input whose channels are not tracked")
            return Layout(1, [Seg(sid, module.out_channels)])
        sid = self.new_space(module.out_channels, target)
        self.protect(sid, target)
        if module.groups > 1:
            self.block(x, f"{node.name}: grouped conv (groups={module.groups})")
            self.block_space(sid, f"{node.name}: grouped conv (groups={module.groups})")
        elif isinstance(x, Layout):
            if x.axis != 1:
                self.block(x, f"{node.name}: conv input tracked on axis {x.axis}, not channels")
            else:
                self.add_members(x, IN, target, node, 1)
        self.members[sid].append(Member(OUT, target, node.name, 0))
        return Layout(1 if rank > 1 else 0, [Seg(sid, module.out_channels)])

    def linear(self, node: fx.Node, module: nn.Linear, x: Any, target: str) -> Any:
        rank = len(self.graph.shape(node))
        if isinstance(x, Layout):
            if x.axis != rank - 1:
                self.block(x, f"{node.name}: linear input tracked on axis {x.axis}, not features")
            else:
                self.add_members(x, IN, target, node, 1)
        sid = self.new_space(module.out_features, target)
        self.protect(sid, target)
        self.members[sid].append(Member(OUT, target, node.name, 0))
        return Layout(rank - 1, [Seg(sid, module.out_features)])

    # -- functions and methods -------------------------------------------------------
    def visit_function(self, node: fx.Node, kind: OpKind) -> Any:
        target = node.target
        name = getattr(target, "__name__", str(target))
        if kind == OpKind.SHAPE:
            return None
        if kind in (OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.IDENTITY):
            if node.op == "call_method" and target == "masked_fill":
                return self.elementwise(node, [node.args[0], node.args[1]])
            if kind == OpKind.IDENTITY:
                return self.arg_value(node.args[0])
            return self.elementwise(node, list(node.args) + list(node.kwargs.values()))
        if kind == OpKind.POOL:
            x = self.arg_value(node.args[0])
            return x if isinstance(x, Layout) else None
        if kind == OpKind.CONCAT and name in ("cat", "concat"):
            return self.concat(node)
        if kind == OpKind.INDEX:
            return self.index(node)
        if kind == OpKind.RESHAPE:
            return self.reshape(node, name)
        if kind == OpKind.PERMUTE:
            return self.permute(node, name)
        if kind == OpKind.REDUCE:
            return self.reduce(node)
        if kind == OpKind.SOFTMAX:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self.softmax(node, self.arg_value(node.args[0]), dim)
        for arg in node.all_input_nodes:
            self.block(self.values.get(arg), f"{node.name}: {name} ({kind.value}) is not understood by the "
                                             "channel analysis")
        return None

    def elementwise(self, node: fx.Node, operands: list) -> Any:
        out_shape = self.graph.shape(node)
        if not isinstance(out_shape, tuple):
            for a in operands:
                self.block(self.arg_value(a), f"{node.name}: non-tensor result")
            return None
        rank = len(out_shape)
        result: Layout | None = None
        others = []
        for a in operands:
            if not isinstance(a, fx.Node):
                continue
            v = self.values.get(a)
            if isinstance(v, Layout):
                v = v.moved(v.axis + rank - len(self.graph.shape(a)))
                if result is None:
                    result = v
                else:
                    result = self.unify(node, result, v)
            else:
                others.append((a, v))
        if result is None:
            return None
        for a, v in others:
            a_shape = v.shape if isinstance(v, ParamRef) else self.graph.shape(a)
            if not isinstance(a_shape, tuple):
                continue
            axis = result.axis - (rank - len(a_shape))
            if axis < 0 or a_shape[axis] == 1:
                continue  # broadcast along the channels: nothing to cut
            if isinstance(v, ParamRef):
                self.add_members(result, PARAM, v.target, node, axis)
            else:
                self.block(result, f"{node.name}: combined with {a.name}, whose channels are not tracked")
        return result

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        if a.axis != b.axis or [(s.length, s.inner) for s in a.segs] != [(s.length, s.inner) for s in b.segs]:
            self.block(a, f"{node.name}: operands' channel layouts differ")
            self.block(b, f"{node.name}: operands' channel layouts differ")
            return a
        for sa, sb in zip(a.segs, b.segs):
            self.union(sa.space, sb.space, node.name)
        return a

    def concat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(self.graph.shape(node))
        dim = dim % rank
        values = [self.values.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        layouts = [v for v in values if isinstance(v, Layout)]
        if not layouts:
            return None
        axis = layouts[0].axis
        if any(l.axis != axis for l in layouts):
            for l in layouts:
                self.block(l, f"{node.name}: concatenated tensors track different axes")
            return None
        if dim != axis:  # concatenating along another axis: the inputs share their channels
            return self.elementwise(node, list(tensors))
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

    def index(self, node: fx.Node) -> Any:
        source, idx = node.args[0], node.args[1]
        value = self.arg_value(source)
        if isinstance(value, (list, tuple)):
            return value[idx] if isinstance(idx, int) and idx < len(value) else None
        if not isinstance(value, Layout):
            return None
        items = idx if isinstance(idx, tuple) else (idx,)
        axis, new_axis, consumed = value.axis, value.axis, 0
        in_rank = len(self.graph.shape(source))
        for pos, item in enumerate(items):
            if item is Ellipsis:
                rest = len(items) - pos - 1
                consumed = in_rank - rest
                continue
            if item is None:
                if consumed <= axis:
                    new_axis += 1
                continue
            if consumed == axis:
                if not (isinstance(item, slice) and item == slice(None)):
                    self.block(value, f"{node.name}: indexes into the channels")
                    return None
            elif consumed < axis and isinstance(item, int):
                new_axis -= 1
            elif not isinstance(item, (int, slice)):
                self.block(value, f"{node.name}: advanced indexing")
                return None
            consumed += 1
        return value.moved(new_axis)

    def flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Any:
        if not isinstance(x, Layout):
            return None
        in_shape = self.graph.shape(node.args[0])
        rank = len(in_shape)
        start, end = start % rank, end % rank
        if x.axis < start:
            return x
        if x.axis > end:
            return x.moved(x.axis - (end - start))
        if x.axis == start:
            return x.moved(start, math.prod(in_shape[start + 1:end + 1]))
        self.block(x, f"{node.name}: flatten puts channels inside a larger block")
        return None

    def reshape(self, node: fx.Node, name: str) -> Any:
        x = self.arg_value(node.args[0])
        if name in ("flatten",):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        if isinstance(x, ParamRef) and name == "expand":
            return x
        if not isinstance(x, Layout):
            return None
        in_shape, out_shape = self.graph.shape(node.args[0]), self.graph.shape(node)
        if name in ("contiguous", "expand") or in_shape == out_shape:
            return x if name != "expand" or len(in_shape) == len(out_shape) else \
                x.moved(x.axis + len(out_shape) - len(in_shape))
        # view / reshape / squeeze / unsqueeze / unflatten: find where the channel axis lands
        prefix = math.prod(in_shape[:x.axis])
        for j in range(len(out_shape)):
            if math.prod(out_shape[:j]) != prefix:
                continue
            if out_shape[j] == in_shape[x.axis]:
                result = x.moved(j)
            elif out_shape[j] % in_shape[x.axis] == 0 and \
                    math.prod(in_shape[x.axis:]) % out_shape[j] == 0 and all(s.inner == 1 for s in x.segs):
                result = x.moved(j, out_shape[j] // in_shape[x.axis])
            else:
                continue
            self.shape_literals(node, j, result)
            return result
        self.block(x, f"{node.name}: {name} splits or reorders the channels (e.g. into heads)")
        return None

    def shape_literals(self, node: fx.Node, out_axis: int, layout: Layout) -> None:
        """A literal size for the channel axis in view/reshape args must be rewritten on pruning."""
        sizes, packed = list(node.args[1:]), 0
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes, packed = list(sizes[0]), 1
        if out_axis < len(sizes) and isinstance(sizes[out_axis], int) and sizes[out_axis] != -1:
            for seg, offset in zip(layout.segs, layout.offsets()):
                self.add_member(seg, Member(SHAPE_ARG, "", node.name, out_axis, offset, seg.inner, packed))

    def permute(self, node: fx.Node, name: str) -> Any:
        x = self.arg_value(node.args[0])
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node))
        if name == "permute":
            dims = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
            dims = [d % rank for d in dims]
            return x.moved(dims.index(x.axis))
        d0, d1 = (node.args[1] % rank, node.args[2] % rank)
        return x.moved(d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis)

    def reduce(self, node: fx.Node) -> Any:
        x = self.arg_value(node.args[0])
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            self.block(x, f"{node.name}: reduces over every axis")
            return None
        dims = [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if x.axis in dims:
            self.block(x, f"{node.name}: reduces over the channels")
            return None
        return x if keepdim else x.moved(x.axis - sum(d < x.axis for d in dims))

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> Any:
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node))
        if dim is None or dim % rank == x.axis:
            self.block(x, f"{node.name}: softmax over the channels")
            return None
        return x


def _layouts(value: Any) -> list[Layout]:
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, (list, tuple)):
        return [l for v in value for l in _layouts(v)]
    return []


def channel_groups(graph: "Graph", protected: set[str] | frozenset[str] = frozenset()) -> ChannelPlan:
    """The channel groups of ``graph``; spaces produced by ``protected`` layers are blocked."""
    return _Analysis(graph, set(protected)).run()


@register_analysis("channel_groups")
def _channel_groups_analysis(graph: "Graph") -> ChannelPlan:
    return channel_groups(graph)

