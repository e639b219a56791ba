"""The space algebra under the channel analysis: refine, coarsen, align, rows and columns."""
import pytest

from graphopt.pruning.spaces import Seg, Spaces, Unaligned
from graphopt.pruning.channels import OUT, Member


def space(spaces, size, name):
    sid = spaces.new(size, [name])
    spaces.members[sid].append(Member(OUT, name, name))
    return sid


def test_a_refined_space_resolves_old_segments_to_its_parts():
    s = Spaces()
    a = space(s, 8, "a")
    first, second = s.refine(a, 3)
    assert s.resolve(Seg(a, 8)) == [Seg(first, 3), Seg(second, 5)]
    assert [(m.offset, m.inner) for m in s.members[second]] == [(3, 1)]
    assert s.names[second] == ["a[3:]"] and sorted(s.roots()) == [first, second]


def test_align_coarsens_the_finer_side():
    """4 units of 2 positions against 8 units of 1: the 8 are taken in pairs and united with the 4."""
    s = Spaces()
    x, y = space(s, 4, "x"), space(s, 8, "y")
    s.align([Seg(x, 4, 2)], [Seg(y, 8, 1)])
    (root,) = s.roots()
    assert s.size[root] == 4
    assert s.resolve(Seg(y, 8)) == [Seg(root, 4, 2)] and s.resolve(Seg(x, 4, 2)) == [Seg(root, 4, 2)]
    assert sorted((m.target, m.inner) for m in s.members[root]) == [("x", 1), ("y", 2)]


def test_align_cuts_at_the_other_sides_boundaries():
    s = Spaces()
    a, b, c = space(s, 3, "a"), space(s, 5, "b"), space(s, 8, "c")
    s.align([Seg(a, 3), Seg(b, 5)], [Seg(c, 8)])
    assert sorted(s.size[r] for r in s.roots()) == [3, 5]
    assert [(r.length, sorted(m.offset for m in s.members[r.space])) for r in s.resolve(Seg(c, 8))] == \
        [(3, [0, 0]), (5, [0, 3])]


def test_rows_and_columns_of_a_grid():
    s = Spaces()
    q = space(s, 12, "q")
    (heads,) = s.blocks([Seg(q, 12)], 4)            # 3 rows of 4: each unit is a whole row
    assert heads == Seg(s.find(q)[0], 3, 4) and s.is_rows([Seg(q, 12)], 4)
    a, b = space(s, 4, "a"), space(s, 4, "b")
    first_row = s.columns([Seg(a, 4), Seg(b, 4)], 4)   # a shuffle: both rows keep the same columns
    assert len(first_row) == 1 and s.is_columns([Seg(a, 4), Seg(b, 4)], 4)
    with pytest.raises(Unaligned, match="a block of 4 positions would mix channels of different layers"):
        s.blocks([Seg(space(s, 2, "c"), 2), Seg(space(s, 6, "d"), 6)], 4)
    with pytest.raises(Unaligned, match="cuts inside a unit of 4 positions"):
        s.cut([heads], {6})
