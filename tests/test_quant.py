"""Quantization core and passes: observers, placement, folding, CLE, bias correction, bad input."""
import math

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ConfigError, PassContext, PassManager, RequirementError
from graphopt.quant.calibration import ChannelMeanObserver, make_observer
from graphopt.passes import BiasCorrection, CrossLayerEqualization, FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.passes.insert_qdq import sqnr_db
from graphopt.quant.qparams import (FUSED_KEY, affine_qparams, dequantize_per_channel, is_activation_fq, is_weight_dq,
                                    is_weight_fq, qparams, weight_scales)
from graphopt.tools.fashion_cnn import FashionCNN

from conftest import randomize_bn


# -- observers against hand-computed values --------------------------------------------
def test_minmax_and_moving_average_observers():
    minmax = make_observer("minmax")
    for batch in ([1.0, -2.0, 3.0], [0.5, 4.0]):
        minmax.update(torch.tensor(batch))
    assert minmax.range() == (-2.0, 4.0)
    moving = make_observer("moving_average", momentum=0.5)
    for batch in ([0.0, 1.0], [-1.0, 3.0]):
        moving.update(torch.tensor(batch))
    assert moving.range() == pytest.approx((-0.5, 2.0))


def test_percentile_observer_clips_tails_within_a_bin():
    observer = make_observer("percentile", percentile=99.0, bins=1024)
    observer.update(torch.linspace(0, 1, 100_001))
    lo, hi = observer.range()
    width = 2 * observer.limit / observer.bins
    assert lo == pytest.approx(0.01, abs=2 * width)
    assert hi == pytest.approx(0.99, abs=2 * width)


def test_histogram_grows_by_merging_bins_without_losing_counts():
    observer = make_observer("percentile")
    observer.update(torch.tensor([0.5, -0.25]))
    observer.update(torch.tensor([3.0]))
    assert observer.limit == 4.0                      # 0.5 -> 1 -> 2 -> 4
    assert observer.hist.sum().item() == 3
    assert observer.hist.numel() == 2048              # bounded memory


def test_mse_observer_matches_a_brute_force_search_on_the_raw_data():
    torch.manual_seed(0)
    data = torch.distributions.Laplace(0.0, 1.0).sample((50_000,)).relu() * 3   # heavy right tail
    observer = make_observer("mse")
    observer.update(data)
    best, best_err = None, float("inf")
    for f in torch.linspace(0.01, 1.0, 100):
        qp = affine_qparams(0.0, data.max().item() * f.item())
        err = (torch.fake_quantize_per_tensor_affine(data, qp.scale, qp.zero_point, 0, 255) - data).pow(2).sum()
        if err < best_err:
            best, best_err = data.max().item() * f.item(), err
    lo, hi = observer.range()
    assert lo == 0.0
    assert hi == pytest.approx(best, rel=0.05)
    assert hi <= data.max().item()


def test_affine_and_weight_parameters():
    qp = affine_qparams(-1.0, 3.0)
    assert qp.scale == pytest.approx(4 / 255) and qp.zero_point == 64
    assert affine_qparams(0.0, 2.55).zero_point == 0
    w = torch.tensor([[0.5, -1.27], [0.0, 0.0]])
    assert weight_scales(w).tolist() == pytest.approx([0.01, 1.0])


def test_channel_mean_observer():
    observer = ChannelMeanObserver()
    observer.update(torch.arange(12.0).view(1, 3, 2, 2))
    observer.update(torch.zeros(1, 3, 2, 2))
    assert observer.mean().tolist() == pytest.approx([0.75, 2.75, 4.75])


# -- insertion and folding ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_graph():
    torch.manual_seed(1)
    return graphopt.trace(randomize_bn(FashionCNN(width=8)), torch.randn(4, 1, 28, 28))


def calib(n=4, batch=8, shape=(1, 28, 28)):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(batch, *shape, generator=gen) for _ in range(n)]


def quantize(graph, *passes, data=None):
    context = PassContext({"calibration_data": data or calib()})
    return PassManager([FoldBatchNorm(), *passes], context=context).run(graph)


def test_insert_qdq_places_nodes_and_bounds_the_error(cnn_graph):
    result = quantize(cnn_graph, InsertQDQ(progress=False))
    stats = result.records[-1].stats
    # 4 layers (3 conv + fc) and 1 add are int8; fake-quants: input, 3 conv outputs (after ReLU where fused),
    # the add output, the shared one after average pooling, and the fc output
    assert (stats["int8_layers"], stats["quantized_adds"], stats["fake_quant_nodes"]) == (4, 1, 7)
    assert stats["sqnr_db"] > 25
    assert result.records[-1].max_error < 0.1
    g = result.graph
    assert sum(is_weight_fq(n) for n in g.nodes) == 4
    shared = [n for n in g.nodes if is_activation_fq(n) and n.args[0].name.startswith("pool")]
    assert len(shared) == 1 and qparams(shared[0]) == qparams(
        next(n for n in g.nodes if is_activation_fq(n) and n.args[0].name == "relu"))


