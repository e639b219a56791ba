"""Channel rules of ops that carry channels through unchanged or side by side: elementwise
ops and broadcasting constants, concat and split, reductions, softmax, pooling and padding."""
from __future__ import annotations

from typing import Any

from torch import fx

from graphopt.ops import OpKind, op_name
from graphopt.pruning.groups import (EMBED, MEAN, PARAM, SHAPE_ARG, SLICE, SPLIT, Member, ParamParts, ParamRef, Uniform,
                                     _entry, _positions)
from graphopt.pruning.rules import channel_rule
from graphopt.pruning.spaces import Layout, Seg, Unaligned


class ElementwiseRules:
    """Rules for elementwise, concat/split, reduce, softmax and pool ops (a mixin of ``ChannelAnalysis``)."""

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
            return self.uniform(node, others, out_shape)
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
            if isinstance(v, Uniform) and v.entry(result.axis - lead) is not None:
                self.uniform_literal(v.entry(result.axis - lead), result.segs)
            elif isinstance(v, ParamRef) and v.axes[result.axis - lead] is not None:
                self.add_members(result, PARAM, v.target, node, v.axes[result.axis - lead])
            elif isinstance(v, ParamParts) and v.axis == result.axis - lead:
                result = self.param_parts(node, result, v)
            elif isinstance(v, ParamRef):
                self.block(result, f"{node.name}: combined with {a.name}, a constant whose slices along "
                                   "the channels the analysis does not follow")
            else:
                self.block(result, f"{node.name}: combined with {a.name}, whose channels are not tracked")
        return result

    def param_parts(self, node: fx.Node, result: Layout, value: ParamParts) -> Layout:
        """Each constant of a concatenation is cut with its own range of the channels."""
        bounds = [0]
        for _, size, _ in value.parts:
            bounds.append(bounds[-1] + size)
        ranges: list[list[Seg]] = [[] for _ in value.parts]
        at = 0
        for seg in self.spaces.cut(result.segs, set(bounds[1:-1])):
            ranges[next(i for i in range(len(value.parts)) if at < bounds[i + 1])].append(seg)
            at += seg.positions
        for (target, _, axis), segs in zip(value.parts, ranges):
            self.add_members(Layout(result.axis, segs), PARAM, target, node, axis)
        return self.spaces.layout(result)

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        for plain, grid in ((a, b), (b, a)):
            if plain.sub is None and grid.sub is not None and grid.sub == plain.axis and grid.axis != plain.axis:
                if self.only_tables(plain):
                    # an embedding table's columns given to every row (RoFormer's rotary sin/cos, one
                    # table for every head): the table stays whole, so the rows (heads) can go
                    self.block(plain, f"{node.name}: a table's columns serve every row of a grid of channels")
                    return self.as_rows(grid)
                # the same channels in every row (SKNet: features stacked per path, times attention over
                # the paths): the grid loses the same columns in every row
                self.spaces.align(self.spaces.columns(grid.segs, grid.width), plain.segs)
                return self.spaces.layout(plain)
        if a.sub is not None and (a.axis, a.sub) == (b.axis, b.sub) and a.width != b.width and 1 in (a.width, b.width):
            wide, narrow = (a, b) if b.width == 1 else (b, a)   # one value per row, broadcast along the columns
            rows = self.as_rows(wide)
            self.spaces.align(_positions(rows).segs, narrow.segs)
            return self.spaces.layout(rows)
        if (a.axis, a.sub, a.width) != (b.axis, b.sub, b.width):
            self.block(a, f"{node.name}: operands' channel layouts differ")
            self.block(b, f"{node.name}: operands' channel layouts differ")
            return a
        self.spaces.align(a.segs, b.segs)
        return self.spaces.layout(a)

    def only_tables(self, layout: Layout) -> bool:
        """Whether the channels of ``layout`` live only in embedding tables and the views taken of
        them (no layer computes or reads them)."""
        members = [m for seg in self.spaces.resolve_segs(layout.segs) for m in self.spaces.members[seg.space]]
        return any(m.role == EMBED for m in members) and all(m.role in (EMBED, SPLIT, SLICE, SHAPE_ARG)
                                                             for m in members)

    def concat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(self.graph.shape(node))
        dim = dim % rank
        # an empty tensor adds nothing (Phi-3 joins a rotary half with an empty remainder)
        tensors = [t for t in tensors if not (isinstance(t, fx.Node) and isinstance(self.graph.shape(t), tuple)
                                               and len(self.graph.shape(t)) == rank and self.graph.shape(t)[dim] == 0)]
        values = [self.get(t) for t in tensors]
        layouts = [v for v in values if isinstance(v, Layout)]
        if not layouts:
            return self.concat_params(node, values, dim)
        axis = layouts[0].axis
        if any(l.axis != axis for l in layouts):
            for l in layouts:
                self.block(l, f"{node.name}: concatenated tensors track different axes")
            return None
        if all(dim not in l.axes() for l in layouts):  # along another axis: the inputs share their channels
            return self.elementwise(node, list(tensors))
        if any(l.sub is not None for l in layouts):
            return self.concat_columns(node, values, dim)
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

    def concat_params(self, node: fx.Node, values: list, dim: int) -> ParamParts | None:
        """Constants concatenated along an axis each keeps intact (a qkv bias made of three)."""
        if not values or not all(isinstance(v, ParamRef) and v.axes[dim] is not None for v in values):
            return None
        return ParamParts(dim, tuple((v.target, v.shape[dim], v.axes[dim]) for v in values), self.graph.shape(node))

    def concat_columns(self, node: fx.Node, values: list, dim: int) -> Layout:
        """Grids side by side along their columns (rotary embeddings: ``cat((-x2, x1), -1)``): row
        ``r`` of every input is the same head, so rows are united and stay whole."""
        if not all(isinstance(v, Layout) and v.sub == dim for v in values) \
                or len({(v.axis, v.rows) for v in values}) != 1:
            raise Unaligned("concatenates grids of channels")
        rows = [_positions(self.as_rows(v)) for v in values]
        for other in rows[1:]:
            self.spaces.align(rows[0].segs, other.segs)
        width = sum(v.width for v in values)
        return Layout(values[0].axis, [Seg(s.space, s.length, s.inner * width)
                                       for s in self.spaces.resolve_segs(rows[0].segs)], dim, width)

    def stacked_inputs(self, node: fx.Node) -> Any:
        """``torch.stack``: the inputs share their channels (as an elementwise op's operands do),
        laid along a new axis ``dim``."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim %= len(self.graph.shape(node))
        values = [self.get(t) for t in tensors]
        layouts = [v for v in values if isinstance(v, Layout)]
        if not layouts:
            return None
        if len(layouts) < len(values):
            for layout in layouts:
                self.block(layout, f"{node.name}: stacked with tensors whose channels are not tracked")
            return None
        result = layouts[0]
        for other in layouts[1:]:
            result = self.unify(node, result, other)
        return result.mapped(lambda a: a + (a >= dim))

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
        sizes = [s[dim] for s in shapes]
        if x.sub is not None and dim == x.sub:   # columns of every row (rotary: ``x.chunk(2, -1)``)
            return tuple(self.grid_columns(x, size) for size in sizes)
        if x.sub is not None:
            raise Unaligned("splits a grid of channels")
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

    def reduce(self, node: fx.Node) -> Any:
        x = self.get(node.args[0])
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node.args[0]))
        at = 2 if op_name(node) in ("norm", "linalg_vector_norm") else 1   # norm(x, p, dim, keepdim)
        dims = node.args[at] if len(node.args) > at else node.kwargs.get("dim")
        keepdim = node.args[at + 1] if len(node.args) > at + 1 else node.kwargs.get("keepdim", False)
        if dims is None or dims == []:
            self.block(x, f"{node.name}: reduces over every axis")
            return None
        dims = _axes(dims, rank)
        if x.sub is not None and x.axis in dims and x.sub not in dims:   # over the rows of a grid
            x = Layout(x.sub, self.spaces.columns(x.segs, x.width))      # every row loses the same columns
        if x.axis in dims:
            if op_name(node) == "mean" and dims == {x.axis} and x.sub is None:
                if self.zeros.get(node.args[0], False):   # RMSNorm, global response norm
                    for seg, offset in zip(x.segs, x.offsets()):
                        self.spaces.add_member(seg, Member(MEAN, "", node.name, x.axis, offset, size=x.positions))
                    return None
                self.block(x, f"{node.name}: mean over the channels of a tensor that is not zero where "
                              "its channels are removed")
                return None
            self.block(x, f"{node.name}: reduces over the channels")
            return None
        if x.sub is not None and x.sub in dims:  # within each row: rows stay whole, the columns are gone
            rows = _positions(self.as_rows(x))
            # kept as a grid of one column where the axis stays (per-head RMSNorm: x * rsqrt(mean(x^2)))
            x = Layout(rows.axis, rows.segs, x.sub, 1) if keepdim else rows
        if not keepdim:
            x = x.mapped(lambda a: a - sum(d < a for d in dims))
        out = self.graph.shape(node)
        return (x, x) if out and isinstance(out[0], tuple) else x  # max/min(dim): values and indices

    def uniform_literal(self, entry: Any, segs: list) -> None:
        """The literal sizing a uniform tensor shrinks with the channels it meets. Met again by
        other channels (T5 hands one masked bias to every layer), those are the same channels:
        the layers lose the same heads, and the literal shrinks once."""
        first = self.uniform_uses.setdefault(entry[1], segs)
        if first is segs:
            self.literal(entry, segs)
        else:
            self.spaces.align(first, segs)

    def uniform(self, node: fx.Node, operands: list, out_shape: tuple) -> Uniform | None:
        """Untracked operands only: the result stays uniform along an axis where one operand is
        and every other is broadcast (size 1), as in ``where(mask[:, None], zeros, -inf)``."""
        found = [v for _, v in operands if isinstance(v, Uniform)]
        if len(found) != 1:
            return None
        rank, u = len(out_shape), found[0]
        others = [self.graph.shape(a) for a, v in operands if v is not u]
        if not all(isinstance(shape, tuple) for shape in others):
            return None
        axes = [(axis, entry) for axis, entry in ((a + rank - len(u.shape), e) for a, e in u.axes)
                if all(_size_at(shape, axis, rank) == 1 for shape in others)]
        return Uniform(out_shape, tuple(axes)) if axes else None

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> Any:
        if not isinstance(x, Layout):
            return None
        rank = len(self.graph.shape(node))
        if dim is not None and x.sub is not None and dim % rank == x.axis:   # over the rows of a grid
            self.spaces.columns(x.segs, x.width)                              # (SKNet's paths): columns stay
            return self.spaces.layout(x)
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

    def pad(self, node: fx.Node) -> Any:
        """F.pad / aten.pad / constant_pad_nd: each channel is padded on its own, so channels pass
        through unless the padding lengthens a channel axis (amounts, in pairs, from the last axis)."""
        x = self.get(node.args[0])
        if not isinstance(x, Layout):
            return None
        amounts = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        rank = len(self.graph.shape(node.args[0]))
        if not isinstance(amounts, (list, tuple)):
            raise Unaligned("pads by amounts computed at run time")
        # amounts read at run time (Swin's window padding) are fine on axes without channels
        padded = {rank - 1 - i // 2 for i, a in enumerate(amounts) if not isinstance(a, int) or a != 0}
        if padded & set(x.axes()):
            raise Unaligned("pads along the channels" if all(isinstance(a, int) for a in amounts)
                            else "pads the channels by amounts computed at run time")
        return x


def _axes(dims: Any, rank: int) -> set[int]:
    """An op's ``dim`` argument (one axis or several, negative counting from the end) as axes."""
    return {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}


