import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import PassManager
from graphopt.passes import EliminateDeadCode, FoldBatchNorm, RemoveIdentity
from graphopt.passes.fold_batchnorm import fold_into

from conftest import randomize_bn


def run(model, x, *passes):
    return PassManager(list(passes)).run(graphopt.trace(model, x))


def count(graph, kind):
    return sum(isinstance(m, kind) for m in graph.gm.modules())


def test_fold_conv_and_linear_batchnorm(conv_bn_relu):
    x = torch.randn(2, 3, 4, 4)
    result = run(conv_bn_relu, x, FoldBatchNorm())
    assert result.records[1].stats == {"folded": 2}
    assert count(result.graph, nn.BatchNorm2d) == 0 and count(result.graph, nn.BatchNorm1d) == 0
    torch.testing.assert_close(result.graph.run(x), conv_bn_relu(x), rtol=1e-5, atol=1e-6)
    fc = result.graph.gm.get_submodule("fc")
    assert fc.bias is not None and fc.bias.shape == (6,)


@pytest.mark.parametrize("affine", [True, False])
def test_fold_into_matches_reference_formula(affine):
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=True)
    bn = randomize_bn(nn.BatchNorm2d(6, affine=affine))
    x = torch.randn(3, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fold_into(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-6)


def test_batchnorm_not_after_a_layer_is_left_alone():
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(torch.relu(self.bn(x)))

    model = randomize_bn(PreAct())
    result = run(model, torch.randn(1, 3, 4, 4), FoldBatchNorm())
    assert result.records[1].stats == {"folded": 0, "skipped": 1}
    assert not result.records[1].changed
    assert count(result.graph, nn.BatchNorm2d) == 1


def test_conv_output_with_two_users_is_not_folded():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Branch())
    x = torch.randn(1, 3, 4, 4)
    result = run(model, x, FoldBatchNorm())
    assert result.records[1].stats["folded"] == 0
    torch.testing.assert_close(result.graph.run(x), model(x))


def test_dropout_and_stochastic_depth_are_identities_only_when_not_training():
    """An eval-mode trace records ``training=False``; a functional dropout called without it
    defaults to training=True and stays a random op (never removed, never seen through)."""
    from torchvision.ops import StochasticDepth

    class Drops(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth = StochasticDepth(0.2, "row")   # calls torchvision's fx-wrapped stochastic_depth

        def forward(self, x):
            c = torch.nn.functional.dropout(x, 0.1)                  # training defaults to True
            d = torch.nn.functional.dropout(x, 0.1, training=False)
            e = torch.nn.functional.dropout(x, 0.0)
            return self.depth(x) + c + d + e

    graph = graphopt.trace(Drops(), torch.randn(2, 4))
    kinds = {n.name: graph.kind(n).value for n in graph.nodes if n.op == "call_function" and "add" not in n.name}
    assert kinds == {"dropout": "unknown", "dropout_1": "identity", "dropout_2": "identity",
                     "stochastic_depth": "identity"}

    class Quiet(Drops):
        def forward(self, x):   # the same without the active dropout: its outputs are deterministic
            return self.depth(x) + torch.nn.functional.dropout(x, 0.1, training=False)

    result = run(Quiet(), torch.randn(2, 4), RemoveIdentity())
    assert result.records[1].stats["removed"] == 2
    assert not [n for n in result.graph.nodes if n.op == "call_function" and "add" not in n.name]


def test_remove_identity_and_dead_code():
    class Wasteful(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 100)
            self.drop = nn.Dropout(0.3)
            self.ident = nn.Identity()

        def forward(self, x):
            _ = self.unused(x)
            y = torch.nn.functional.dropout(self.fc(x), 0.1, training=False)
            return self.ident(self.drop(y))

    model = Wasteful().eval()
    x = torch.randn(2, 4)
    result = run(model, x, RemoveIdentity(), EliminateDeadCode())
    assert result.records[1].stats == {"removed": 3}
    assert result.records[2].stats["modules"] >= 1
    assert result.records[2].params == 4 * 4 + 4  # the unused Linear's weights are gone
    assert [n.op for n in result.graph.nodes] == ["placeholder", "call_module", "output"]
    torch.testing.assert_close(result.graph.run(x), model(x))
