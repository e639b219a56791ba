"""Latency measured the way shared, noisy machines need: variants interleaved round by
round (so drift hits them alike), medians reported."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def interleaved_latency(runners: dict[str, Callable[[], Any]], rounds: int = 20, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
