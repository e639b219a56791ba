import math

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ConfigError, PassContext, PassFailed, PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import Distill, SplitLowRank
from graphopt.app.pipeline import load_pipeline, run_pipeline
from graphopt.tools import digits
from graphopt.tools.digits import train_batches, trained_digits_cnn

from conftest import digits_pipeline


class ConvNet(nn.Module):
    """A 3x3 conv (stride 2, dilation), a 1x1 conv, a depthwise and a grouped conv, two Linears."""

    def __init__(self, padding_mode="zeros", bias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, padding_mode=padding_mode, bias=bias)
        self.body = nn.Conv2d(24, 32, (3, 5), stride=2, padding=(2, 1), dilation=(2, 1),
                              padding_mode=padding_mode, bias=bias)
        self.point = nn.Conv2d(32, 32, 1, bias=bias)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc1 = nn.Linear(32, 48, bias=bias)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.point(self.body(x)))
        x = self.grouped(self.depthwise(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(2, 3, 12, 12)


def split(model, x=X, **options):
    result = PassManager([SplitLowRank(**options)]).run(graphopt.trace(model.eval(), x))
    return result, result.records[1]


def factors(graph, name):
    return list(graph.gm.get_submodule(name).children())


# -- exactness at full rank -------------------------------------------------------------
@pytest.mark.parametrize("conv_method", ["spatial", "tucker2"])
@pytest.mark.parametrize("padding_mode, bias", [("zeros", True), ("reflect", False), ("circular", True)])
def test_full_rank_split_is_exact(conv_method, padding_mode, bias):
    model = ConvNet(padding_mode, bias).eval()
    result, record = split(model, ratio=1.0, only_if_cheaper=False, conv_method=conv_method)
    assert record.contract == "exact" and record.max_error <= 1e-5
    assert record.stats["split"] == 5
    assert set(record.stats["layers"]) == {"stem", "body", "point", "fc1", "fc2"}
    assert record.stats["layers"]["body"]["method"] == conv_method
    assert record.stats["layers"]["point"]["method"] == "svd"
    assert all(d["error"] <= 1e-6 for d in record.stats["layers"].values())
    x = torch.randn(3, 3, 12, 12)
    ref = model(x)
    assert (result.graph.run(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in factors(result.graph, "body"))


def test_grouped_and_depthwise_convs_are_left_alone_with_a_reason():
    _, record = split(ConvNet(), ratio=1.0, only_if_cheaper=False)
    skipped = record.stats["skipped_layers"]
    assert skipped["depthwise"] == "depthwise conv (groups=32): already one filter per channel"
    assert skipped["grouped"] == "grouped conv (groups=4): only groups=1 is split"


# -- numbers ----------------------------------------------------------------------------
def relative_tail(sigma: torch.Tensor, rank: int) -> float:
    """sqrt(sum of discarded sigma^2 / sum sigma^2)."""
    energy = sigma.double() ** 2
    return math.sqrt(energy[rank:].sum().item() / energy.sum().item())


def test_linear_split_error_is_the_discarded_singular_energy_and_factors_share_sqrt_sigma():
    model = nn.Sequential(nn.Linear(40, 30)).eval()
    result, record = split(model, torch.randn(5, 40), ratio=0.3)
    details = record.stats["layers"]["0"]
    assert details["method"] == "svd" and details["rank"] == 9 and details["full_rank"] == 30  # ceil(0.3 * 30)
    first, second = factors(result.graph, "0")
    assert (first.in_features, first.out_features, first.bias) == (40, 9, None)
    assert (second.in_features, second.out_features) == (9, 30)
    w = model[0].weight.detach().double()
    sigma = torch.linalg.svdvals(w)
    assert details["error"] == pytest.approx(relative_tail(sigma, 9), rel=1e-4)
    rebuilt = second.weight.double() @ first.weight.double()
    assert ((w - rebuilt).norm() / w.norm()).item() == pytest.approx(relative_tail(sigma, 9), rel=1e-4)
    # sqrt(Sigma) in both factors: A A^T = B^T B = diag(sigma_1..r)
    a, b = first.weight.double(), second.weight.double()
    torch.testing.assert_close(a @ a.T, torch.diag(sigma[:9]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.T @ b, torch.diag(sigma[:9]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second.bias, model[0].bias)


def test_data_aware_split_minimises_the_output_error_on_the_calibration_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24)).eval()
    mixing = torch.randn(32, 32) * torch.logspace(0, -3, 32)      # inputs live near a few directions
    batches = [torch.randn(64, 32) @ mixing.T for _ in range(4)]
    context = PassContext({"calibration_data": batches})
    x = torch.cat(batches)
    signal = model(x) - model[0].bias
    errors, reported = {}, {}
    for aware in (False, True):
        result = PassManager([SplitLowRank(overrides={"0": 6}, data_aware=aware, progress=False)],
                             context=context).run(graphopt.trace(model, batches[0]))
        errors[aware] = ((result.graph.gm(x) - model(x)).norm() / signal.norm()).item()
        reported[aware] = result.records[-1].stats["layers"]["0"].get("output_error")
    assert errors[True] < 0.5 * errors[False]
    assert reported[False] is None                      # weight-only splits report the weight error only
    assert reported[True] == pytest.approx(errors[True], rel=1e-3)


def test_data_aware_split_is_exact_at_full_rank():
    model = nn.Sequential(nn.Linear(20, 64)).eval()
    x = torch.randn(8, 20)
    result = PassManager([SplitLowRank(overrides={"0": 20}, data_aware=True, only_if_cheaper=False,
                                       progress=False)]).run(graphopt.trace(model, x))
    assert result.records[-1].stats["split"] == 1
    torch.testing.assert_close(result.graph.gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_spatial_split_error_is_the_discarded_energy_of_the_reshaped_kernel():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    result, record = split(nn.Sequential(conv), torch.randn(1, 6, 10, 10), overrides={"0": {"rank": 4, "method": "spatial"}})
    first, second = factors(result.graph, "0")
    assert (first.kernel_size, first.out_channels, second.kernel_size) == ((3, 1), 4, (1, 3))
    w = conv.weight.detach().double()
    sigma = torch.linalg.svdvals(w.permute(1, 2, 0, 3).reshape(6 * 3, 8 * 3))
    assert record.stats["layers"]["0"]["error"] == pytest.approx(relative_tail(sigma, 4), rel=1e-4)


def test_tucker2_error_matches_the_rebuilt_kernel_and_hooi_does_not_hurt():
    conv = nn.Conv2d(16, 20, 3, padding=1)
    w = conv.weight.detach().double()
    errors = []
    for iters in (0, 3):
        result, record = split(nn.Sequential(conv), torch.randn(1, 16, 8, 8),
                               overrides={"0": {"rank": [5, 6], "method": "tucker2"}}, hooi_iters=iters)
        a, core, c = factors(result.graph, "0")
        assert (a.out_channels, core.in_channels, core.out_channels, c.in_channels) == (5, 5, 6, 6)
        rebuilt = torch.einsum("ob,bakl,ai->oikl", c.weight.double()[:, :, 0, 0], core.weight.double(),
                               a.weight.double()[:, :, 0, 0])
        measured = ((w - rebuilt).norm() / w.norm()).item()
        assert record.stats["layers"]["0"]["error"] == pytest.approx(measured, rel=1e-4)
        errors.append(measured)
    # HOSVD's bound: the error is at most the energy dropped on both modes
    tail0 = torch.linalg.svdvals(w.reshape(20, -1))[6:].pow(2).sum()
    tail1 = torch.linalg.svdvals(w.transpose(0, 1).reshape(16, -1))[5:].pow(2).sum()
    assert errors[0] ** 2 <= ((tail0 + tail1) / w.pow(2).sum()).item() + 1e-9
    assert errors[1] <= errors[0] + 1e-9


def test_macs_after_split_equal_the_formula():
    model = ConvNet().eval()
    graph = graphopt.trace(model, X)
    before = graph.analysis("cost").macs
    layers = {"stem": {"rank": 6, "method": "spatial"}, "body": {"rank": [8, 10], "method": "tucker2"},
              "fc1": 5}
    result = PassManager([SplitLowRank(overrides=layers, exclude=["point", "fc2"])]).run(graph)
    n, h0, w0 = 2, 12, 12                    # stem: 3x3, pad 1 -> 12 x 12
    h1 = (12 + 4 - 2 * 2 - 1) // 2 + 1       # body: kernel (3, 5), pad (2, 1), dilation (2, 1), stride 2
    w1 = (12 + 2 - 5) // 2 + 1
    stem_old, stem_new = n * h0 * w0 * 24 * 3 * 9, n * h0 * 12 * 6 * 3 * 3 + n * h0 * w0 * 24 * 6 * 3
    body_old = n * h1 * w1 * 32 * 24 * 15
    body_new = n * h0 * w0 * 24 * 8 + n * h1 * w1 * (8 * 10 * 15 + 10 * 32)
    fc1_old, fc1_new = n * 32 * 48, n * 5 * (32 + 48)
    expected = before - stem_old - body_old - fc1_old + stem_new + body_new + fc1_new
    assert result.graph.analysis("cost").macs == result.records[1].macs == expected
    stats = result.records[1].stats["layers"]
    assert stats["stem"]["macs"] == [stem_old, stem_new] and stats["body"]["macs"] == [body_old, body_new]
    assert stats["fc1"]["macs"] == [fc1_old, fc1_new]
    assert set(stats) == {"stem", "body", "fc1"}
    assert result.records[1].stats["skipped_layers"]["point"] == "excluded"


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_global_budget_is_met(target):
    result, record = split(ConvNet(), **{target: 0.5})
    key = "macs" if target == "target_macs" else "params"
    start = getattr(result.records[0], key)
    assert getattr(record, key) <= 0.5 * start
    assert getattr(record, key) >= 0.3 * start  # greedy stops once the budget is met
    assert record.stats["split"] >= 1
    assert all(d["macs"][1] < d["macs"][0] for d in record.stats["layers"].values())


def low_rank_weight(out_features, in_features, rank, noise=1e-3):
    return torch.randn(out_features, rank) @ torch.randn(rank, in_features) / rank ** 0.5 + \
        noise * torch.randn(out_features, in_features)


def test_budget_cuts_first_where_error_per_mac_saved_is_least():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(low_rank_weight(64, 64, 4))   # nearly rank 4: cutting it is almost free
    _, record = split(model, torch.randn(4, 64), target_macs=0.75)
    assert list(record.stats["layers"]) == ["0"]
    assert record.stats["layers"]["0"]["rank"] <= 16 and record.stats["layers"]["0"]["error"] < 0.01
    assert record.stats["skipped_layers"] == {"2": "kept whole by the budget allocation"}


def test_energy_rule_keeps_the_smallest_rank_with_that_share_and_rounds_to_a_multiple():
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))
    sigma = 0.8 ** torch.arange(64.0)
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(sigma) @ v.T)
    kept = torch.cumsum(sigma.double() ** 2, 0) / (sigma.double() ** 2).sum()
    expected = int((kept < 0.99).sum()) + 1
    _, record = split(nn.Sequential(layer), torch.randn(2, 64), energy=0.99)
    assert record.stats["layers"]["0"]["rank"] == expected
    assert record.stats["layers"]["0"]["error"] ** 2 <= 0.01 + 1e-9
    _, record = split(nn.Sequential(layer), torch.randn(2, 64), energy=0.99, rank_multiple=8)
    assert record.stats["layers"]["0"]["rank"] == 8 * math.ceil(expected / 8)


def test_a_layer_is_split_only_where_macs_drop():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64)).eval()
    _, record = split(model, torch.randn(2, 8), ratio=0.75)   # rank 6: 6 * 16 > 64 MACs per row
    assert record.stats["split"] == 1 and list(record.stats["layers"]) == ["1"]   # rank 6: 6 * 72 < 512
    assert record.stats["skipped_layers"]["0"] == "svd at rank 6 would not lower MACs (192 >= 128)"
    assert not split(model, torch.randn(2, 8), ratio=1.0)[1].changed


