"""TorchScript backend: script (or trace) the GraphModule, save, reload and verify."""
from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Literal

import torch

from graphopt.backend import ExportReport, register_backend
from graphopt.errors import ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.backends.parity import module_runner, parity_report
from graphopt.options import Tolerance

METHODS = ("auto", "script", "trace")
Method = Literal[METHODS]


def _scriptable(graph: Graph) -> torch.fx.GraphModule:
    """A copy without the input/output type annotations fx re-emits under mangled names
    (``_torch_Tensor_``), which TorchScript cannot resolve; untyped arguments are Tensors."""
    gm = copy.deepcopy(graph.gm)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            node.type = None
    gm.recompile()
    return gm


def _compile(graph: Graph, method: str):
    """(ScriptModule, how): scripting keeps control flow; tracing is the fallback."""
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method in ("auto", "script"):
            try:
                return torch.jit.script(_scriptable(graph)), "script"
            except Exception as exc:
                errors.append(f"script: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
        if method in ("auto", "trace"):
            try:
                with torch.no_grad():
                    return torch.jit.trace(graph.gm, graph.example_inputs, check_trace=False), "trace"
            except Exception as exc:
                errors.append(f"trace: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
    raise ExportError("TorchScript could not compile the graph (" + "; ".join(errors) + ")")


@register_backend("torchscript")
def export(graph: Graph, path: str, *, method: Method = "auto", tolerance: Tolerance = 1e-4) -> ExportReport:
    """Write ``graph`` as TorchScript at ``path``, reload it and check its outputs.

    Options:
        method: script (torch.jit.script), trace (torch.jit.trace) or auto (script, else trace)
        tolerance: largest relative difference from the graph's outputs accepted after reloading
    """
    started = time.perf_counter()
    path = os.fspath(path)
    module, how = _compile(graph, method)
    with atomic_path(path, ".pt") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; pinned here
        torch.jit.save(module, tmp)
        reloaded = torch.jit.load(tmp)
        with torch.no_grad():
            outputs = reloaded(*graph.example_inputs)
        report = parity_report("torchscript", graph, path, tmp, outputs, tolerance, started, {"method": how})
    report.runner = module_runner(reloaded)
    return report
