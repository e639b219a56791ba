import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt import ConfigError, PassContext, PassFailed, PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.ops import OpKind
from graphopt.passes import PruneChannels
from graphopt.passes.prune_channels import NothingToPrune, _CostEstimator
from graphopt.tools.digits import train_batches, trained_digits_cnn

from conftest import digits_pipeline, randomize_bn
from test_channel_groups import ChannelsLast, Concat, Residual


def prune(model, x, **options):
    return PassManager([PruneChannels(**options)]).run(graphopt.trace(model.eval(), x))


@pytest.mark.parametrize("model, x, expected", [
    (Residual(), torch.randn(2, 3, 6, 6), {"stem": 4, "c1": 2, "c2": 4, "c3": 4}),
    (Concat(), torch.randn(2, 3, 2, 2), {"a": 4, "b": 3, "fc": 4}),
    (ChannelsLast(), torch.randn(2, 3, 4, 4), {"fc1": 12, "stem": 6}),
])
def test_pruned_structures_match_the_masked_original(model, x, expected):
    randomize_bn(model)
    result = prune(model, x, ratio=0.5)
    record = result.records[1]
    assert record.contract_error <= 1e-5  # the oracle: pruned == original with channels masked
    for name, channels in expected.items():
        layer = result.graph.gm.get_submodule(name)
        assert getattr(layer, "out_channels", getattr(layer, "out_features", None)) == channels, name
    out = result.graph.run(x)
    assert out.shape == model(x).shape


def test_depthwise_chain_shrinks_together():
    class MB(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 16, 1)
            self.bn = nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.project = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.project(self.dw(torch.relu(self.bn(self.expand(x)))))

    result = prune(randomize_bn(MB()), torch.randn(1, 3, 5, 5), ratio=0.25)
    dw = result.graph.gm.get_submodule("dw")
    assert dw.in_channels == dw.out_channels == dw.groups == 12
    assert result.graph.gm.get_submodule("bn").num_features == 12
    assert result.graph.gm.get_submodule("project").in_channels == 12


def test_oracle_catches_an_analysis_that_guesses():
    """Treating a channel-mixing op as elementwise (Torch-Pruning's classic bug) must fail."""
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), [1]))

    graph = graphopt.trace(Flip().eval(), torch.randn(1, 3, 4, 4))
    flip = next(n for n in graph.nodes if n.name.startswith("flip"))
    assert graph.kind(flip) == OpKind.UNKNOWN
    with pytest.raises(PassFailed, match=r"flip \(unknown\) is not understood .*e.g. at flip"):
        PassManager([PruneChannels(ratio=0.5)]).run(graph)  # honest: blocked
    # now make the analysis guess
    flip.meta["graphopt.kind"] = OpKind.ACTIVATION
    with pytest.raises(PassFailed, match="exact contract") as info:
        PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert info.value.pass_name == "prune_channels"


def test_resnet18_budget_rounding_and_exports(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    result = prune(model, x, target_macs=0.5, round_to=8)
    before, after = result.records
    assert 0.42 <= after.macs / before.macs <= 0.5
    assert after.contract_error <= 1e-5
    for name, m in result.graph.gm.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0, name
    assert result.graph.gm.get_submodule("fc").out_features == 1000  # the output layer is kept
    onnx_backend.export(result.graph, tmp_path / "r18.onnx")
    ts_backend.export(result.graph, tmp_path / "r18.pt")


def test_coarse_rounding_still_fills_the_budget():
    """With round_to 32 a group's width moves in steps of 32; the budget search gives steps
    back until one more, in any group, would break the budget."""
    graph = graphopt.trace(randomize_bn(torchvision.models.resnet18(weights=None)).eval(), torch.randn(1, 3, 64, 64))
    pruner = PruneChannels(target_macs=0.5, round_to=32)
    choice = pruner.plan(graph)
    estimator = _CostEstimator(graph, choice.plan)
    base = estimator.base["macs"]
    assert 0.48 * base < choice.estimate["macs"] <= 0.5 * base
    assert all(len(channels) % 32 == 0 for channels in choice.removed.values())
    for gid, channels in choice.removed.items():
        trial = {**choice.removed, gid: channels[32:]}
        assert estimator.estimate(trial)["macs"] > 0.5 * base, gid


def test_global_scope_caps_and_overrides():
    model = randomize_bn(Residual())
    x = torch.randn(1, 3, 6, 6)
    result = prune(model, x, ratio=0.5, scope="global", max_ratio=0.5, overrides={"c1": 0.0})
    gm = result.graph.gm
    assert gm.get_submodule("c1").out_channels == 4  # override: untouched
    assert gm.get_submodule("stem").out_channels == 4  # the only other group takes the whole cut, capped
    assert result.records[1].contract_error <= 1e-5


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "fpgm", "taylor"])
def test_importance_criteria_prune_the_digits_cnn(criterion):
    graph = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    result = PassManager([PruneChannels(ratio=0.25, importance=criterion)],
                         context=PassContext({"train_data": train_batches})).run(graph)
    assert result.graph.gm.get_submodule("features.0").out_channels == 12
    assert result.graph.gm.get_submodule("features.3").out_channels == 24
    assert result.graph.gm.get_submodule("classifier.2").in_features == 24 * 16
    assert result.records[1].contract_error <= 1e-5


