"""Channel rules of indexing: gathers from constants, integer and slice indices, ``narrow``
and ``select``; a slice of the channels keeps its range and rewrites its bounds; a slice of the
columns of a grid (within each head) keeps whole rows."""
from __future__ import annotations

from typing import Any, Callable

from torch import fx

from graphopt.ops import OpKind, op_name
from graphopt.pruning.groups import SHAPE_ARG, SLICE, Member, ParamRef
from graphopt.pruning.rules import channel_rule
from graphopt.pruning.spaces import Layout, Seg, Unaligned


class IndexRules:
    """Rules for indexing ops (a mixin of ``ChannelAnalysis``)."""

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
            if dim % rank == value.sub:
                return self.grid_columns(value, self.graph.shape(node)[dim % rank])
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
        mapping, in_axis, out_axis, ranged, columns = {}, 0, 0, None, None
        lists = sum(map(_int_list, items))   # one axis gathered by a list of positions passes
        for element, item in zip(where, items):
            if item is None:
                out_axis += 1
                continue
            if isinstance(item, int) and not isinstance(item, bool):
                if in_axis in value.axes():
                    raise Unaligned("indexes into the channels")
                in_axis += 1
                continue
            if _int_list(item) and in_axis not in value.axes() and lists == 1:
                item = slice(None)   # one axis gathered by a list of positions (Falcon's ``qkv[..., [-2]]``)
            if not isinstance(item, slice):
                raise Unaligned("advanced indexing")
            if in_axis in value.axes() and item != slice(None):
                if in_axis == value.sub:
                    columns = (in_axis, out_axis)
                elif in_axis != value.axis or element is None:
                    raise Unaligned("indexes into the channels")
                else:
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
        if columns is not None:
            value = self.grid_columns(value, self.graph.shape(node)[columns[1]])
        return value.mapped(mapping.__getitem__) if value is not None else None

    def gather(self, node: fx.Node) -> Any:
        """``aten.index.Tensor(x, [None, .., idx])``: one axis gathered by a 1-D index tensor,
        the others whole (torch.export's ``x[..., [k]]``). Channels on other axes pass."""
        value = self.get(node.args[0])
        if not isinstance(value, Layout):
            return None
        gathered = sorted(indexed_axes(node, len(self.graph.shape(node.args[0]))))
        shape = self.graph.shape(node.args[1][gathered[0]]) if len(gathered) == 1 else None
        if not (isinstance(shape, tuple) and len(shape) == 1):
            raise Unaligned("advanced indexing over several axes or with a multi-dimensional index")
        if gathered[0] in value.axes():
            raise Unaligned("gathers along the channels")
        return value

    def grid_columns(self, x: Layout, width: int) -> Layout:
        """``width`` of the columns of every row of a grid (rotary embeddings take ``q[..., :d // 2]``,
        GPT-J every other column): rows (heads) become the unit and pass through whole, narrower.
        Pruning removes whole rows only, so the bounds, literal or computed, stay as they are."""
        if not isinstance(width, int):
            raise Unaligned("slices the columns of a grid of channels to a size not known")
        if width == 0:   # an empty tensor carries no channels (Phi-3's ``q[..., rotary_dim:]`` at full rotary)
            return None
        rows = self.as_rows(x)
        return Layout(rows.axis, [Seg(s.space, s.length, s.inner // x.width * width) for s in rows.segs],
                      rows.sub, width)

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


def _int_list(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(i, int) and not isinstance(i, bool) for i in item)


def indexed_axes(node: fx.Node, rank: int) -> set[int] | None:
    """The axes a slice or gather ``node`` narrows (None: not such an op, or not known)."""
    name = op_name(node)
    if name == "slice" and len(node.args) > 1 and isinstance(node.args[1], int):
        return {node.args[1] % rank}
    if name == "index" and isinstance(node.args[1], (list, tuple)):   # aten.index.Tensor(x, [None, .., idx])
        return {i for i, item in enumerate(node.args[1]) if item is not None}
    if name in ("getitem", "__getitem__"):
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(item is None or item is Ellipsis for item in items):
            return None
        return {i for i, item in enumerate(items) if item != slice(None)}
    return None


# -- registrations ------------------------------------------------------------------------
@channel_rule(kind=OpKind.INDEX)
def _index(a, node: fx.Node) -> Any:
    return a.index(node, op_name(node))


@channel_rule(op="index")
def _gather(a, node: fx.Node) -> Any:
    return a.gather(node)
