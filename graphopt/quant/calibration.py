"""Calibration: observe activation ranges over a data loader, in bounded memory.

Observers are named strategies (``minmax``, ``moving_average``, ``percentile``, ``mse``); each
sees every batch of one tensor and returns the real range [lo, hi] to quantize it over.
Histogram observers keep a fixed number of bins whose range doubles when data falls
outside it (adjacent bins merge, so nothing is re-estimated), never the activations.

Under torchrun each rank calibrates on its share of the data and ``calibrate`` merges the
observers (``reduce_observers``): min/max by all-reduce min/max and histograms on a common
binning are bit-identical to one process reading all of the data; channel means and input
moments are sums of float64 statistics (equal up to the order of the additions, ~1e-15
relative); moving averages are combined weighted by each rank's batch count (an exponential
moving average depends on the order of the batches, so no split reproduces it exactly).
"""
from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Callable, Iterable, Iterator

import annotated_types as at
import torch
from torch import fx
from tqdm.auto import tqdm

from graphopt import distributed
from graphopt.data import read_batch
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.options import FINITE, Count, Options, options_model, validate_options
from graphopt.registry import Registry


class Observer:
    """Sees batches of one tensor (``update``), then says which range to quantize (``range``)."""

    def __init__(self):
        self.min = float("inf")
        self.max = float("-inf")
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        # statistics are kept on the CPU, so quantization parameters do not depend on the device
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values (NaN or inf)")
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        self.batches += 1
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        pass

    def _reduce(self) -> None:
        """Merge what a subclass keeps besides min, max and the batch count with every other
        rank's (a collective: every rank calls it in the same order); see ``reduce_observers``."""

    def range(self) -> tuple[float, float]:
        if not self.batches:
            raise ValueError("observer saw no data")
        return self.min, self.max


