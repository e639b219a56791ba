"""Calibration: observe activation ranges over a data loader, in bounded memory.

Observers are named strategies (``minmax``, ``moving_average``, ``percentile``, ``mse``); each
sees every batch of one tensor and returns the real range [lo, hi] to quantize it over.
Histogram observers keep a fixed number of bins whose range doubles when data falls
outside it (adjacent bins merge, so nothing is re-estimated), never the activations.
"""
from __future__ import annotations

import functools
from typing import Annotated, Any, Callable, Iterable, Iterator

import annotated_types as at
import torch
from torch import fx
from tqdm.auto import tqdm

from graphopt.data import batch_inputs, check_batch
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
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values (NaN or inf)")
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        self.batches += 1
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        pass

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

    def range(self) -> tuple[float, float]:
        super().range()
        return self.avg_min, self.avg_max


Bins = Annotated[int, at.Ge(16), at.MultipleOf(4)]


class HistogramObserver(Observer):
    """A ``bins``-bin histogram over [-R, R]; R doubles (bins merge pairwise) to fit new data."""

    def __init__(self, bins: Bins = 2048):
        super().__init__()
        self.bins = bins
        self.limit = 0.0
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def _update(self, x: torch.Tensor) -> None:
        peak = max(abs(self.min), abs(self.max))
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1.0
        while peak > self.limit:
            self._double()
        self.hist += torch.histc(x.double().flatten(), self.bins, -self.limit, self.limit)

    def _double(self) -> None:
        merged = self.hist.view(-1, 2).sum(1)          # bins/2 bins covering [-R, R]
        self.hist = torch.zeros_like(self.hist)
        quarter = self.bins // 4
        self.hist[quarter:quarter + merged.numel()] = merged
        self.limit *= 2

    def centers(self) -> torch.Tensor:
        width = 2 * self.limit / self.bins
        return -self.limit + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


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
        edges = torch.linspace(-self.limit, self.limit, self.bins + 1, dtype=torch.float64)
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
    but the batch dimension). ``data`` is an iterable of batches or a callable returning one."""
    if data is None:
        raise ConfigError("no calibration data: pass PassContext(data={'calibration_data': loader}) "
                          "(an iterable of batches or a callable returning one)")
    batches = data() if callable(data) else data
    if not isinstance(batches, Iterable):
        raise ConfigError(f"calibration data must be iterable (or a callable returning an iterable), "
                          f"got {type(batches).__name__}")
    count = 0
    for index, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False, delay=2,
                                       total=max_batches)):
        if max_batches is not None and index >= max_batches:
            break
        inputs = batch_inputs(batch)
        check_batch(graph, inputs, f"calibration batch {index}")
        count += 1
        yield inputs
    if not count:
        raise ConfigError("calibration data yielded no batches")


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

    Returns the number of batches seen."""
    missing = sorted(set(observers) - {n.name for n in graph.nodes})
    if missing:
        raise ConfigError(f"calibration: no nodes named {', '.join(missing)}")
    interpreter = _Observe(graph.gm, observers)
    seen = 0
    with torch.no_grad():
        for inputs in iter_calibration(graph, data, max_batches, progress):
            interpreter.run(*inputs)
            seen += 1
    return seen


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
