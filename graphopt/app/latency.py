"""Latency measured the way shared, noisy machines need: variants interleaved round by
round (so drift hits them alike), medians reported."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def interleaved_latency(runners: dict[str, Callable[[], Any]], rounds: int = 20, warmup: int = 2,
                        inner: int = 1, hot: int = 0) -> dict[str, float]:
    """Median seconds per call of each runner. Every other round runs them in reverse order,
    so none always follows the same neighbour; ``inner`` calls are timed together (for calls
    too short to time one by one); ``hot`` untimed calls precede each timed one, so a variant
    is timed with its own weights in cache, as when it runs alone, not right after its
    neighbour evicted them."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(rounds):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            run = runners[name]
            for _ in range(hot):
                run()
            start = time.perf_counter()
            for _ in range(inner):
                run()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}
