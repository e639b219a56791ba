"""What the channel analysis produces and the values it tracks: channel groups and their
members (every place a channel space lives, and what pruning it cuts), and the helpers the
rule modules share."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx

from graphopt.ops import op_name
from graphopt.pruning.spaces import Layout, Seg

# Member roles: where a channel space lives and what pruning it cuts.
OUT, IN, DEPTHWISE, NORM, PARAM, EMBED, SHAPE_ARG = "out", "in", "depthwise", "norm", "param", "embed", "shape_arg"
HEADS = "heads"  # whole attention heads: q/k/v rows of in_proj (inner = head_dim)
SPLIT = "split"  # the size of one output of a split/chunk along the channels
SLICE = "slice"  # a bound (``target``: "start" or "stop") of a slice object indexing the channels
SIZE_READ = "size_read"  # ``node`` reads the channels' width at run time; pruned, it becomes the traced ``size``
MEAN = "mean"    # a mean over the channels (``node``); pruned, it divides by the traced count (``size``)

Entry = tuple[Any, Any]  # (literal int or None, (node name, arg index, element index or -1) or None)


@dataclass(frozen=True)
class Stack:
    """A tensor axis whose entries hold different channels: fused q/k/v viewed as
    ``reshape(B, N, 3, H, d)``. Entry ``i`` carries ``items[i]``, a layout over the other axes
    (numbered as in the whole tensor). Permutes move it; ``unbind`` or an integer index on its
    axis takes it apart; any other op blocks it."""

    axis: int
    items: tuple


@dataclass(frozen=True)
class Merged:
    """Channels on an axis merged with the axes before it: heads folded into the batch
    (``q.transpose(1, 2).reshape(B * H, T, d)``, then ``bmm``). The tensor is its *unmerged
    view* ``shape`` (one axis more: axes ``axis`` and ``axis + 1`` of it make axis ``axis`` of
    the tensor) reshaped, and ``layout`` places the channels in that view, on axis ``axis + 1``.
    Batched matmuls, ops that treat every batch entry alike and reshapes follow it (a reshape
    of the tensor is a reshape of the view); any other op blocks it."""

    axis: int
    shape: tuple
    layout: Any

    @property
    def outer(self) -> int:
        return self.shape[self.axis]


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
class Uniform:
    """A tensor whose values do not change along some axes, each sized by a literal the graph
    writes (T5's ``zeros((1, heads, q, k))`` position bias, then masked): combined with tracked
    channels along such an axis, it is cut by shrinking that literal. ``axes`` maps an axis to
    its literal's entry."""

    shape: tuple
    axes: tuple = ()   # ((axis, entry), ...)

    def entry(self, axis: int) -> Entry | None:
        return dict(self.axes).get(axis)


@dataclass(frozen=True)
class ParamParts:
    """Constants laid side by side along one axis (``torch.cat((q_bias, k_bias, v_bias))``, BEiT's
    and EVA's qkv bias): ``parts`` are (constant, its length, the constant's axis) in order."""

    axis: int
    parts: tuple
    shape: tuple


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
    tensors: tuple[str, ...] = ()   # the module's tensors cut on ``axis``, where not the role's usual ones


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
    if isinstance(value, Merged):
        return _layouts(value.layout)
    if isinstance(value, (list, tuple)):
        return [l for v in value for l in _layouts(v)]
    return []


def blocking_summary(groups, top: int = 5) -> str:
    """The reasons groups are blocked, most frequent first, with how many groups each blocks and
    an example node: 'cummax (unknown) is not understood ... (3 groups, e.g. at cummax_2)'."""
    counts: Counter = Counter()
    example: dict[str, str] = {}
    for group in groups:
        for reason in dict.fromkeys(group.blocked):
            node, sep, what = reason.partition(": ")
            what = what if sep and " " not in node else reason
            counts[what] += 1
            example.setdefault(what, node if sep and " " not in node else "")
    parts = [f"{what} ({n} group{'s' if n > 1 else ''}{f', e.g. at {example[what]}' if example[what] else ''})"
             for what, n in counts.most_common(top)]
    more = len(counts) - top
    return "blocking: " + "; ".join(parts) + (f"; and {more} other reason{'s' if more > 1 else ''}" if more > 0 else "")


def _size_reads(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """(node holding the size, axis read) for a shape op: ``x.size(d)`` / ``sym_size(x, d)``
    itself, or the integer items taken from ``x.shape`` / ``x.size()``."""
    dim = node.args[1] if len(node.args) > 1 and op_name(node) != "getattr" else node.kwargs.get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool):
        return [(node, dim)]
    if dim is not None:
        return []
    return [(user, user.args[1]) for user in node.users
            if op_name(user) in ("getitem", "__getitem__") and len(user.args) > 1
            and isinstance(user.args[1], int) and not isinstance(user.args[1], bool)]