OBSERVERS: Registry[type[Observer]] = Registry("observer")


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make an Observer subclass available by ``name`` (``insert_qdq``'s ``observer``);
    its ``__init__`` keyword parameters are its options, typed as a pass's are."""
    def decorate(cls: type[Observer]) -> type[Observer]:
        OBSERVERS.add(name, cls)
        cls.name = name
        return cls
    return decorate


def observer_names() -> list[str]:
    return OBSERVERS.names()


@functools.cache
def _observer_options(cls: type[Observer]) -> type[Options]:
    return options_model(f"observer {cls.name!r}", cls.__init__, doc=cls.__doc__)


def make_observer(name: str, **options) -> Observer:
    """A new observer ``name`` with ``options`` checked (ConfigError naming the option)."""
    cls = OBSERVERS.get(name)
    return cls(**validate_options(_observer_options(cls), options))


@register_observer("minmax")
class MinMaxObserver(Observer):
    """The smallest and largest value ever seen."""


@register_observer("moving_average")
class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum``: weight of the past)."""

    def __init__(self, momentum: Annotated[float, at.Ge(0), at.Lt(1), FINITE] = 0.9):
        super().__init__()
        self.momentum = momentum
        self.avg_min = self.avg_max = 0.0

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().item(), x.max().item()
        if self.batches == 1:
            self.avg_min, self.avg_max = lo, hi
        else:
            m = self.momentum
            self.avg_min = m * self.avg_min + (1 - m) * lo
            self.avg_max = m * self.avg_max + (1 - m) * hi

    def _reduce(self) -> None:
        n = float(self.batches)
        weighted = distributed.all_reduce(torch.tensor([n * self.avg_min, n * self.avg_max, n], dtype=torch.float64))
        if weighted[2] > 0:
            self.avg_min, self.avg_max = (weighted[:2] / weighted[2]).tolist()

    def range(self) -> tuple[float, float]:
        super().range()
        return self.avg_min, self.avg_max


Bins = Annotated[int, at.Ge(16), at.MultipleOf(4)]


class HistogramObserver(Observer):
    """A ``bins``-bin histogram over [-R, R]; R doubles (bins merge pairwise) to fit new data.

    The bins lie on one grid for all data: bin ``i`` at level ``k`` holds the values x with
    ``floor(x / w) = i - bins/2``, where ``w = fl(2 / bins) * 2**k``. Halving a quotient by a power
    of two is exact in floating point, so merging bins pairwise gives exactly the histogram the
    values would have had at the wider level, and the level is the smallest that holds every
    value seen. The final histogram therefore depends on the data only, not on its order or on
    how it was split (across batches or ranks): merged histograms are bit-identical."""

    LEVEL_FLOOR = -60   # the finest level (R about 2**-60): all-zero data stays here

    def __init__(self, bins: Bins = 2048):
        super().__init__()
        self.bins = bins
        self.unit = 2.0 / bins             # bin width at level 0, rounded once
        self.level: int | None = None      # None until data arrives
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def width(self, level: int | None = None) -> float:
        level = self.level if level is None else level
        return math.ldexp(self.unit, self.LEVEL_FLOOR if level is None else level)

    @property
    def limit(self) -> float:
        """R: the histogram covers [-R, R)."""
        return self.bins // 2 * self.width()

    def _fits(self, lo: float, hi: float, level: int) -> bool:
        w, half = self.width(level), self.bins // 2
        return math.floor(hi / w) < half and math.floor(lo / w) >= -half

    def _level_for(self, lo: float, hi: float) -> int:
        """The smallest level (>= LEVEL_FLOOR) whose bins hold every value in [lo, hi]."""
        peak = max(abs(lo), abs(hi))
        if peak == 0.0:
            return self.LEVEL_FLOOR
        level = max(self.LEVEL_FLOOR, math.frexp(peak / (self.bins // 2 * self.unit))[1] - 1)
        while level > self.LEVEL_FLOOR and self._fits(lo, hi, level - 1):
            level -= 1
        while not self._fits(lo, hi, level):
            level += 1
        return level

    def _update(self, x: torch.Tensor) -> None:
        level = self._level_for(x.min().item(), x.max().item())
        if self.level is None or level > self.level:
            self._rebin(level)
        half = self.bins // 2
        index = torch.floor(x.double().flatten() / self.width()).long() + half
        self.hist += torch.bincount(index.clamp_(0, self.bins - 1), minlength=self.bins).double()

    def _rebin(self, level: int) -> None:
        """Move the counts to ``level`` (>= the current one) by merging bins, exactly."""
        if self.level is not None and level > self.level:
            half = self.bins // 2
            offsets = torch.arange(self.bins) - half
            target = torch.div(offsets, 2 ** min(level - self.level, 62), rounding_mode="floor") + half
            self.hist = torch.zeros_like(self.hist).index_add_(0, target, self.hist)
        self.level = level

    def _reduce(self) -> None:
        mine = self.LEVEL_FLOOR - 1 if self.level is None else self.level
        level = int(distributed.all_reduce(torch.tensor([mine], dtype=torch.int64), "max").item())
        if level >= self.LEVEL_FLOOR:
            self._rebin(level)
        self.hist = distributed.all_reduce(self.hist)   # integer counts in float64: sums are exact

    def edges(self) -> torch.Tensor:
        return (torch.arange(self.bins + 1, dtype=torch.float64) - self.bins // 2) * self.width()

    def centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) - self.bins // 2 + 0.5) * self.width()


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clip the ``(100 - percentile)``% tails of the histogram (e.g. 99.99 keeps all but 0.01% each side)."""

    def __init__(self, percentile: Annotated[float, at.Gt(50), at.Le(100), FINITE] = 99.99, bins: Bins = 2048):
        super().__init__(bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        super().range()
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = 1 - self.percentile / 100
        edges = self.edges()
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=torch.float64)))
        lo = max(self.min, edges[lo_bin].item())
        hi = min(self.max, edges[min(hi_bin + 1, self.bins)].item())
        return lo, hi


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """The clipping range whose uint8 quantization has the least squared error over the histogram."""

    def __init__(self, bins: Bins = 2048, candidates: Count = 100, levels: Annotated[int, at.Ge(2)] = 256):
        super().__init__(bins)
        self.candidates, self.levels = candidates, levels

    def range(self) -> tuple[float, float]:
        super().range()
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if hi0 - lo0 <= 0:
            return self.min, self.max
        values, counts = self.centers(), self.hist
        fractions = torch.linspace(1.0 / self.candidates, 1.0, self.candidates, dtype=torch.float64)
        lo, hi = lo0 * fractions[:, None], hi0 * fractions[:, None]          # candidates x 1
        scale = (hi - lo) / (self.levels - 1)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(values[None, :] / scale) + zero, 0, self.levels - 1)
        errors = (((q - zero) * scale - values[None, :]) ** 2 * counts[None, :]).sum(1)
        best = int(torch.argmin(errors))
        return max(self.min, lo[best, 0].item()), min(self.max, hi[best, 0].item())


def iter_calibration(graph: Graph, data: Any, max_batches: int | None = None, progress: bool = True,
                     desc: str = "calibrate") -> Iterator[tuple]:
    """Yield each batch's inputs, checked against the graph's example inputs (count, rank, and all
    but the batch dimension). ``data`` is an iterable of batches or a callable returning one.

    Under several ranks each rank reads its share (``graphopt.distributed.shard``) and
    ``max_batches`` counts the batches of all ranks together; a rank may then read none."""
    if data is None:
        raise ConfigError("no calibration data: pass PassContext(data={'calibration_data': loader}) "
                          "(an iterable of batches or a callable returning one)")
    data = distributed.shard(data, f"{desc} data")
    batches = data() if callable(data) else data
    if not isinstance(batches, Iterable):
        raise ConfigError(f"calibration data must be iterable (or a callable returning an iterable), "
                          f"got {type(batches).__name__}")
    limit = distributed.rank_share(max_batches)
    count = 0
    for index, batch in enumerate(tqdm(batches, desc=desc, disable=not progress or not distributed.is_main(),
                                       leave=False, delay=2, total=limit)):
        if limit is not None and index >= limit:
            break
        count += 1
        yield read_batch(graph, batch, f"calibration batch {index}", finite=False)[0]
    if not count and not distributed.active():
        raise ConfigError("calibration data yielded no batches")


