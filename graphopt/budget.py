"""One budget, and one solver that spreads it over what the compressing passes offer.

A **budget** is a share of the graph's cost to reach: ``Budget(macs=0.5)`` (half the
multiply-accumulates), ``Budget(params=0.3)``. Costs come from one model,
``graphopt.cost.CostModel``: the graph's cost, each layer's, and the cost after a proposed
change (a layer keeping part of its features, or replaced by low-rank factors).

The **solver** works on *items* (a layer, a channel group), each offering a sequence of
*steps*: a saving (in cost units, or channels) and the loss that comes with it (importance
removed, reconstruction error added).

* ``lower_hull(item, options)``: from an item's options (the first: the item unchanged),
  the steps along the lower convex hull of (saving, loss); along it the loss per unit saved
  only grows, so the item's steps are taken in order.
* ``allocate(steps, need)``: greedy by marginal ratio: steps of every item, least loss per
  unit saved first, until their savings reach ``need``. With savings that add up
  (``split_low_rank``: a layer's factors cost the same whatever else is split) this is the
  budget solver itself; on hull steps it is the optimum of the convex relaxation.
* ``least(choose, fits, hi)``: where savings do not add up (``prune_channels``: a layer
  loses MACs to both its input and its output group), the smallest setting of a monotone
  allocation whose cost, from the cost model, fits the budget (bisection).
* ``give_back(taken, offer, fits)``: then undo coarse steps, most valuable first, while
  the budget still holds (channel counts rounded to a multiple land under the budget).

``prune_channels`` (``target_macs`` / ``target_params``, uniform or global scope) and
``split_low_rank`` (``target_macs`` / ``target_params``) plan with these and the cost model.

**One budget across passes.** Both passes take the same budget options
(``Budget.options()``: ``{"target_macs": 0.5}``) and each meets its share of the graph it is
given, so ``split`` spreads one budget over a chain of passes, shares compounding to it::

    prune, factor = Budget(macs=0.5).split(0.6, 0.4)      # 0.5 ** 0.6 and 0.5 ** 0.4 of the MACs
    PassManager([PruneChannels(**prune.options()), SplitLowRank(**factor.options())]).run(graph)

The losses of different passes are not on one scale (channel importance, weight energy),
so the budget is spread by shares, not by one ranking across passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, TypeVar

from graphopt.cost import Cost
from graphopt.errors import ConfigError

KEYS = ("macs", "params")
T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """A share in (0, 1] of the graph's MACs or of its parameters: give exactly one."""

    macs: float | None = None
    params: float | None = None

    def __post_init__(self):
        given = [k for k in KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"Budget: give exactly one of {', '.join(KEYS)}"
                              + (f" (got {', '.join(given)})" if given else ""))
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"Budget: {given[0]} must be a share in (0, 1], got {value!r}")

    @classmethod
    def of(cls, key: str, share: float) -> "Budget":
        """``Budget.of("macs", 0.5) == Budget(macs=0.5)``."""
        if key not in KEYS:
            raise ConfigError(f"Budget: cost must be one of {', '.join(KEYS)}, got {key!r}")
        return cls(**{key: share})

    @property
    def key(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def share(self) -> float:
        return float(getattr(self, self.key))

    def options(self) -> dict[str, float]:
        """The budget as the options ``prune_channels`` and ``split_low_rank`` both take."""
        return {f"target_{self.key}": self.share}

    def fits(self, cost: Cost, base: Cost) -> bool:
        """Is ``cost`` within the budget's share of ``base``?"""
        return getattr(cost, self.key) / getattr(base, self.key) <= self.share

    def short(self, cost: Cost, base: Cost) -> float:
        """How much more must be saved from ``cost`` to fit (<= 0: it fits)."""
        return getattr(cost, self.key) - self.share * getattr(base, self.key)

    def split(self, *weights: float) -> list["Budget"]:
        """One budget per pass of a chain, weighted: shares ``share ** (w / sum(weights))``,
        whose product is this budget's share."""
        if not weights or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights) \
                or not sum(weights) > 0:
            raise ConfigError(f"Budget.split: weights must be non-negative numbers, not all zero, got {list(weights)}")
        total = sum(weights)
        return [Budget.of(self.key, self.share ** (w / total)) for w in weights]


class Option(NamedTuple):
    """One way to change one item: the cost it saves, the loss it brings, and what it is."""

    saving: float
    loss: float
    value: Any = None


class Step(NamedTuple):
    """A move of one item: the saving and the loss it adds to the item's previous step, and
    where it leads (an ``Option``'s value, a channel)."""

    item: Hashable
    saving: float
    loss: float
    value: Any = None

    @property
    def rate(self) -> float:
        """Loss per unit saved."""
        return self.loss / self.saving


def lower_hull(item: Hashable, options: list[Option]) -> list[Step]:
    """The steps along the lower convex hull of (saving, loss) of ``options``, starting at
    ``options[0]`` (the item unchanged: nothing saved, no loss). Options that save less than
    nothing are left out; of equal savings, the least loss stands."""
    best: dict[float, Option] = {}
    for p in options:
        if p.saving >= 0 and (p.saving not in best or p.loss < best[p.saving].loss):
            best[p.saving] = p
    hull: list[Option] = []
    for p in (best[s] for s in sorted(best)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b.saving - a.saving) * (p.loss - a.loss) - (b.loss - a.loss) * (p.saving - a.saving) > 0:
                break   # b lies strictly below the chord from a to p
            hull.pop()
        hull.append(p)
    return [Step(item, after.saving - before.saving, after.loss - before.loss, after.value)
            for before, after in zip(hull, hull[1:])]


def allocate(steps: Iterable[Step], need: float) -> tuple[dict[Hashable, list[Step]], float]:
    """Greedy by marginal ratio: take steps, least loss per unit saved first (of equal
    ratios the larger saving, then the order given), until their savings reach ``need``.
    Each item's steps must come in the order they are taken (on a hull their ratios grow).
    Returns the steps taken by item, in order, and what is still needed (> 0: ``need`` was
    not reached)."""
    taken: dict[Hashable, list[Step]] = {}
    for step in sorted(steps, key=lambda s: (s.rate, -s.saving)):
        if need <= 0:
            break
        taken.setdefault(step.item, []).append(step)
        need -= step.saving
    return taken, need


def least(choose: Callable[[float], T], fits: Callable[[T], bool], hi: float, best: T | None = None,
          iterations: int = 30) -> T:
    """The choice at the smallest setting in [0, hi] that fits, by bisection: ``choose`` must
    cut no less as its setting grows, and ``choose(hi)`` (``best``, if already made) must fit."""
    best = choose(hi) if best is None else best
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        candidate = choose(mid)
        if fits(candidate):
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def give_back(taken: Mapping[Hashable, T], offer: Callable[[Hashable, T], tuple[T, float] | None],
              fits: Callable[[dict[Hashable, T]], bool]) -> dict[Hashable, T]:
    """Undo cuts while the budget holds. Each round every item may offer a smaller cut and the
    value of what it gives back (``offer(item, cut)``: ``(smaller cut, value)`` or None); the
    most valuable offers are tried first, each kept if the whole choice still fits; rounds
    repeat until no offer is kept."""
    taken = dict(taken)
    changed = True
    while changed:
        changed = False
        offers = {item: o for item, cut in taken.items() if (o := offer(item, cut)) is not None}
        for item in sorted(offers, key=lambda i: offers[i][1], reverse=True):
            trial = {**taken, item: offers[item][0]}
            if fits(trial):
                taken, changed = trial, True
    return taken

