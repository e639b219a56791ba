"""ONNX backend: export, check, simplify with onnx-simplifier, verify in onnxruntime."""
from __future__ import annotations

import os
import time
from typing import Annotated

import annotated_types as at

import onnx as onnx_lib
import onnxruntime as ort
import torch

from graphopt.backend import ExportReport, register_backend
from graphopt.errors import ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.backends._onnx_runtime import (OTHER_BATCH, at_batch, ort_session, run_onnx,  # noqa: F401
                                              to_proto)
from graphopt.backends.parity import parity_report
from graphopt.options import Tolerance

MIN_OPSET = 17
Opset = Annotated[int, at.Ge(MIN_OPSET)]


@register_backend("onnx")
def export(graph: Graph, path: str, *, opset: Opset = 18, simplify: bool = True,
           tolerance: Tolerance = 1e-4, dynamic_batch: bool = True) -> ExportReport:
    """Write ``graph`` as an ONNX model at ``path``; fail (writing nothing) if onnxruntime's
    outputs differ from the graph's by more than ``tolerance`` (relative). The batch axis is
    symbolic unless ``dynamic_batch=False`` (checked by a second run at another batch size).

    Options:
        opset: ONNX opset version written
        simplify: simplify the model with onnx-simplifier (checked against the unsimplified one)
        tolerance: largest relative difference from the graph's outputs accepted in onnxruntime
        dynamic_batch: make the batch axis symbolic (checked by a second run at another batch size)
    """
    started = time.perf_counter()
    path = os.fspath(path)
    with atomic_path(path, ".onnx") as tmp:
        try:
            model, batch = to_proto(graph, opset, dynamic_batch)
            onnx_lib.checker.check_model(model)
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export the graph: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        nodes_before = len(model.graph.node)
        if simplify:
            import onnxsim

            model, ok = onnxsim.simplify(model)
            if not ok:
                raise ExportError("onnx-simplifier could not validate the simplified model")
        onnx_lib.save(model, tmp)
        session = ort_session(tmp, threads=torch.get_num_threads())
        outputs = run_onnx(session, graph.example_inputs)
        details = {"opset": opset, "nodes": len(model.graph.node), "nodes_before_simplify": nodes_before,
                   "simplified": simplify, "batch": batch}
        report = parity_report("onnx", graph, path, tmp, outputs, tolerance, started, details)
        if batch == "dynamic":
            _check_other_batch(graph, session, tolerance, path)
    report.runner = lambda *inputs: run_onnx(session, inputs)
    return report


def _check_other_batch(graph: Graph, session: ort.InferenceSession, tolerance: float, path: str) -> None:
    from graphopt.verify import compare_outputs

    inputs = at_batch(graph.example_inputs, OTHER_BATCH)
    error = compare_outputs(graph.run(*inputs), run_onnx(session, inputs))[1]
    if not error <= tolerance:
        raise ExportError(f"onnx export of {path}: at batch {OTHER_BATCH} the model differs from the graph "
                          f"(relative error {error:.3g}); export with dynamic_batch=False")
