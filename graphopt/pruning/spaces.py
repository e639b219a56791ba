"""The algebra under the channel analysis: channel *spaces* and the layouts that place them.

A space is a run of channels that pruning treats alike: whatever happens to unit ``c`` of
a space happens at every place the space lives (its members). A ``Layout`` says which
spaces lie, in order, along the tracked axis of a tensor. Three operations relate spaces:

- **union**: two spaces are the same channels (a residual add, GLU's two halves);
- **coarsen**: a space's channels are taken ``k`` at a time, so a unit is a block of ``k``
  (attention heads of ``head_dim`` channels, GroupNorm groups, channels a shuffle interleaves);
- **refine**: a space is cut into consecutive parts (split/chunk take index ranges).

Spaces are never edited in place: coarsening and refining create new spaces and leave
links behind, so a layout recorded earlier still *resolves* to the current spaces. Every
operation either succeeds exactly or raises ``Unaligned`` saying why the structure cannot
be expressed; the analysis then blocks the channels involved.

A grid layout (``sub`` set) describes a channel axis viewed as two axes, rows along
``axis`` and ``width`` positions along ``sub`` (``view(B, T, H, d)``): the flat position
``row * width + col`` is what the segments index. A grid is pruned either by whole rows
(heads: ``rows``) or by the same columns of every row (a shuffle: ``columns``).
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable


class Unaligned(Exception):
    """A layout cannot take the structure an op needs (the message says why)."""


@dataclass(frozen=True)
class Seg:
    """``length`` units of one space along an axis, each spread over ``inner`` positions."""

    space: int
    length: int
    inner: int = 1

    @property
    def positions(self) -> int:
        return self.length * self.inner


@dataclass
class Layout:
    """The tracked axis of a tensor and the spaces along it, in order (see the module doc for grids)."""

    axis: int
    segs: list[Seg]
    sub: int | None = None
    width: int = 1

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.segs)

    @property
    def rows(self) -> int:
        return self.positions // self.width

    def moved(self, axis: int, inner: int = 1) -> "Layout":
        """The channels on another axis, each now spread over ``inner`` times as many positions."""
        if self.sub is not None:
            raise Unaligned("a grid of channels cannot be moved as one axis")
        return Layout(axis, [Seg(s.space, s.length, s.inner * inner) for s in self.segs])

    def at(self, axis: int, sub: int | None) -> "Layout":
        """The same channels with the tracked axes renumbered (permute, broadcast, indexing)."""
        return Layout(axis, list(self.segs), sub, self.width)

    def mapped(self, where: Callable[[int], int]) -> "Layout":
        """The same channels, each tracked axis ``a`` moved to ``where(a)``."""
        return self.at(where(self.axis), None if self.sub is None else where(self.sub))

    def shifted(self, delta: int) -> "Layout":
        return self.mapped(lambda a: a + delta)

    def axes(self) -> tuple[int, ...]:
        return (self.axis,) if self.sub is None else (self.axis, self.sub)

    def offsets(self) -> list[int]:
        out, at = [], 0
        for s in self.segs:
            out.append(at)
            at += s.positions
        return out


@dataclass
class Spaces:
    """Union-find over spaces, with coarsening (links carry a factor) and refinement (parts)."""

    size: dict[int, int] = field(default_factory=dict)
    parent: dict[int, tuple[int, int]] = field(default_factory=dict)   # space -> (coarser space, k)
    parts: dict[int, list[int]] = field(default_factory=dict)          # refined space -> its parts
    names: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    members: dict[int, list[Any]] = field(default_factory=lambda: defaultdict(list))
    reasons: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))

    def new(self, size: int, names: list[str]) -> int:
        sid = len(self.size)
        self.size[sid] = size
        self.names[sid] = list(names)
        return sid

    def roots(self) -> list[int]:
        return [s for s in self.size if s not in self.parent and s not in self.parts]

    # -- resolving -------------------------------------------------------------------
    def find(self, sid: int) -> tuple[int, int]:
        """(the space ``sid`` now belongs to, channels of ``sid`` per unit of it)."""
        path, s = [], sid
        while s in self.parent:
            p, k = self.parent[s]
            path.append((s, k))
            s = p
        factor = 1
        for node, k in reversed(path):  # compress: point every visited space at the end
            factor *= k
            self.parent[node] = (s, factor)
        return s, factor

    def resolve(self, seg: Seg) -> list[Seg]:
        """The current root spaces ``seg`` stands for, in order."""
        space, k = self.find(seg.space)
        inner = seg.inner * k
        if space in self.parts:
            return [r for p in self.parts[space] for r in self.resolve(Seg(p, self.size[p], inner))]
        return [Seg(space, seg.length // k, inner)]

    def resolve_segs(self, segs: list[Seg]) -> list[Seg]:
        return [r for s in segs for r in self.resolve(s)]

    def layout(self, layout: Layout) -> Layout:
        return Layout(layout.axis, self.resolve_segs(layout.segs), layout.sub, layout.width)

    # -- recording -------------------------------------------------------------------
    def add_member(self, seg: Seg, member: Any) -> None:
        """``member`` is where ``seg`` lives (its ``offset``); its units take ``seg.inner`` positions each."""
        offset = member.offset
        for r in self.resolve(seg):
            self.members[r.space].append(replace(member, offset=offset, inner=r.inner))
            offset += r.positions

    def block(self, seg: Seg, reason: str) -> None:
        for r in self.resolve(seg):
            if reason not in self.reasons[r.space]:
                self.reasons[r.space].append(reason)

    # -- the three operations ----------------------------------------------------------
    def union(self, a: int, b: int) -> None:
        """Roots ``a`` and ``b`` (same size) are the same channels."""
        if a == b:
            return
        if self.size[a] != self.size[b]:
            raise Unaligned(f"joins {self.size[a]} with {self.size[b]} channels")
        self.parent[b] = (a, 1)
        self.names[a] += self.names.pop(b, [])
        self.members[a] += self.members.pop(b, [])
        self.reasons[a] += [r for r in self.reasons.pop(b, []) if r not in self.reasons[a]]

    def coarsen(self, root: int, k: int) -> int:
        """A root whose units are ``k`` units of ``root``."""
        if k == 1:
            return root
        if self.size[root] % k:
            raise Unaligned(f"{self.size[root]} channels do not split into blocks of {k}")
        coarse = self.new(self.size[root] // k, self.names.pop(root, []))
        self.parent[root] = (coarse, k)
        self.members[coarse] = [replace(m, inner=m.inner * k) for m in self.members.pop(root, [])]
        self.reasons[coarse] = self.reasons.pop(root, [])
        return coarse

    def refine(self, root: int, at: int) -> tuple[int, int]:
        """Cut ``root`` after ``at`` units into two roots."""
        n = self.size[root]
        names = self.names.pop(root, [])
        first = self.new(at, [f"{x}[:{at}]" for x in names])
        second = self.new(n - at, [f"{x}[{at}:]" for x in names])
        for m in self.members.pop(root, []):
            self.members[first].append(m)
            self.members[second].append(replace(m, offset=m.offset + at * m.inner))
        reasons = self.reasons.pop(root, [])
        self.reasons[first], self.reasons[second] = list(reasons), list(reasons)
        self.parts[root] = [first, second]
        return first, second

    # -- structures built from them ----------------------------------------------------
    def split_seg(self, seg: Seg, at: int) -> tuple[Seg, Seg]:
        """Cut a root segment ``at`` positions in."""
        if at % seg.inner:
            raise Unaligned(f"cuts inside a unit of {seg.inner} positions")
        first, second = self.refine(seg.space, at // seg.inner)
        return Seg(first, self.size[first], seg.inner), Seg(second, self.size[second], seg.inner)

    def _next(self, queue: deque) -> Seg:
        parts = self.resolve(queue.popleft())
        queue.extendleft(reversed(parts[1:]))
        return parts[0]

    def cut(self, segs: list[Seg], boundaries: set[int]) -> list[Seg]:
        """Resolved ``segs`` refined so that every position in ``boundaries`` starts a segment."""
        out, offset, queue = [], 0, deque(segs)
        while queue:
            s = self._next(queue)
            inside = sorted(b - offset for b in boundaries if offset < b < offset + s.positions)
            if inside:
                s, rest = self.split_seg(s, inside[0])
                queue.appendleft(rest)
            out.append(s)
            offset += s.positions
        return out

    def align(self, a: list[Seg], b: list[Seg]) -> None:
        """Two layouts of the same positions hold the same channels: unite them position by position."""
        qa, qb = deque(a), deque(b)
        while qa and qb:
            x, y = self._next(qa), self._next(qb)
            if x.positions > y.positions:
                x, rest = self.split_seg(x, y.positions)
                qa.appendleft(rest)
            elif y.positions > x.positions:
                y, rest = self.split_seg(y, x.positions)
                qb.appendleft(rest)
            self.join(x, y)
        if qa or qb:
            raise Unaligned("operands' channel layouts differ in length")

    def join(self, x: Seg, y: Seg) -> None:
        """Unite two root segments covering the same positions, coarsening the finer one."""
        if x.space == y.space:
            if x.inner != y.inner:
                raise Unaligned("channels meet themselves at a different stride")
            return
        whole = math.lcm(x.inner, y.inner)
        cx = self.coarsen(x.space, whole // x.inner)
        cy = self.coarsen(y.space, whole // y.inner)
        self.union(cx, cy)

    def blocks(self, segs: list[Seg], width: int) -> list[Seg]:
        """Coarsen so that every unit covers whole, aligned blocks of ``width`` positions."""
        out, offset = [], 0
        for s in self.resolve_segs(segs):
            if offset % width or s.positions % width:
                raise Unaligned(f"a block of {width} positions would mix channels of different layers")
            k = math.lcm(s.inner, width) // s.inner
            out.append(Seg(self.coarsen(s.space, k), s.length // k, s.inner * k))
            offset += s.positions
        return out

    def row_lists(self, segs: list[Seg], width: int) -> list[list[Seg]] | None:
        """The segments of each row when every segment lies inside one row, else None."""
        rows: list[list[Seg]] = []
        offset = 0
        for s in self.resolve_segs(segs):
            if offset % width == 0:
                rows.append([])
            if offset % width + s.positions > width:
                return None
            rows[-1].append(s)
            offset += s.positions
        return rows

    def is_rows(self, segs: list[Seg], width: int) -> bool:
        offset = 0
        for s in self.resolve_segs(segs):
            if offset % width or s.inner % width:
                return False
            offset += s.positions
        return True

    def is_columns(self, segs: list[Seg], width: int) -> bool:
        rows = self.row_lists(segs, width)
        return rows is not None and all(r == rows[0] for r in rows)

    def columns(self, segs: list[Seg], width: int) -> list[Seg]:
        """Unite every row with the first (a unit keeps its column in every row); the first row's segments."""
        total = sum(s.positions for s in segs)
        rows = self.row_lists(self.cut(segs, set(range(width, total, width))), width)
        if rows is None:
            raise Unaligned(f"a unit straddles rows of {width}")
        for row in rows[1:]:
            self.align(rows[0], row)
        return self.resolve_segs(rows[0])
