"""Channel rules of attention: batched matmuls, einsum and scaled_dot_product_attention see
heads as a batch axis, so the heads of every operand are united and stay whole."""
from __future__ import annotations

from typing import Any

from torch import fx

from graphopt.pruning.groups import PARAM, ParamRef, Uniform, _positions, _swap_last
from graphopt.pruning.rules import channel_rule
from graphopt.pruning.spaces import Layout, Unaligned


class AttentionRules:
    """Rules for matmul, einsum and attention (a mixin of ``ChannelAnalysis``)."""

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
        """Unite the heads of every operand ``(layout, its rank, contracted axis, kept axis)``;
        the result carries them on the shared batch axis."""
        positions, kept = [], None
        for layout, rank, contracted, keeps in operands:
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
        on_rows = [v for v, src, _, _ in tracked if v.sub is None and v.axis >= len(self.graph.shape(src)) - 2]
        if on_rows and len(on_rows) == len(tracked):
            return self.matrix_channels(node, a, b, la, lb, out_rank)
        out = self.attend(node, [(v, len(self.graph.shape(src)), c, k) for v, src, c, k in tracked], out_rank)
        if len(tracked) == 1:
            self.untracked_heads(node, b if isinstance(la, Layout) else a, out.axis, out_rank)
        return out

    def matrix_channels(self, node: fx.Node, a: Any, b: Any, la: Any, lb: Any, out_rank: int) -> Any:
        """Channels on the matrix axes of a matmul (EfficientViT's ``v @ attn.T``, its ``q.T @ k``):
        rows of ``a`` or columns of ``b`` pass to the output's rows or columns; channels the
        product sums over are blocked (removing one changes every product, which zeroing the
        layers that read the output cannot reproduce)."""
        ra, rb = len(self.graph.shape(a)), len(self.graph.shape(b))
        kept = []
        for layout, rank, contracted, out_axis in ((la, ra, ra - 1, out_rank - 2), (lb, rb, rb - 2, out_rank - 1)):
            if not isinstance(layout, Layout):
                continue
            if layout.axis == contracted:
                self.block(layout, f"{node.name}: a matmul sums over these channels")
            else:
                kept.append(Layout(out_axis, layout.segs))
        if len(kept) > 1:
            raise Unaligned("both operands of a matmul keep channels")
        return kept[0] if kept else None

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
        ranks = [len(self.graph.shape(t)) for t in (q, k, v)]
        out = self.attend(node, [(layouts[0], ranks[0], -1, -2), (layouts[1], ranks[1], -1, None),
                                 (layouts[2], ranks[2], -2, -1)], out_rank)
        m = self.get(mask)
        if isinstance(m, ParamRef) and isinstance(self.graph.shape(mask), tuple):
            at = out.axis - (out_rank - len(self.graph.shape(mask)))
            if at >= 0 and m.axes[at] is not None:   # a relative-position bias table (BEiT): its head columns
                heads = _positions(self.as_rows(out)) if out.sub is not None else out
                self.add_members(Layout(at, heads.segs), PARAM, m.target, node, m.axes[at])
                return out
        if isinstance(m, Uniform) and isinstance(self.graph.shape(mask), tuple):
            entry = m.entry(out.axis - (out_rank - len(self.graph.shape(mask))))
            if entry is not None:   # the same value for every head (T5's masked zeros): its size follows
                heads = _positions(self.as_rows(out)) if out.sub is not None else out
                self.uniform_literal(entry, heads.segs)
                return out
        if isinstance(m, Layout):
            m = m.shifted(out_rank - len(self.graph.shape(mask)))
            if m.sub is not None or m.axis != out.axis:
                raise Unaligned("the attention mask carries other channels")
            self.spaces.align(_positions(self.as_rows(out)).segs if out.sub is not None else out.segs, m.segs)
        elif isinstance(mask, fx.Node):
            self.untracked_heads(node, mask, out.axis, out_rank)
        return out


# -- registrations ------------------------------------------------------------------------
@channel_rule(op=("matmul", "bmm"))
def _matmul(a, node: fx.Node) -> Any:
    return a.matmul(node)


@channel_rule(op="einsum")
def _einsum(a, node: fx.Node) -> Any:
    return a.einsum(node)


@channel_rule(op="scaled_dot_product_attention")
def _sdpa(a, node: fx.Node) -> Any:
    return a.sdpa(node)
