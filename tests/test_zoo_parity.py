"""trace -> fold BatchNorm -> ONNX and TorchScript, against eager, on real torchvision architectures."""
import pytest
import torch
import torchvision

import graphopt
from graphopt import PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.passes import EliminateDeadCode, FoldBatchNorm, RemoveIdentity
from graphopt.verify import compare_outputs

from conftest import randomize_bn

MODELS = ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fold_and_export_match_eager(name, tmp_path):
    model = randomize_bn(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
    result = PassManager([FoldBatchNorm(), RemoveIdentity(), EliminateDeadCode()]).run(graphopt.trace(model, x))
    graph = result.graph
    assert compare_outputs(eager, graph.run(x))[1] <= 1e-5
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (result.records[1].stats["folded"] > 0) == has_bn

    onnx_report = onnx_backend.export(graph, tmp_path / f"{name}.onnx")
    (onnx_out,) = onnx_backend.run_onnx(onnx_backend.ort_session(str(tmp_path / f"{name}.onnx")), (x,))
    assert compare_outputs(eager, torch.from_numpy(onnx_out))[1] <= 1e-4
    assert onnx_report.max_rel_error <= 1e-4

    ts_backend.export(graph, tmp_path / f"{name}.pt")
    loaded = torch.jit.load(str(tmp_path / f"{name}.pt"))
    with torch.no_grad():
        assert compare_outputs(eager, loaded(x))[1] <= 1e-4