def test_l1_removes_the_weakest_filters():
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.1, 3.0, 0.2]).view(4, 1, 1, 1).expand(4, 2, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 1, 1))
    result = prune(model, torch.randn(1, 2, 3, 3), ratio=0.5, importance="l1")
    kept = result.graph.gm.get_submodule("0").weight[:, 0, 0, 0]
    torch.testing.assert_close(kept, torch.tensor([1.0, 3.0]))


def test_iterative_schedule_meets_the_budget():
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    result = prune(model, torch.randn(1, 3, 64, 64), target_macs=0.5, steps=3)
    before, after = result.records
    assert after.macs / before.macs <= 0.5
    assert after.contract_error <= 1e-5
    assert after.stats["steps"] == 3


def test_custom_importance_object():
    class Reverse(graphopt.passes.pruning_importance.Importance):
        name = "reverse"

        def scores(self, graph, group):
            return -torch.arange(group.size, dtype=torch.float)  # keep the last channels

    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    ref = model[0].weight.detach().clone()
    result = prune(model, torch.randn(1, 2, 3, 3), ratio=0.5, importance=Reverse())
    torch.testing.assert_close(result.graph.gm.get_submodule("0").weight, ref[:2])


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "option 'ratio' must be a finite float >= 0 and < 1 or None, got float 1.0"),
    ({"ratio": -0.1}, "option 'ratio' must be a finite float >= 0 and < 1"),
    ({}, "give exactly one of ratio, target_macs, target_params"),
    ({"ratio": 0.3, "target_macs": 0.5}, "got ratio, target_macs"),
    ({"target_macs": 0.0}, "option 'target_macs' must be a finite float > 0 and <= 1"),
    ({"ratio": 0.3, "importance": "random"}, "option 'importance' must be one of bn_scale, fpgm, l1, l2, taylor or an "
                                             "Importance object, got str 'random'"),
    ({"ratio": 0.3, "scope": "local"}, "option 'scope' must be one of uniform, global"),
    ({"ratio": 0.3, "round_to": 0}, "option 'round_to' must be an int >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError) as info:
        PruneChannels(**options)
    assert message in str(info.value)


def test_unreachable_budget_and_missing_layers():
    graph = graphopt.trace(Residual().eval(), torch.randn(1, 3, 6, 6))
    with pytest.raises(PassFailed, match="cannot reach macs <= 1.0% of the original"):
        PassManager([PruneChannels(target_macs=0.01)]).run(graph)
    with pytest.raises(PassFailed, match="exclude pattern 'layer9' matches no layer of the model; e.g. stem, "):
        PassManager([PruneChannels(ratio=0.3, exclude=["layer9"])]).run(graph)
    with pytest.raises(PassFailed, match=r"layers pattern 'c\?9' matches no layer of the model"):
        PassManager([PruneChannels(ratio=0.3, layers=["c?9"])]).run(graph)
    with pytest.raises(PassFailed, match="layer 'nope' does not exist"):
        PassManager([PruneChannels(ratio=0.3, overrides={"nope": 0.5})]).run(graph)


def test_nothing_prunable_is_said_not_silently_skipped():
    with pytest.raises(PassFailed, match="nothing prunable: all 1 channel groups are blocked; "
                                         r"blocking: reaches the model output \(1 group\)") as info:
        PassManager([PruneChannels(ratio=0.5)]).run(graphopt.trace(nn.Sequential(nn.Linear(4, 3)),
                                                                   torch.randn(2, 4)))
    assert isinstance(info.value.cause, NothingToPrune)
    with pytest.raises(PassFailed, match="no conv, linear or embedding layer"):
        PassManager([PruneChannels(ratio=0.5)]).run(graphopt.trace(nn.ReLU(), torch.randn(2, 4)))


class _UnknownOps(nn.Module):
    """Three groups blocked by ops the channel analysis has no rule for, two by the same op."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.cummax(self.a(x), dim=1).values
        x = torch.cummax(self.b(x), dim=1).values
        return self.d(torch.special.erfinv(torch.tanh(self.c(x)) * 0.5))


def test_an_all_blocked_model_lists_its_blocking_ops_with_counts():
    graph = graphopt.trace(_UnknownOps().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(PassFailed) as info:
        PassManager([PruneChannels(ratio=0.5)]).run(graph)
    message = str(info.value)
    assert "all 4 channel groups are blocked" in message
    assert "cummax (unknown) is not understood by the channel analysis (2 groups, e.g. at cummax)" in message
    assert "special_erfinv (unknown) is not understood by the channel analysis (1 group" in message
    assert message.index("cummax (unknown)") < message.index("special_erfinv (unknown)")   # most frequent first


def test_excluded_layer_keeps_its_channels_and_layers_chooses_the_others():
    result = prune(randomize_bn(Residual()), torch.randn(1, 3, 6, 6), ratio=0.5, exclude=["c1"])
    assert result.graph.gm.get_submodule("c1").out_channels == 4
    assert result.graph.gm.get_submodule("stem").out_channels == 4
    result = prune(randomize_bn(Residual()), torch.randn(1, 3, 6, 6), ratio=0.5, layers=["c1"])
    assert result.graph.gm.get_submodule("c1").out_channels == 2
    assert result.records[1].contract_error <= 1e-5


def test_prune_plan_from_the_cli_changes_nothing(capsys):
    from graphopt.tools.cli import main as cli_main

    assert cli_main(["inspect", "resnet18", "--input-shape", "1,3,32,32", "--prune-plan",
                     "--target-macs", "0.5", "--round-to", "8"]) == 0
    out = capsys.readouterr().out
    assert "layer1.1.conv2 + layer1.0.conv2 + conv1" in out
    assert "blocked: reaches the model output" in out
    assert "12/13 groups prunable" in out and "nothing has been changed" in out


def test_pruning_and_distillation_in_a_toml_pipeline(tmp_path):
    import json

    from graphopt.tools.cli import main as cli_main

    pipeline = digits_pipeline(tmp_path, """

[data]
train_data = "graphopt.tools.digits:train_batches"

[[passes]]
name = "fold_batchnorm"

[[passes]]
name = "prune_channels"
target_macs = 0.5
importance = "taylor"
exclude = ["features.0"]

[[passes]]
name = "distill"
epochs = 2
progress = false

[evaluate]
data = "graphopt.tools.digits:test_batches"

[report]
json = "report.json"
""", batch=1, name="prune.toml")
    assert cli_main(["run", str(pipeline), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    prune = next(r for r in report["passes"] if r["name"] == "prune_channels")
    assert prune["macs"] <= 0.5 * report["passes"][0]["macs"]
    assert prune["contract_error"] <= 1e-5
    assert report["metrics"]["after"]["top1"] >= report["metrics"]["before"]["top1"] - 0.03


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_heads_are_pruned_whole(batch_first, tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 8, batch_first=batch_first)
            self.ff1 = nn.Linear(32, 64)
            self.ff2 = nn.Linear(64, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            x = x + self.ff2(torch.relu(self.ff1(x)))
            return self.head(x)

    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    result = prune(Encoder(), x, ratio=0.5)
    attn = result.graph.gm.get_submodule("attn")
    assert type(attn).__name__ == "PrunedMultiheadAttention"
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (4, 4, 32)
    assert attn.out_proj.in_features == 16
    assert result.graph.gm.get_submodule("ff1").out_features == 32
    assert result.records[1].contract_error <= 1e-5
    cost = result.graph.analysis("cost")
    tokens = 10
    assert cost.nodes["attn"].macs == 4 * tokens * 32 * 16 + 2 * tokens * 5 * 16
    ts_backend.export(result.graph, tmp_path / "enc.pt")
    onnx_backend.export(result.graph, tmp_path / "enc.onnx")


def test_embeddings_and_shape_literals_are_rewritten():
    class TextAndImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.txt = nn.Linear(16, 4)
            self.conv = nn.Conv2d(3, 8, 1)
            self.img = nn.Linear(8 * 2 * 2, 4)

        def forward(self, tokens, image):
            t = self.txt(self.emb(tokens).mean(1))
            i = self.img(torch.relu(self.conv(image)).view(-1, 32))  # literal 8 * 2 * 2
            return t + i

    model = TextAndImage().eval()
    inputs = (torch.randint(0, 50, (3, 7)), torch.randn(3, 3, 2, 2))
    result = PassManager([PruneChannels(ratio=0.5)]).run(graphopt.trace(model, inputs))
    gm = result.graph.gm
    assert gm.get_submodule("emb").embedding_dim == 8 and gm.get_submodule("txt").in_features == 8
    assert gm.get_submodule("conv").out_channels == 4 and gm.get_submodule("img").in_features == 16
    view = next(n for n in result.graph.nodes if n.target == "view")
    assert view.args[1:] == (-1, 16)
    assert result.records[1].contract_error <= 1e-5
    assert result.graph.run(*inputs).shape == (3, 4)