def _size_at(shape: tuple, axis: int, rank: int) -> int:
    """The size a tensor of ``shape`` has on ``axis`` of a broadcast result of ``rank`` axes."""
    at = axis - (rank - len(shape))
    return shape[at] if at >= 0 else 1


# -- registrations ------------------------------------------------------------------------
@channel_rule(kind=(OpKind.ACTIVATION, OpKind.ELEMENTWISE))
def _elementwise(a, node: fx.Node) -> Any:
    if node.op == "call_method" and op_name(node) == "masked_fill":
        return a.elementwise(node, [node.args[0], node.args[1]])
    return a.elementwise(node, list(node.args) + list(node.kwargs.values()))


@channel_rule(kind=OpKind.IDENTITY)
def _identity(a, node: fx.Node) -> Any:
    return a.get(node.args[0])


@channel_rule(op="type_as")
def _type_as(a, node: fx.Node) -> Any:
    """``x.type_as(y)``: x's values in y's dtype; y lends nothing but its type."""
    return a.get(node.args[0])


@channel_rule(kind=OpKind.SHAPE)
def _shape(a, node: fx.Node) -> Any:
    return None


@channel_rule(kind=OpKind.POOL)
def _pool(a, node: fx.Node) -> Any:
    return a.pool(node, a.get(node.args[0]), op_name(node))


