"""Shared check of an exported artifact's outputs against the graph it came from."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

from graphopt.backend import ExportReport
from graphopt.errors import ExportError
from graphopt.ir import Graph
from graphopt.verify import compare_outputs


def parity_report(backend: str, graph: Graph, path: str, written: str, outputs: Any, tolerance: float,
                  started: float, details: dict[str, Any]) -> ExportReport:
    """Compare ``outputs`` (the artifact run on the example inputs) with the graph's; raise
    ExportError above ``tolerance`` (relative), else describe the artifact (``written`` is
    the file as written so far, ``path`` its final name)."""
    abs_err, rel_err = compare_outputs(graph.run(), outputs)
    if not rel_err <= tolerance:
        raise ExportError(f"{backend} export of {path} does not match the graph: max relative error "
                          f"{rel_err:.3g} > tolerance {tolerance:.3g} (max abs {abs_err:.3g}); nothing written")
    return ExportReport(backend, path, os.path.getsize(written), abs_err, rel_err, time.perf_counter() - started, details)


def module_runner(module: Any) -> Callable[..., Any]:
    """The reloaded artifact as a callable on inputs, without autograd: what reports time and
    evaluate, so numbers describe the file that was written, not the graph it came from."""
    def run(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return run
