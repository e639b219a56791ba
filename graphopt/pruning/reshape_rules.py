"""Channel rules of views: reshapes that keep, merge or grid the channel axis (heads), fused
q/k/v stacks, the size literals a pruned view must rewrite, and permutes."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

from torch import fx

from graphopt.ops import OpKind, op_name
from graphopt.pruning.groups import (SHAPE_ARG, Entry, Member, Merged, ParamRef, RuntimeSize, Stack, _entry,
                                     _landing)
from graphopt.pruning.index_rules import indexed_axes
from graphopt.pruning.rules import channel_rule
from graphopt.pruning.spaces import Layout, Seg, Unaligned


_SIZED_LIKE = ("expand_as", "reshape_as", "view_as")


class ReshapeRules:
    """Rules for reshape, permute and stacked (fused q/k/v) values (a mixin of ``ChannelAnalysis``)."""

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
        if name in ("expand", "expand_as", "broadcast_to"):
            out = x.shifted(len(out_shape) - len(in_shape))
        else:
            out = self.reshaped(node, x, in_shape, out_shape)
            if out is None and name not in _SIZED_LIKE:
                out = self.merged_into_batch(node, x, in_shape, out_shape, entries)
        if out is None:
            raise Unaligned(f"{name} splits or reorders the channels in a way the analysis does not follow")
        if isinstance(out, Merged):
            return out
        if name in _SIZED_LIKE:   # sizes read from another tensor: it must lose the same channels
            other = self.get(node.args[1]) if len(node.args) > 1 else None
            if not isinstance(out, Layout) or not isinstance(other, Layout):
                raise Unaligned(f"{name} takes its sizes from a tensor whose channels are not tracked")
            return self.unify(node, out, other)
        self.reshape_literals(out, entries)
        return out

    def reshape_literals(self, out: Layout | Stack, entries: list[Entry]) -> None:
        """The sizes a reshape writes for its channel axes shrink with them (a grid's, once
        decided whether it loses rows or columns)."""
        for layout in (out.items if isinstance(out, Stack) else (out,)):
            if layout.sub is None:
                self.literal(entries[layout.axis], layout.segs)
            else:
                self.grid_literals.append((layout, entries[layout.axis], entries[layout.sub], 1))

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
                    return self.interleaved(node, x, j, outs) or self.blocks(node, x, j, outs) or \
                        self.stack(node, x, j, outs)
            return None
        rows, cols = _landing(ins, outs, x.axis), _landing(ins, outs, x.sub)
        if rows is not None and cols is not None:
            return x.at(rows, cols)
        if rows is None and cols is not None and x.axis < x.sub:
            merged = self.merged_rows(x, ins, outs)
            if merged is not None:
                return merged.at(merged.axis, cols)
        if rows is not None and cols is None and x.axis < x.sub:
            widened = self.merged_columns(x, ins, outs, rows)
            if widened is not None:
                return widened
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

    def merged_rows(self, x: Layout, ins: tuple, outs: tuple) -> Layout | None:
        """The rows of a grid merged with the axes after them (grouped-query attention repeats each
        key/value head: ``x[:, :, None].expand(B, KV, n_rep, T, d).reshape(B, KV * n_rep, T, d)``):
        each row (head) spans ``n_rep`` rows of the result and stays whole."""
        prefix = math.prod(ins[:x.axis])
        for j in range(len(outs)):
            if math.prod(outs[:j]) != prefix:
                continue
            for end in range(x.axis + 2, x.sub + 1):
                if outs[j] == math.prod(ins[x.axis:end]):
                    repeat = math.prod(ins[x.axis + 1:end])
                    rows = self.as_rows(x)
                    return Layout(j, [Seg(s.space, s.length, s.inner * repeat) for s in rows.segs], x.sub, x.width)
        return None

    def merged_columns(self, x: Layout, ins: tuple, outs: tuple, rows: int) -> Layout | None:
        """The columns of a grid merged with the axes after them (EVA's interleaved rotary
        embedding: ``stack((-x[..., 1::2], x[..., ::2]), -1).reshape(x.shape)``): rows stay whole."""
        prefix = math.prod(ins[:x.sub])
        for j in range(rows + 1, len(outs)):
            if math.prod(outs[:j]) != prefix:
                continue
            for end in range(x.sub + 2, len(ins) + 1):
                if outs[j] == math.prod(ins[x.sub:end]):
                    grid = self.as_rows(x)
                    return Layout(rows, [Seg(s.space, s.length, s.inner // x.width * outs[j]) for s in grid.segs],
                                  j, outs[j])
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

    def interleaved(self, node: fx.Node, x: Layout, j: int, outs: tuple) -> Stack | None:
        """Heads outermost, q/k/v inside each (BLOOM: ``view(B, N, H, 3, d)``, then
        ``select(view, 3, i)``): a stack on axis ``j + 1`` whose entries share the head space,
        each head ``d`` wide in them and ``3 * d`` in the fused layer. Only where every use
        takes the stack apart on that axis; otherwise the view is read as ``stack`` reads it."""
        if len(outs) < j + 3 or outs[j] * outs[j + 1] * outs[j + 2] != x.positions or outs[j + 1] < 2:
            return None
        rank, axis = len(outs), j + 1
        for user in node.users:
            name = op_name(user)
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
            if not (name in ("select", "unbind") and isinstance(dim, int) and dim % rank == axis):
                return None
        count, width = outs[j + 1], outs[j + 2]
        heads = self.spaces.blocks(x.segs, count * width)
        item = Layout(j, [Seg(s.space, s.length, s.inner // count) for s in heads], j + 2, width)
        self.grids.append((node.name, item))
        return Stack(axis, (item,) * count)

    def blocks(self, node: fx.Node, x: Layout, j: int, outs: tuple) -> Layout | None:
        """The channels cut into ``outs[j]`` equal blocks, block ``i`` laid over the axes after
        ``j`` at index ``i`` (Falcon's grouped-query ``view(B, T, KV, n_rep + 2, d)``: each
        key/value head with its queries, key and value): blocks go whole, so axis ``j`` carries
        them. Only where every use slices or gathers along later axes; a use that takes axis
        ``j`` apart (q/k/v stacked there) reads the view as ``stack`` does."""
        if not node.users or math.prod(outs[j + 1:]) * outs[j] != x.positions:
            return None
        rank = len(outs)
        for user in node.users:
            axes = indexed_axes(user, rank)
            if axes is None or min(axes, default=j) <= j:
                return None
        block = x.positions // outs[j]
        return Layout(j, [Seg(s.space, s.length, s.inner // block) for s in self.spaces.blocks(x.segs, block)])

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
        if name in ("expand", "broadcast_to"):
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
        if name in ("view", "reshape", "expand", "broadcast_to", "_unsafe_view"):
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


# -- registrations ------------------------------------------------------------------------
@channel_rule(kind=OpKind.RESHAPE)
def _reshape(a, node: fx.Node) -> Any:
    return a.reshape(node, op_name(node))


@channel_rule(kind=OpKind.PERMUTE)
def _permute(a, node: fx.Node) -> Any:
    return a.permute(node, op_name(node))
