"""torch.export captures are brought to the same IR as torch.fx ones: layers as modules,
symbolic batch/sequence axes kept, and the weight passes work on them."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

import graphopt
from graphopt import PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.quant.calibration import MinMaxObserver, calibrate
from graphopt.errors import DataError
from graphopt.passes import SplitLowRank


class TokenModel(nn.Module):
    """Embedding -> conv over tokens -> Linear -> LayerNorm, with a branch on a size, which
    torch.fx cannot trace (so torch.export captures it)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 24)
        self.norm = nn.LayerNorm(24)
        self.drop = nn.Dropout(0.1)

    def forward(self, ids):
        h = self.emb(ids)                                   # (B, T, 16)
        if h.shape[1] > 1:
            h = h * 2
        h = self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.norm(self.drop(self.fc(h)))


def test_export_capture_lifts_functional_layers_to_modules():
    model = TokenModel().eval()
    ids = torch.randint(0, 50, (3, 7))
    g = graphopt.trace(model, ids)
    assert g.captured_by == "torch.export"
    called = {n.target: type(g.module(n)) for n in g.nodes if n.op == "call_module" and n.target != "_guards_fn"}
    assert called == {"emb": nn.Embedding, "conv": nn.Conv2d, "fc": nn.Linear, "norm": nn.LayerNorm}
    assert not any("dropout" in str(n.target) or "linear" in str(n.target) for n in g.nodes if n.op == "call_function")
    torch.testing.assert_close(g.module(g.node("fc")).weight, model.fc.weight)
    torch.testing.assert_close(g.gm(ids), model(ids), rtol=0, atol=0)


def test_a_weight_read_twice_stays_functional():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)

        def forward(self, ids):
            h = self.emb(ids)
            if h.shape[1] > 1:
                h = h + 1
            return F.linear(h, self.emb.weight)              # logits tied to the embedding

    model = Tied().eval()
    ids = torch.randint(0, 20, (2, 5))
    g = graphopt.trace(model, ids)
    assert not [n for n in g.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    torch.testing.assert_close(g.gm(ids), model(ids))


def _dynamic_graph():
    model = TokenModel().eval()
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=2, max=64)
    return model, graphopt.trace(model, torch.randint(0, 50, (3, 7)), dynamic_shapes=({0: batch, 1: seq},))


def test_dynamic_axes_serve_other_sizes_in_graph_onnx_and_calibration(tmp_path):
    model, g = _dynamic_graph()
    other = torch.randint(0, 50, (5, 11))
    torch.testing.assert_close(g.gm(other), model(other), rtol=0, atol=0)
    report = onnx_backend.export(g, tmp_path / "dyn.onnx")
    session = onnx_backend.ort_session(str(tmp_path / "dyn.onnx"))
    np.testing.assert_allclose(onnx_backend.run_onnx(session, (other,))[0], model(other).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    assert report.max_rel_error < 1e-4
    seen = calibrate(g, {"fc": MinMaxObserver()}, [torch.randint(0, 50, (4, 9)), torch.randint(0, 50, (2, 3))],
                     progress=False)
    assert seen == 2


def test_calibration_still_rejects_a_static_axis_of_the_wrong_size():
    g = graphopt.trace(nn.Sequential(nn.Linear(6, 4)), torch.randn(2, 6))
    with pytest.raises(DataError, match=r"calibration batch 0 has input shapes \[\(2, 5\)\].*\[\(2, 6\)\]"):
        calibrate(g, {"_0": MinMaxObserver()}, [torch.randn(2, 5)], progress=False)


def test_low_rank_splits_layers_of_an_exported_graph():
    model, g = _dynamic_graph()
    result = PassManager([SplitLowRank(layers={"fc": 4})]).run(g)
    split = result.graph
    assert [type(m) for m in split.modules()["fc"]] == [nn.Linear, nn.Linear]
    assert split.modules()["fc"][0].out_features == 4
    other = torch.randint(0, 50, (4, 9))
    assert split.gm(other).shape == (4, 9, 24)


class CastingMLP(nn.Module):
    """Casts between dtypes, as GPT-2-style code does (torch.export adds an
    ``_assert_tensor_metadata`` check per cast), with a branch on a size so torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 1.0
        h = torch.relu(self.a(x)).to(torch.float64)
        return self.c(torch.relu(self.b(h.to(torch.float32))))


class CastingMLPNoBranch(CastingMLP):
    """The same casts without the branch: torch.fx captures it (``.to`` as a method call)."""

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)).to(torch.float64).to(torch.float32))))


@pytest.mark.parametrize("export", [False, True])
def test_dtype_casts_do_not_block_pruning(export):
    model = (CastingMLP() if export else CastingMLPNoBranch()).eval()
    x = torch.randn(2, 8)
    g = graphopt.trace(model, (x,))
    assert g.captured_by == ("torch.export" if export else "torch.fx")
    assert not any("assert_tensor_metadata" in str(n.target) for n in g.nodes)
    result = PassManager([graphopt.get_pass("prune_channels")(ratio=0.5)]).run(g)
    stats = result.records[-1].stats
    assert stats["blocked"] == 1 and stats["prunable"] == 2      # a and b; c reaches the output
    assert stats["channels_removed"] == 16
    assert result.graph.run(x).shape == (2, 4)