def test_fold_qdq_is_bit_exact_and_stores_int8(cnn_graph):
    result = quantize(cnn_graph, InsertQDQ(progress=False), FoldQDQ())
    fold = result.records[-1]
    assert fold.max_error == 0.0
    assert fold.stats["int8_weights"] == 4 and fold.stats["fused_activations"] == 3
    g = result.graph
    dqs = [n for n in g.nodes if is_weight_dq(n)]
    assert len(dqs) == 4 and all(g.attr(n.args[0].target).dtype == torch.int8 for n in dqs)
    assert not any(is_weight_fq(n) for n in g.nodes)
    assert sum(bool(n.meta.get(FUSED_KEY)) for n in g.nodes) == 3
    cost = g.analysis("cost")
    assert cost.bytes_by_dtype["int8"] > 4 * cost.bytes_by_dtype["float32"]


def test_dequantize_per_channel_matches_fake_quant():
    w = torch.randn(6, 3, 3, 3)
    s = weight_scales(w)
    q = torch.round(torch.fake_quantize_per_channel_affine(w, s, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
                    / s.view(-1, 1, 1, 1)).to(torch.int8)
    assert torch.equal(dequantize_per_channel(q, s, 0),
                       torch.fake_quantize_per_channel_affine(w, s, torch.zeros(6, dtype=torch.int32), 0, -127, 127))


def test_mixed_precision_policies_keep_layers_float(cnn_graph):
    result = quantize(cnn_graph, InsertQDQ(progress=False, first_layer="float", last_layer="float"))
    stats = result.records[-1].stats
    assert stats["int8_layers"] == 2
    assert set(stats["float_layers"]) == {"stem_0", "fc"}
    sens = quantize(cnn_graph, InsertQDQ(progress=False, sensitive_float=1)).records[-1].stats
    assert len(sens["sensitivity"]) == 4 and sens["int8_layers"] == 3
    worst = max(sens["sensitivity"], key=sens["sensitivity"].get)
    assert "sensitive" in sens["float_layers"][worst]


# -- cross-layer equalization and bias correction ----------------------------------------
class ReluChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        with torch.no_grad():  # very unequal channel ranges
            self.a.weight.mul_(torch.logspace(-2, 2, 8).view(-1, 1, 1, 1))
            self.dw.weight.mul_(torch.logspace(1, -1, 8).view(-1, 1, 1, 1))

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = nn.functional.relu(self.dw(x))
        return self.fc(torch.flatten(self.b(x), 1))


def test_cle_preserves_relu_networks_exactly_and_equalizes_ranges():
    torch.manual_seed(0)
    model = ReluChain().eval()
    graph = graphopt.trace(model, torch.randn(2, 3, 6, 6))
    result = PassManager([CrossLayerEqualization()]).run(graph)   # EXACT contract is checked by the manager
    assert result.records[-1].stats["pairs"] == 2
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(result.graph.run(x), graph.run(x), rtol=1e-5, atol=1e-5)
    a = result.graph.gm.a.weight.flatten(1).abs().amax(1)
    dw = result.graph.gm.dw.weight.flatten(1).abs().amax(1)
    spread_before = model.a.weight.flatten(1).abs().amax(1)
    assert (a.max() / a.min()) < (spread_before.max() / spread_before.min()) / 10
    assert dw.max() / dw.min() < 100


def test_cle_rescales_only_pairs_of_chosen_layers():
    graph = graphopt.trace(ReluChain().eval(), torch.randn(2, 3, 6, 6))
    for options, pairs in (({"exclude": ["dw"]}, 0), ({"layers": ["a", "dw"]}, 1), ({"layers": ["*"]}, 2)):
        result = PassManager([CrossLayerEqualization(**options)]).run(graph)
        assert result.records[-1].stats["pairs"] == pairs, options
    with pytest.raises(graphopt.PassFailed, match="exclude pattern 'dv' matches no conv/linear layer of the model; "
                                                  "e.g. a, dw, b, fc"):
        PassManager([CrossLayerEqualization(exclude=["dv"])]).run(graph)


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    with torch.no_grad():
        model[0].weight.mul_(3)
    data = [torch.rand(64, 64) + 1.0 for _ in range(4)]        # inputs with a large mean
    graph = graphopt.trace(model, data[0][:2])
    x = torch.cat(data)

    def mean_shift(passes):
        g = PassManager(passes, context=PassContext({"calibration_data": data})).run(graph).graph
        return (g.run(x) - graph.run(x)).mean(0).abs().mean().item()

    plain = mean_shift([InsertQDQ(progress=False, observer="minmax")])
    corrected = mean_shift([InsertQDQ(progress=False, observer="minmax"), BiasCorrection(progress=False)])
    assert corrected < plain / 2
    quantized = PassManager([InsertQDQ(progress=False, observer="minmax")],
                            context=PassContext({"calibration_data": data})).run(graph).graph
    only_first = PassManager([BiasCorrection(progress=False, layers=["0"])],
                             context=PassContext({"calibration_data": data})).run(quantized)
    assert only_first.records[-1].stats["corrected"] == 1
    with pytest.raises(graphopt.PassFailed, match="layers pattern '5' matches no int8 conv/linear layer"):
        PassManager([BiasCorrection(progress=False, layers=["5"])],
                    context=PassContext({"calibration_data": data})).run(quantized)


# -- bad input ------------------------------------------------------------------------------
def test_no_calibration_data_is_a_requirement_error(cnn_graph):
    with pytest.raises(RequirementError, match="requires 'calibration_data'"):
        PassManager([InsertQDQ()]).run(cnn_graph)
    with pytest.raises(graphopt.PassFailed, match="no calibration data"):
        PassManager([InsertQDQ()], context=PassContext({"calibration_data": None})).run(cnn_graph)


def test_wrong_shape_loader_is_named(cnn_graph):
    with pytest.raises(graphopt.PassFailed, match=r"calibration batch 0 has input shapes \[\(8, 3, 28, 28\)\]"):
        quantize(cnn_graph, InsertQDQ(progress=False), data=calib(shape=(3, 28, 28)))
    with pytest.raises(graphopt.PassFailed, match="yielded no batches"):
        PassManager([InsertQDQ(progress=False)], context=PassContext({"calibration_data": []})).run(cnn_graph)


def test_a_one_shot_generator_is_read_once(cnn_graph):
    batches = iter(calib())
    result = quantize(cnn_graph, InsertQDQ(progress=False, sensitive_float=1), data=batches)
    assert result.records[-1].stats["int8_layers"] == 3


def test_bad_options():
    with pytest.raises(ConfigError, match="option 'observer' must be one of minmax, moving_average, mse, percentile, got str 'kl'"):
        InsertQDQ(observer="kl")
    with pytest.raises(ConfigError, match="option 'first_layer' must be one of int8, float, got str 'fp16'"):
        InsertQDQ(first_layer="fp16")
    with pytest.raises(ConfigError, match="option .percentile. must be a finite float > 50 and <= 100, got float 20.0"):
        InsertQDQ(observer="percentile", percentile=20.0)


class ReflectAndDead(nn.Module):
    """A conv with no int8 kernel (reflect padding) and a branch that is always zero."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.dead = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.zero_()

    def forward(self, x):
        y = torch.relu(self.reflect(x))
        return self.head(torch.relu(self.dead(y))) + y


def test_no_int8_kernel_and_zero_range_fall_back_to_named_float():
    graph = graphopt.trace(ReflectAndDead().eval(), torch.randn(2, 3, 8, 8))
    result = PassManager([InsertQDQ(progress=False)],
                         context=PassContext({"calibration_data": calib(shape=(3, 8, 8))})).run(graph)
    stats = result.records[-1].stats
    assert "no int8 kernel" in stats["float_layers"]["reflect"]
    assert stats["zero_range_tensors"] == ["relu_1"]
    assert "cannot be quantized" in stats["float_layers"]["head"]
    out = result.graph.run(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()
    assert math.isfinite(sqnr_db(graph.run(), result.graph.run()))


@pytest.mark.parametrize("clamp", ["module_relu6", "functional_hardtanh", "method_relu"])
def test_every_spelling_of_a_zero_clamp_is_placed_and_fused_alike(clamp):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x)
            y = {"module_relu6": lambda: self.act(y), "functional_hardtanh": lambda: nn.functional.hardtanh(y, 0.0, 6.0),
                 "method_relu": lambda: y.relu()}[clamp]()
            return self.fc(y.mean((2, 3)))

    g = graphopt.trace(Net().eval(), torch.randn(2, 3, 8, 8))
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    result = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(g)
    conv = next(n for n in result.graph.nodes if n.target is nn.functional.conv2d)
    # the clamp became part of the conv (its quantized output saturates at zero instead)
    assert result.records[2].stats["fused_activations"] == 1
    assert conv.meta.get(FUSED_KEY) and len(conv.users) == 1 and is_activation_fq(next(iter(conv.users)))