# -- exports ----------------------------------------------------------------------------
def test_split_model_exports_to_onnx_and_torchscript(tmp_path):
    result, record = split(ConvNet(), target_macs=0.6)
    assert record.stats["split"] >= 1
    forced, record = split(ConvNet(), overrides={"body": {"rank": [8, 8], "method": "tucker2"},
                                              "stem": {"rank": 4, "method": "spatial"}, "fc1": 4})
    assert {d["method"] for d in record.stats["layers"].values()} == {"svd", "spatial", "tucker2"}
    for graph in (result.graph, forced.graph):
        assert onnx_backend.export(graph, tmp_path / "m.onnx").max_rel_error <= 1e-4
        report = ts_backend.export(graph, tmp_path / "m.pt")
        assert report.details["method"] == "script" and report.max_rel_error <= 1e-4
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), graph.run(x), rtol=1e-4, atol=1e-5)


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"energy": 0.0}, r"pass 'split_low_rank': option 'energy' must be a finite float > 0 and <= 1 or None, got float 0.0"),
    ({"energy": 1.2}, r"option 'energy' must be a finite float > 0 and <= 1 or None, got float 1.2"),
    ({"ratio": -0.5}, r"option 'ratio' must be a finite float > 0 and <= 1"),
    ({"target_macs": 2.0}, r"option 'target_macs' must be a finite float > 0 and <= 1"),
    ({"ratio": 0.5, "energy": 0.9}, "give one of ratio, energy, target_macs, target_params, not ratio and energy"),
    ({"conv_method": "cp"}, "option 'conv_method' must be one of auto, spatial, tucker2, got str 'cp'"),
    ({"rank_multiple": 0}, "option 'rank_multiple' must be an int >= 1"),
    ({"overrides": {"fc1": 0}}, r"overrides\['fc1'\]: rank must be a positive integer"),
    ({"overrides": {"fc1": {"energy": 1.5}}}, r"overrides\['fc1'\].energy must be a number in \(0, 1\]"),
    ({"overrides": {"fc1": {"rnak": 3}}}, r"overrides\['fc1'\]: unknown key 'rnak'; valid keys: rank, ratio"),
    ({"overrides": {"fc1": 3}, "exclude": ["fc1"]}, "'fc1' is both excluded and given an override"),
    ({"exclude": "fc1"}, r"option 'exclude' must be list\[str\] or None, got str 'fc1'"),
    ({"data_aware": "yes"}, "option 'data_aware' must be bool, got str 'yes'"),
    ({"calibration_batches": 0}, "option 'calibration_batches' must be an int >= 1"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        SplitLowRank(**options)


@pytest.mark.parametrize("options, message", [
    ({"overrides": {"fc1": 40}}, r"overrides\['fc1'\]: rank 40 exceeds the largest possible rank 32 for method 'svd'"),
    ({"overrides": {"body": {"rank": [30, 8], "method": "tucker2"}}},
     r"ranks \[30, 8\] exceed the largest possible ranks \[24, 32\] for method 'tucker2'"),
    ({"overrides": {"body": 500}}, "rank 500 exceeds the largest possible rank 72 for method 'spatial'; method 'tucker2' takes two ranks"),
    ({"overrides": {"fc3": 4}}, "overrides names 'fc3', which is not a module of the graph; did you mean 'fc2', 'fc1'"),
    ({"exclude": ["stme"]}, "exclude pattern 'stme' matches no conv/linear layer of the model; did you mean 'stem'"),
    ({"overrides": {"depthwise": 4}}, r"overrides\['depthwise'\] cannot be split: depthwise conv"),
    ({"overrides": {"fc1": {"method": "tucker2"}}}, "method 'tucker2' does not apply to a Linear; valid: auto, svd"),
    ({"target_macs": 0.01}, "target_macs=0.01 cannot be reached: splitting every chosen layer"),
])
def test_bad_layer_settings_fail_naming_the_layer(options, message):
    graph = graphopt.trace(ConvNet().eval(), X)
    with pytest.raises(ConfigError, match=message):
        SplitLowRank(**options).run(graph.clone(), PassContext())
    with pytest.raises(PassFailed, match="pass 'split_low_rank' failed: ConfigError"):
        PassManager([SplitLowRank(**options)]).run(graph)


# -- pipelines and recovery -------------------------------------------------------------
def test_pipeline_file_splits_and_exports(tmp_path):
    path = digits_pipeline(tmp_path, """

[[passes]]
name = "fold_batchnorm"

[[passes]]
name = "split_low_rank"
target_macs = 0.6
rank_multiple = 2
exclude = ["features.0"]
overrides = { "classifier.2" = 6 }

[[backends]]
name = "onnx"
path = "out/split.onnx"

[[backends]]
name = "torchscript"
path = "out/split.pt"

[evaluate]
data = "graphopt.tools.digits:test_batches"
""", batch=1, name="p.toml")
    outcome = run_pipeline(load_pipeline(path), progress=False)
    record = outcome.records[2]
    assert record.name == "split_low_rank" and record.contract == "bounded"
    assert record.macs <= 0.6 * outcome.records[0].macs
    assert record.stats["layers"]["classifier.2"]["rank"] == 6
    assert record.stats["skipped_layers"]["features.0"] == "excluded"
    assert all(r % 2 == 0 for d in record.stats["layers"].values() if d["method"] != "svd"
               for r in ([d["rank"]] if isinstance(d["rank"], int) else d["rank"]))
    assert all(e.max_rel_error <= 1e-4 for e in outcome.exports)
    assert outcome.metrics["after"]["top1"] >= 0.5


def test_distillation_recovers_accuracy_after_splitting():
    graph = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    base = top1_accuracy(graph, digits.test_batches())
    split_only = PassManager([SplitLowRank(target_macs=0.3)]).run(graph)
    damaged = top1_accuracy(split_only.graph, digits.test_batches())
    result = PassManager([SplitLowRank(target_macs=0.3), Distill(epochs=3, lr=2e-3, progress=False)],
                         context=PassContext({"train_data": train_batches})).run(graph)
    recovered = top1_accuracy(result.graph, digits.test_batches())
    assert result.records[1].macs <= 0.3 * result.records[0].macs
    assert result.records[2].macs == result.records[1].macs   # distillation keeps the structure
    assert damaged < base - 0.02
    assert recovered > damaged and recovered >= base - 0.03
