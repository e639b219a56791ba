"""ONNX backend: export, check, simplify with onnx-simplifier, verify in onnxruntime."""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings

import numpy as np
import onnx as onnx_lib
import onnxruntime as ort
import torch

from graphopt.backend import ExportReport, register_backend
from graphopt.errors import ConfigError, ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.backends.parity import parity_report

MIN_OPSET = 17


def to_proto(graph: Graph, opset: int) -> onnx_lib.ModelProto:
    """torch.onnx (dynamo exporter) on the GraphModule, quietly."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph.gm, graph.example_inputs, dynamo=True, opset_version=opset,
                                    dynamic_shapes=graph.dynamic_shapes,
                                    external_data=False, verbose=False)
    return program.model_proto


def ort_session(model: str | bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on a file path or serialized model; with ``threads``, that many intra-op
    threads and no spinning (so it can be timed interleaved with torch without slowing it)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: tuple) -> list[np.ndarray]:
    feed = {meta.name: np.ascontiguousarray(t.detach().cpu().numpy())
            for meta, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


@register_backend("onnx")
def export(graph: Graph, path: str, *, opset: int = 18, simplify: bool = True,
           tolerance: float = 1e-4) -> ExportReport:
    """Write ``graph`` as an ONNX model at ``path``; fail (writing nothing) if onnxruntime's
    outputs differ from the graph's by more than ``tolerance`` (relative)."""
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"backend 'onnx': opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    started = time.perf_counter()
    path = os.fspath(path)
    with atomic_path(path, ".onnx") as tmp:
        try:
            model = to_proto(graph, opset)
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
                   "simplified": simplify}
        report = parity_report("onnx", graph, path, tmp, outputs, tolerance, started, details)
    report.runner = lambda *inputs: run_onnx(session, inputs)
    return report
