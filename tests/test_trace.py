import networkx as nx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import OpKind, TraceError
from graphopt.tools.digits import DigitsCNN


def test_trace_records_kinds_shapes_and_dtypes():
    g = graphopt.trace(DigitsCNN(), torch.randn(2, 1, 8, 8))
    assert g.captured_by == "torch.fx"
    kinds = [g.kind(n).value for n in g.nodes]
    assert kinds == ["input", "conv", "norm", "activation", "conv", "norm", "activation", "pool",
                     "reshape", "identity", "linear", "output"]
    conv2 = g.node("features_3")
    assert g.shape(conv2) == (2, 32, 8, 8)
    assert g.dtype(conv2) == torch.float32
    assert g.shape(g.node("classifier_2")) == (2, 10)


def test_functional_and_method_ops_are_classified():
    class Mixed(nn.Module):
        def forward(self, x, y):
            a = torch.cat([x, y], dim=1)
            b = a.permute(0, 2, 1).reshape(2, -1)
            c = torch.nn.functional.softmax(b, -1) @ torch.ones(b.shape[-1], 3)
            d, e = torch.chunk(c, 2, dim=0)
            return torch.sigmoid(d) + e.mean()

    g = graphopt.trace(Mixed(), (torch.randn(2, 3, 4), torch.randn(2, 5, 4)))
    kinds = {g.kind(n) for n in g.nodes}
    for expected in (OpKind.CONCAT, OpKind.PERMUTE, OpKind.RESHAPE, OpKind.SOFTMAX, OpKind.MATMUL,
                     OpKind.SPLIT, OpKind.INDEX, OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.REDUCE):
        assert expected in kinds, expected


def test_unlisted_ops_are_unknown_not_elementwise():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1) + torch.flip(x, [1])

    g = graphopt.trace(Odd(), torch.randn(2, 4))
    assert [g.kind(n) for n in g.nodes if n.op == "call_function"][:2] == [OpKind.UNKNOWN, OpKind.UNKNOWN]


def test_networkx_view_matches_dataflow():
    g = graphopt.trace(DigitsCNN(), torch.randn(1, 1, 8, 8))
    view = g.to_networkx()
    assert isinstance(view, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(view)
    assert view.number_of_nodes() == 12
    assert nx.shortest_path(view, "x", "output")[1] == "features_0"
    assert view.nodes["features_0"]["kind"] == OpKind.CONV
    assert view.nodes["features_0"]["shape"] == (1, 16, 8, 8)


def test_run_matches_eager_and_clone_is_independent():
    model = DigitsCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    g = graphopt.trace(model, x)
    torch.testing.assert_close(g.run(x), model(x))
    twin = g.clone()
    with torch.no_grad():
        twin.gm.get_submodule("features.0").weight.zero_()
    torch.testing.assert_close(g.run(x), model(x))
    assert not torch.allclose(twin.run(x), model(x))


def test_trace_does_not_touch_the_callers_model():
    model = DigitsCNN().train()
    g = graphopt.trace(model, torch.randn(1, 1, 8, 8))
    assert model.training  # the caller's model keeps its mode
    assert not g.gm.training
    assert g.gm.get_submodule("features.0").weight is not model.features[0].weight


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: no tracer can capture both branches
            return x * 2
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x):
        return self.block(self.stem(x))


def test_untraceable_model_names_module_and_reason():
    with pytest.raises(TraceError) as info:
        graphopt.trace(GatedNet(), torch.randn(2, 4))
    err = info.value
    assert err.module == "block.1"
    assert "data-dependent control flow" in err.reason
    assert "test_trace.py" in err.reason  # the user's line is named
    assert "block.1 (Gate)" in str(err)
    assert set(err.attempts) == {"torch.fx", "torch.export"}


def test_shape_dependent_branch_falls_back_to_torch_export():
    class ShapeGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 1:
                return self.fc(x)
            return x

    model = ShapeGate().eval()
    x = torch.randn(3, 4)
    g = graphopt.trace(model, x)
    assert g.captured_by == "torch.export"
    assert "fallback:torch.export" in g.properties
    torch.testing.assert_close(g.run(x), model(x))
    assert OpKind.LINEAR in {g.kind(n) for n in g.nodes}


def test_trace_rejects_non_modules():
    with pytest.raises(TraceError, match="needs a torch.nn.Module"):
        graphopt.trace(lambda x: x, torch.randn(1))
