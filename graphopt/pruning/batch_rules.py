"""Channel rules of heads folded into the batch axis (``reshape(B * H, T, d)`` before ``bmm``,
as DeBERTa and older attention code write it): the heads stay whole and are followed on the
merged axis until a reshape unfolds them again."""
from __future__ import annotations

import math
from typing import Any

from torch import fx

from graphopt.ops import OpKind, op_name
from graphopt.pruning.groups import Entry, Merged, ParamRef, RuntimeSize, Stack, _size_reads
from graphopt.pruning.spaces import Layout, Seg, Unaligned

_VIEWS = ("contiguous", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze")
_ALIKE = (OpKind.ELEMENTWISE, OpKind.ACTIVATION, OpKind.IDENTITY)


def merged_shape(value: Merged) -> tuple:
    """The tensor's own shape: the unmerged view with its two merged axes as one."""
    j, view = value.axis, value.shape
    return view[:j] + (view[j] * view[j + 1],) + view[j + 2:]


class BatchRules:
    """Rules for tensors whose channel rows are merged into the batch (a mixin of ``ChannelAnalysis``)."""

    def merged_into_batch(self, node: fx.Node, x: Layout, ins: tuple, outs: tuple,
                          entries: list[Entry]) -> Merged | None:
        """The rows of ``x`` (heads) merged with the axes before them by a row-major reshape:
        the result is the reshape into the unmerged view, with axes ``j`` and ``j + 1`` joined."""
        for k in range(x.axis):
            prefix, outer = math.prod(ins[:k]), math.prod(ins[k:x.axis])
            for j in range(len(outs)):
                if outer < 2 or math.prod(outs[:j]) != prefix or outs[j] != outer * ins[x.axis]:
                    continue
                view = tuple(outs[:j]) + (outer, ins[x.axis]) + tuple(outs[j + 1:])
                inner = self.reshaped(node, x, ins, view)
                if isinstance(inner, Layout) and inner.axis == j + 1:
                    self.merged_literals(Merged(j, view, inner), entries)
                    return Merged(j, view, inner)
        return None

    def merged_literals(self, value: Merged, entries: list[Entry]) -> None:
        """The merged axis's written size shrinks by ``outer`` positions per position removed
        from the rows; a size computed at run time there (``bsz * heads``) cannot be rewritten."""
        j, layout = value.axis, value.layout
        merged = entries[j]
        if isinstance(merged[0], RuntimeSize):
            raise Unaligned("the size of heads folded into the batch is computed at run time")
        if layout.sub is None:
            self.literal(merged, [Seg(s.space, s.length, s.inner * value.outer) for s in layout.segs])
        else:
            columns = entries[layout.sub - 1] if layout.sub > j else entries[layout.sub]
            self.grid_literals.append((layout, merged, columns, value.outer))

    def merged_op(self, node: fx.Node, kind: OpKind) -> Any:
        """An op on a tensor with heads merged into its batch axis."""
        name = op_name(node)
        value = next(v for v in map(self.get, node.all_input_nodes) if isinstance(v, Merged))
        first = self.get(node.args[0]) if node.args else None
        if node.op == "call_module" or (kind not in _ALIKE and first != value):
            raise Unaligned(f"{name} on heads folded into the batch axis is not followed")
        if kind == OpKind.SHAPE:
            if any(dim % len(merged_shape(value)) == value.axis for _, dim in _size_reads(node)):
                raise Unaligned("reads the size of heads folded into the batch axis")
            return None
        if name in _VIEWS:
            return self.unmerged(node, name, value)
        if kind == OpKind.PERMUTE:
            return self.merged_permute(node, name, value)
        if name in ("matmul", "bmm"):
            return self.merged_matmul(node)
        if kind in _ALIKE or kind == OpKind.SOFTMAX:
            return self.merged_alike(node, kind, value)
        raise Unaligned(f"{name} on heads folded into the batch axis is not followed")

    def unmerged(self, node: fx.Node, name: str, value: Merged) -> Any:
        """A reshape of the tensor is a reshape of its unmerged view: the heads land where that
        puts them (their own axis again, or merged once more)."""
        if name == "contiguous":
            return value
        outs = self.graph.shape(node)
        entries = self.size_entries(node, name, len(outs))
        if entries is None:
            raise Unaligned(f"{name} sizes are computed in a way the analysis cannot rewrite")
        entries = [(RuntimeSize(outs[i]) if isinstance(v, fx.Node) else v, w) for i, (v, w) in enumerate(entries)]
        out = self.reshaped(node, value.layout, value.shape, outs)
        if out is None:
            out = self.merged_into_batch(node, value.layout, value.shape, outs, entries)
            if out is not None:
                return out
            raise Unaligned(f"{name} splits or reorders heads folded into the batch axis")
        self.reshape_literals(out, entries)
        return out

    def merged_permute(self, node: fx.Node, name: str, value: Merged) -> Merged:
        """The merged axis moves as one: its two axes of the view move together."""
        where = self.axis_map(node, name)
        j, rank = value.axis, len(value.shape) - 1
        to = where(j)

        def view_axis(v: int) -> int:   # an axis of the view, after the permute
            if v in (j, j + 1):
                return to + v - j
            moved = where(v if v < j else v - 1)
            return moved if moved < to else moved + 1

        shape = [0] * (rank + 1)
        for v, size in enumerate(value.shape):
            shape[view_axis(v)] = size
        return Merged(to, tuple(shape), value.layout.mapped(view_axis))

    def merged_matmul(self, node: fx.Node) -> Merged:
        """``bmm`` of two tensors with the same heads merged into the same batch axis: heads
        are a batch axis of the product, as in attention (see ``AttentionRules.attend``)."""
        a, b = (self.get(arg) for arg in node.args[:2])
        if not (isinstance(a, Merged) and isinstance(b, Merged) and a.axis == b.axis
                and a.shape[:a.axis + 2] == b.shape[:b.axis + 2]):
            raise Unaligned("matmul of heads folded into the batch with a tensor that does not carry them")
        out = self.graph.shape(node)
        j = a.axis
        if j >= len(out) - 2:
            raise Unaligned("heads folded into a matrix axis of a matmul")
        view = tuple(out[:j]) + a.shape[j:j + 2] + tuple(out[j + 1:])
        layout = self.attend(node, [(a.layout, len(a.shape), -1, -2), (b.layout, len(b.shape), -2, -1)], len(view))
        return Merged(j, view, layout)

    def merged_alike(self, node: fx.Node, kind: OpKind, value: Merged) -> Merged:
        """An op that treats every entry of the batch alike: other operands must not vary along
        the merged axis (a scale, a mask broadcast over heads); one varying along a grid's
        columns keeps the rows (heads) whole."""
        shape = merged_shape(value)
        if self.graph.shape(node) != shape:
            raise Unaligned(f"{op_name(node)} changes the shape of heads folded into the batch axis")
        rank, j, layout = len(shape), value.axis, value.layout
        if kind == OpKind.SOFTMAX:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if not isinstance(dim, int) or dim % rank == j:
                raise Unaligned("softmax over heads folded into the batch axis")
        columns = None if layout.sub is None else layout.sub - (layout.sub > j)
        seen = False
        for arg in node.all_input_nodes:
            other = self.get(arg)
            if other == value and not seen:   # the operand ``value`` came from
                seen = True
                continue
            if isinstance(other, Merged):
                if (other.axis, other.shape) != (value.axis, value.shape):
                    raise Unaligned("combines heads folded into the batch in different ways")
                layout = self.unify(node, layout, other.layout)
                continue
            if isinstance(other, (Layout, Stack)):
                raise Unaligned(f"combined with {arg.name}, whose channels lie on another axis")
            at = other.shape if isinstance(other, ParamRef) else self.graph.shape(arg)
            if not isinstance(at, tuple):
                continue
            lead = rank - len(at)
            if j >= lead and at[j - lead] != 1:
                raise Unaligned(f"combined with {arg.name}, which differs across the heads folded into the batch")
            if columns is not None and columns >= lead and at[columns - lead] != 1:
                layout = self.as_rows(layout)
        return Merged(j, value.shape, layout)
