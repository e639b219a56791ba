import os

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt import ConfigError, ExportError
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend



def test_onnx_export_runs_in_onnxruntime(digits_graph, tmp_path):
    path = tmp_path / "digits.onnx"
    report = onnx_backend.export(digits_graph, path)
    assert report.max_rel_error <= 1e-4
    assert report.bytes == os.path.getsize(path)
    model = onnx.load(path)
    assert model.opset_import[0].version >= 17
    session = onnx_backend.ort_session(str(path))
    x = torch.rand(3, 1, 8, 8)
    (out,) = onnx_backend.run_onnx(session, (x,))
    np.testing.assert_allclose(out, digits_graph.run(x).numpy(), rtol=1e-4, atol=1e-5)
    assert [p for p in os.listdir(tmp_path)] == ["digits.onnx"]  # no temp files left


def test_torchscript_export_reloads(digits_graph, tmp_path):
    path = tmp_path / "digits.pt"
    report = ts_backend.export(digits_graph, path)
    assert report.details["method"] == "script"
    loaded = torch.jit.load(str(path))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), digits_graph.run(x))


@pytest.mark.parametrize("backend", [onnx_backend, ts_backend])
def test_failed_parity_check_writes_nothing(digits_graph, tmp_path, backend, monkeypatch):
    from graphopt.backends import parity

    path = tmp_path / "out" / "model.bin"
    monkeypatch.setattr(parity, "compare_outputs", lambda a, b: (1.0, 1.0))   # the artifact disagrees
    with pytest.raises(ExportError, match="does not match the graph: max relative error 1 > tolerance"):
        backend.export(digits_graph, path)
    assert not path.exists()
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("backend", [onnx_backend, ts_backend])
def test_unwritable_path_is_a_clear_error(digits_graph, tmp_path, backend):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="path: cannot write .*model.bin: .*file is not a writable directory"):
        backend.export(digits_graph, blocker / "model.bin")


def test_bad_backend_options():
    with pytest.raises(ConfigError, match="option 'opset' must be an int >= 17, got int"):
        onnx_backend.export(None, "x.onnx", opset=11)
    with pytest.raises(ConfigError, match="option 'method' must be one of auto, script, trace"):
        ts_backend.export(None, "x.pt", method="compile")


def test_untraceable_by_torchscript_falls_back_to_trace(tmp_path):
    class Dyn(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.relu(x) * 2

    graph = graphopt.trace(Dyn(), torch.randn(2, 3))
    report = ts_backend.export(graph, tmp_path / "t.pt", method="trace")
    assert report.details["method"] == "trace"
    assert report.max_rel_error == 0
