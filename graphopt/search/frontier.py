"""The Pareto front of measured candidates: higher metric, lower cost, nothing better on both."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def pareto_front(items: Sequence[T], metric: Callable[[T], float], cost: Callable[[T], float]) -> list[T]:
    """Items no other item dominates (at least as good on both, better on one), cheapest first."""
    ranked = sorted(items, key=lambda t: (cost(t), -metric(t)))
    front: list[T] = []
    best = float("-inf")
    for item in ranked:
        if metric(item) > best:
            front.append(item)
            best = metric(item)
    return front


def choose(items: Sequence[T], metric: Callable[[T], float], cost: Callable[[T], float],
           feasible: Callable[[T], bool]) -> T | None:
    """The cheapest feasible item (the better metric among equal costs); None when none is."""
    ok = [t for t in items if feasible(t)]
    return min(ok, key=lambda t: (cost(t), -metric(t))) if ok else None
