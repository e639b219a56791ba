import pytest
import torch

import graphopt
from graphopt import ConfigError, PassContext, PassFailed, PassManager, RequirementError
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import FoldBatchNorm, PruneMagnitude, QuantizeWeights, ShareWeights
from graphopt.passes.prune_magnitude import schedule
from graphopt.passes.share_weights import kmeans_1d
from graphopt.tools import digits
from graphopt.tools.digits import train_batches, trained_digits_cnn
from graphopt.quant.weights import ANNOTATIONS_KEY

LAYERS = ("features.0", "features.3", "classifier.2")


@pytest.fixture(scope="module")
def folded():
    graph = graphopt.trace(trained_digits_cnn(), torch.rand(3, 1, 8, 8))
    return PassManager([FoldBatchNorm()]).run(graph).graph


def _weights(graph):
    return {name: graph.gm.get_submodule(name).weight.detach() for name in LAYERS}


def _run(graph, *passes, data=None):
    return PassManager(list(passes), context=PassContext(data or {})).run(graph)


def test_per_layer_pruning_zeros_the_smallest_fraction_of_each_layer(folded):
    result = _run(folded, PruneMagnitude(sparsity=0.6))
    before, after = _weights(folded), _weights(result.graph)
    for name in LAYERS:
        zero = after[name] == 0
        assert int(zero.sum()) == round(0.6 * zero.numel())
        assert before[name][zero].abs().max() <= before[name][~zero].abs().min()
        torch.testing.assert_close(after[name][~zero], before[name][~zero], rtol=0, atol=0)
    stats = result.records[-1].stats
    assert stats["per_layer"] == {name: pytest.approx(0.6, abs=0.003) for name in LAYERS}  # 86 of 144
    assert result.graph.gm.meta[ANNOTATIONS_KEY]["features.3.weight"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_global_pruning_uses_one_threshold(folded):
    result = _run(folded, PruneMagnitude(sparsity=0.5, scope="global"))
    before, after = _weights(folded), _weights(result.graph)
    total = sum(w.numel() for w in after.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == round(0.5 * total)
    largest_pruned = max(before[n][after[n] == 0].abs().max() for n in LAYERS)
    smallest_kept = min(before[n][after[n] != 0].abs().min() for n in LAYERS)
    assert largest_pruned <= smallest_kept
    assert len({round(v, 2) for v in result.records[-1].stats["per_layer"].values()}) > 1


def test_gradual_schedule_ramps_to_the_target():
    steps = schedule(0.8, 4)
    assert steps[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert steps[0] > 0.8 / 4  # front-loaded (cubic)


def test_gradual_pruning_with_distillation_keeps_zeros_and_recovers_accuracy(folded):
    with pytest.raises(RequirementError, match="train_data"):
        _run(folded, PruneMagnitude(sparsity=0.5, finetune_epochs=1))
    one_shot = _run(folded, PruneMagnitude(sparsity=0.6)).graph
    result = _run(folded, PruneMagnitude(sparsity=0.6, steps=2, finetune_epochs=1.0, lr=2e-3),
                  data={"train_data": train_batches})
    weights = _weights(result.graph)
    for name in LAYERS:
        assert int((weights[name] == 0).sum()) == round(0.6 * weights[name].numel())
    assert result.records[-1].contract == "none"
    tuned = top1_accuracy(result.graph, digits.test_batches())
    assert tuned >= top1_accuracy(one_shot, digits.test_batches())
    assert tuned >= 0.95


def test_kmeans_finds_separated_clusters():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    values = values + 0.01 * torch.randn(100)
    centroids, assignment = kmeans_1d(values, 4)
    assert assignment.unique().numel() >= 3
    torch.testing.assert_close(centroids[assignment], values, atol=0.05, rtol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_sharing_leaves_2_to_the_bits_fp16_values_and_keeps_zeros(folded, bits):
    pruned = _run(folded, PruneMagnitude(sparsity=0.5)).graph
    result = _run(pruned, ShareWeights(bits=bits))
    before, after = _weights(pruned), _weights(result.graph)
    for name in LAYERS:
        nonzero = after[name][after[name] != 0].unique()
        assert nonzero.numel() <= 2 ** bits
        assert torch.equal(nonzero.half().float(), nonzero)
        assert torch.equal(after[name] == 0, before[name] == 0)
    assert result.graph.gm.meta[ANNOTATIONS_KEY]["classifier.2.weight"]["shared"] == {"bits": bits}


def test_weight_sharing_finetuning_keeps_values_shared(folded):
    result = _run(folded, ShareWeights(bits=3, finetune_epochs=0.5, lr=1e-3), data={"train_data": train_batches})
    for name, w in _weights(result.graph).items():
        assert w.unique().numel() <= 8, name
    assert top1_accuracy(result.graph, digits.test_batches()) >= 0.9


@pytest.mark.parametrize("bits, granularity", [(8, "channel"), (4, "group"), (2, "channel")])
def test_lowbit_quantization_stores_code_times_scale(folded, bits, granularity):
    result = _run(folded, QuantizeWeights(bits=bits, granularity=granularity, group_size=16))
    qmax = 2 ** (bits - 1) - 1
    for name, w in _weights(result.graph).items():
        note = result.graph.gm.meta[ANNOTATIONS_KEY][f"{name}.weight"]["quant"]
        rows = w.reshape(-1, note["group_size"])
        codes = rows / note["scales"][:, None]
        assert torch.equal(codes, codes.round())
        assert codes.abs().max() <= qmax
        assert torch.equal(codes.round() * note["scales"][:, None], rows)
    stats = result.records[-1].stats
    assert stats["layers"] == 3
    if granularity == "group":
        assert stats["per_channel_fallback"] == 1  # features.0 has 9 weights per channel
    if bits == 8:
        assert result.records[-1].max_error < 0.02


def test_bound_is_enforced(folded):
    with pytest.raises(PassFailed, match="bounded contract"):
        _run(folded, QuantizeWeights(bits=2, bound=1e-4))


@pytest.mark.parametrize("make, message", [
    (lambda: PruneMagnitude(sparsity=1.0), "option 'sparsity' must be a finite float >= 0 and < 1, got float 1.0"),
    (lambda: PruneMagnitude(sparsity=-0.1), "option 'sparsity' must be a finite float >= 0 and < 1"),
    (lambda: PruneMagnitude(sparsity=True), "option .sparsity. must be float, got bool True"),
    (lambda: PruneMagnitude(scope="model"), "option 'scope' must be one of layer, global, got str 'model'"),
    (lambda: PruneMagnitude(steps=0), "option 'steps' must be an int >= 1, got int 0"),
    (lambda: PruneMagnitude(layers="features.*"), r"option 'layers' must be list\[str\] or None"),
    (lambda: ShareWeights(bits=1), "option 'bits' must be an int >= 2 and <= 8, got int 1"),
    (lambda: ShareWeights(bits=9), "option 'bits' must be an int >= 2 and <= 8"),
    (lambda: QuantizeWeights(bits=3), "option 'bits' must be one of 2, 4, 8, got int 3"),
    (lambda: QuantizeWeights(granularity="tensor"), "option 'granularity' must be one of channel, group"),
    (lambda: QuantizeWeights(group_size=0), "option 'group_size' must be an int >= 1"),
])
def test_bad_options_are_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_layer_patterns_select_layers(folded):
    result = _run(folded, PruneMagnitude(sparsity=0.5, exclude=["features.0"]))
    weights = _weights(result.graph)
    assert int((weights["features.0"] == 0).sum()) == 0
    assert result.records[-1].stats["layers"] == 2


def test_layers_with_small_filters_stay_dense(folded):
    # features.0's filters hold 9 weights (1 input channel, 3x3), like a depthwise 3x3 layer's
    result = _run(folded, PruneMagnitude(sparsity=0.6, min_fan_in=10))
    weights = _weights(result.graph)
    assert int((weights["features.0"] == 0).sum()) == 0
    assert int((weights["features.3"] == 0).sum()) == round(0.6 * weights["features.3"].numel())
    assert result.records[-1].stats["dense"] == ["features.0"]
    with pytest.raises(ConfigError, match="option 'min_fan_in' must be an int >= 0"):
        PruneMagnitude(min_fan_in=-1)


def test_later_finetuning_keeps_earlier_zeros_and_shared_values(folded):
    result = _run(folded, PruneMagnitude(sparsity=0.5, layers=["features.0"]), ShareWeights(bits=3, layers=["features.3"]),
                  PruneMagnitude(sparsity=0.5, layers=["classifier.2"], finetune_epochs=0.5, lr=2e-3),
                  data={"train_data": train_batches})
    weights = _weights(result.graph)
    assert int((weights["features.0"] == 0).sum()) == 72
    assert weights["features.3"].unique().numel() <= 8
    assert int((weights["classifier.2"] == 0).sum()) == 2560


def test_weight_sharing_reports_its_weight_error(folded):
    stats = _run(folded, ShareWeights(bits=2)).records[-1].stats
    assert 0.01 < stats["mean_weight_rel_error"] < 0.5


@pytest.mark.parametrize("make", [lambda **kw: PruneMagnitude(sparsity=0.5, **kw),
                                  lambda **kw: ShareWeights(bits=4, **kw)], ids=["prune_magnitude", "share_weights"])
def test_fine_tuning_with_probe_lr_survives_a_wrecking_lr(folded, make):
    """At lr 1.0 the digits CNN's fine-tuning ends at chance; probing lr, lr/10 and lr/100 first
    keeps it within a few points of the original (graphopt compress fine-tunes this way)."""
    original = top1_accuracy(folded.gm, digits.test_batches())
    scores = {}
    for probe in (False, True):
        torch.manual_seed(0)
        step = make(finetune_epochs=1, lr=1.0, probe_lr=probe)
        scores[probe] = top1_accuracy(_run(folded, step, data={"train_data": train_batches}).graph.gm,
                                      digits.test_batches())
    assert scores[False] < 0.3
    assert scores[True] > original - 0.03