def held_batch(graph: Graph, data: Any) -> tuple:
    """The inputs of the first calibration batch: the batch a pass measures its own error on. Under
    several ranks it is rank 0's first batch of the data as given (not sharded), on every rank, so
    every rank takes the same decisions from it."""
    with distributed.local():   # every rank reads it (the data's own state moves alike), rank 0's is kept
        first = next(iter(iter_calibration(graph, data, 1, progress=False)))
    return distributed.broadcast_object(first)


class _Observe(fx.Interpreter):
    """Runs the graph and feeds the named nodes' outputs to their observers."""

    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        observer = self.observers.get(n.name)
        if observer is not None:
            try:
                observer.update(value)
            except ValueError as exc:
                raise ConfigError(f"calibration of node {n.name!r}: {exc}") from None
        return value


def calibrate(graph: Graph, observers: dict[str, Observer], data: Any, max_batches: int | None = None,
              progress: bool = True) -> int:
    """Run ``graph`` over the calibration data, updating ``observers`` (node name -> Observer).

    Returns the number of batches seen (by all ranks together). Under several ranks each rank
    reads its share and the observers are merged afterwards (``reduce_observers``), so they
    hold every rank's data: give each call fresh observers."""
    missing = sorted(set(observers) - {n.name for n in graph.nodes})
    if missing:
        raise ConfigError(f"calibration: no nodes named {', '.join(missing)}")
    interpreter = _Observe(graph.gm, observers)
    seen = 0
    with torch.no_grad():
        for inputs in iter_calibration(graph, data, max_batches, progress):
            interpreter.run(*inputs)
            seen += 1
    if distributed.active():
        seen = int(distributed.all_reduce(torch.tensor([seen], dtype=torch.int64)).item())
        if not seen:
            raise ConfigError("calibration data yielded no batches (on any rank)")
        reduce_observers(observers)
    return seen


def reduce_observers(observers: dict[str, Observer]) -> None:
    """Merge every rank's observers in place, so each holds the statistics of all ranks' data
    (identical on every rank). Nothing happens in one process."""
    if not distributed.active():
        return
    ordered = [observers[name] for name in sorted(observers)]
    for observer in ordered:
        observer._reduce()
    low = distributed.all_reduce(torch.tensor([v for o in ordered for v in (o.min, -o.max)], dtype=torch.float64),
                                 "min").tolist()
    batches = distributed.all_reduce(torch.tensor([o.batches for o in ordered], dtype=torch.int64)).tolist()
    for index, observer in enumerate(ordered):
        observer.min, observer.max, observer.batches = low[2 * index], -low[2 * index + 1], batches[index]


class _AveragingObserver(Observer):
    """A running sum over every batch and how many samples it holds; ``average`` divides."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.total: torch.Tensor | None = None
        self.count = 0

    def _add(self, value: torch.Tensor, samples: int) -> None:
        self.total = value if self.total is None else self.total + value
        self.count += samples

    def _reduce(self) -> None:
        shapes = [s for s in distributed.all_gather_object(None if self.total is None else tuple(self.total.shape))
                  if s is not None]
        if not shapes:
            return
        total = torch.zeros(shapes[0], dtype=torch.float64) if self.total is None else self.total
        self.total = distributed.all_reduce(total)
        self.count = int(distributed.all_reduce(torch.tensor([self.count], dtype=torch.int64)).item())

    def average(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("observer saw no data")
        return self.total / self.count


class ChannelMeanObserver(_AveragingObserver):
    """Mean of each channel (``axis``) over every batch and position: inputs for bias correction."""

    def __init__(self, axis: int = 1):
        super().__init__(axis)

    def _update(self, x: torch.Tensor) -> None:
        axis = self.axis % x.dim()
        sums = x.double().sum(dim=[d for d in range(x.dim()) if d != axis])
        self._add(sums, x.numel() // max(sums.numel(), 1))

    def mean(self) -> torch.Tensor:
        return self.average().float()


class InputMomentObserver(_AveragingObserver):
    """``E[x x^T]`` over the features on ``axis`` (every other axis is a sample): the input
    statistics that data-aware low-rank splitting whitens a layer's weight with."""

    def __init__(self, axis: int = -1):
        super().__init__(axis)

    def _update(self, x: torch.Tensor) -> None:
        rows = x.movedim(self.axis % x.dim(), -1).reshape(-1, x.shape[self.axis]).double()
        self._add(rows.T @ rows, rows.shape[0])

    def moment(self) -> torch.Tensor:
        return self.average()