@channel_rule(op=("pad", "constant_pad_nd"))
def _pad(a, node: fx.Node) -> Any:
    return a.pad(node)


@channel_rule(op=("interpolate", "upsample", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                  "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "_upsample_nearest_exact2d",
                  "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"))
def _resize(a, node: fx.Node) -> Any:
    """Resizing (F.interpolate, upsampling) scales the spatial axes after batch and channels:
    each channel is resized on its own."""
    x = a.get(node.args[0])
    if not isinstance(x, Layout):
        return None
    if x.axes() != (1,):
        raise Unaligned("resizes along the channels")
    return x


@channel_rule(op=("cat", "concat"))
def _concat(a, node: fx.Node) -> Any:
    return a.concat(node)


@channel_rule(op="stack")
def _stack(a, node: fx.Node) -> Any:
    return a.stacked_inputs(node)


@channel_rule(op=("split", "split_with_sizes", "chunk", "unbind"))
def _split(a, node: fx.Node) -> Any:
    return a.split(node, op_name(node))


@channel_rule(kind=OpKind.REDUCE)
def _reduce(a, node: fx.Node) -> Any:
    return a.reduce(node)


@channel_rule(op=("zeros", "ones", "full"))
def _filled(a, node: fx.Node) -> Any:
    """A tensor filled with one value is uniform along every axis whose size is a literal."""
    sizes = node.args[0] if node.args else node.kwargs.get("size")
    if not isinstance(sizes, (list, tuple)):
        return None
    axes = tuple((i, _entry(v, (node.name, 0, i))) for i, v in enumerate(sizes)
                 if isinstance(v, int) and not isinstance(v, bool) and v > 1)
    return Uniform(tuple(a.graph.shape(node)), axes) if axes else None


@channel_rule(op="roll")
def _roll(a, node: fx.Node) -> Any:
    """``torch.roll(x, shifts, dims)`` along axes without channels (Swin's shifted windows)."""
    x = a.get(node.args[0])
    if not isinstance(x, Layout):
        return None
    rank = len(a.graph.shape(node))
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if dims is None or dims == []:
        raise Unaligned("rolls the flattened tensor")
    if _axes(dims, rank) & set(x.axes()):
        raise Unaligned("rolls along the channels")
    return x


@channel_rule(op="normalize")
def _normalize(a, node: fx.Node) -> Any:
    """``F.normalize(x, dim)``: within each row of a grid (Swin-V2's cosine attention over a head's
    width) the rows become the unit; over the channels themselves it would change with the cut."""
    x = a.get(node.args[0])
    if not isinstance(x, Layout):
        return None
    rank = len(a.graph.shape(node))
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 1) % rank
    if x.sub is not None and dim == x.sub:
        return a.as_rows(x)
    if dim in x.axes():
        a.block(x, f"{node.name}: normalize over the channels")
    return x


@channel_rule(kind=OpKind.SOFTMAX)
def _softmax(a, node: fx.Node) -> Any:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return a.softmax(node, a.get(node.args[0]), dim)
