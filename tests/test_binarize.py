import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ConfigError, ExportError, PassContext, PassManager, RequirementError
from graphopt.backends import binary as binary_backend
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.backends import xnor_cpu
from graphopt.quant.binary import BinaryConv2d, BinaryLinear, binary_weight, freeze, sign_pm1, ste_sign
from graphopt.backends._bitpack import pack_bits, pack_words, packed_size, unpack_bits
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import Binarize, FoldBatchNorm, FreezeBinary
from graphopt.app.pipeline import load_pipeline, run_pipeline
from graphopt.tools import digits
from graphopt.tools.digits import train_batches

from conftest import digits_pipeline



def binarized(graph, **options):
    return PassManager([Binarize(progress=False, **options)]).run(graph).graph


# -- the arithmetic -------------------------------------------------------------------
def test_sign_of_zero_is_plus_one():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0, -3.0])
    expected = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    assert torch.equal(sign_pm1(x), expected)
    assert torch.equal(ste_sign(x), expected)
    layer = BinaryLinear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, -0.3, 0.6]]))
    assert torch.allclose(layer.effective_weight(), torch.tensor([[0.3, -0.3, 0.3]]))


def test_alpha_is_mean_absolute_weight_per_output_channel():
    w = torch.tensor([[[[1.0, -3.0]]], [[[-0.5, -0.5]]], [[[0.0, 0.2]]]])  # 3 out channels, 1x1x2
    out = binary_weight(w)
    expected = torch.tensor([[[[2.0, -2.0]]], [[[-0.5, -0.5]]], [[[0.1, 0.1]]]])
    torch.testing.assert_close(out, expected)
    conv = BinaryConv2d(1, 3, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    freeze(conv)
    assert not conv.weight.requires_grad and conv.frozen
    # frozen alpha is kept in fp16: 0.1 becomes the nearest half-precision value
    assert conv.weight[2, 0, 0, 0].item() == torch.tensor(0.1, dtype=torch.float16).item()
    assert torch.equal(conv.weight[:2], expected[:2])


def test_straight_through_gradient():
    x = torch.tensor([-2.0, -0.99, -0.5, 0.0, 0.5, 0.99, 2.0], requires_grad=True)
    ste_sign(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # latent weights receive gradients through sign and alpha
    layer = BinaryLinear(4, 2)
    layer(torch.randn(3, 4)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # binary activations: the shift is trained too
    layer = BinaryLinear(4, 2, activations=True)
    layer.train()
    layer(torch.randn(3, 4)).pow(2).sum().backward()
    assert layer.shift.grad is not None and layer.shift.grad.abs().sum() > 0


def test_bitpack_round_trip_and_words():
    bits = np.random.default_rng(0).random(77) > 0.5
    packed = pack_bits(bits)
    assert len(packed) == packed_size(77) == 10
    assert np.array_equal(unpack_bits(packed, 77), bits)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_bits(packed, 81)
    words = pack_words(bits.reshape(7, 11))
    assert words.shape == (7, 1) and words.dtype == np.uint64
    assert np.bitwise_count(words).sum() == bits.sum()


# -- the pass -------------------------------------------------------------------------
def test_default_keeps_first_and_last_layers_full_precision(digits_graph):
    result = PassManager([Binarize(progress=False)]).run(digits_graph)
    stats = result.records[1].stats
    assert stats["layers"] == ["features.3"]
    assert stats["full_precision"] == ["features.0", "classifier.2"]
    assert result.records[1].contract == "none"
    kinds = {name: type(m).__name__ for name, m in result.graph.modules().items()}
    assert kinds["features.3"] == "BinaryConv2d" and kinds["features.0"] == "Conv2d"
    assert kinds["classifier.2"] == "Linear"
    w = result.graph.gm.get_submodule("features.3").weight
    assert torch.equal(w.abs(), w.abs().amax(dim=(1, 2, 3), keepdim=True).expand_as(w))  # frozen: ±alpha


def test_layers_exclude_and_keep_options(digits_graph):
    graph = binarized(digits_graph, keep_last=False, exclude=["features.*"])
    assert isinstance(graph.gm.get_submodule("classifier.2"), BinaryLinear)
    assert not isinstance(graph.gm.get_submodule("features.3"), BinaryConv2d)
    graph = binarized(digits_graph, layers=["features.*"], keep_first=False)
    assert isinstance(graph.gm.get_submodule("features.0"), BinaryConv2d)
    assert isinstance(graph.gm.get_submodule("features.3"), BinaryConv2d)


@pytest.mark.parametrize("options, message", [
    ({"layers": ["*"]}, "layer 'features.0' is the model's input layer, which stays full precision by default"),
    ({"layers": ["classifier.2"]}, "layer 'classifier.2' is the model's output layer"),
    ({"layers": ["features.1"]}, r"cannot binarize layer 'features.1' \(BatchNorm2d\)"),
    ({"layers": ["head.*"]}, r"layers pattern 'head.\*' matches no conv/linear layer of the model"),
    ({"exclude": ["nothing"]}, "exclude pattern 'nothing' matches no conv/linear layer of the model"),
])
def test_bad_layer_choices_name_the_layer(digits_graph, options, message):
    with pytest.raises(ConfigError, match=message):
        Binarize(**options).select(digits_graph)


def test_unbinarizable_layer_type_is_named():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.mid = nn.Conv2d(4, 4, 3, padding="same")
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.mid(self.up(self.stem(x))))

    graph = graphopt.trace(Up().eval(), torch.randn(1, 1, 4, 4))
    with pytest.raises(ConfigError, match=r"cannot binarize layer 'up' \(ConvTranspose2d\)"):
        Binarize(layers=["up"]).select(graph)
    assert Binarize().select(graph)["binarize"] == ["mid"]  # by default the transpose conv is skipped
    with pytest.raises(ConfigError, match="layer 'mid': binary activations need numeric zero padding"):
        Binarize(activations=True).select(graph)


@pytest.mark.parametrize("options, message", [
    ({"layers": "features.3"}, r"option 'layers' must be list\[str\] or None, got str 'features.3' \(write"),
    ({"distill_epochs": -1.0}, "option 'distill_epochs' must be a finite float >= 0, got float -1.0"),
    ({"distill_alpha": 2.0}, "option 'distill_alpha' must be a finite float >= 0 and <= 1, got float 2.0"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Binarize(**options)


def test_distillation_trains_the_latent_weights(digits_graph):
    with pytest.raises(RequirementError, match="train_data"):
        PassManager([Binarize(distill_epochs=1)]).run(digits_graph)
    teacher_acc = top1_accuracy(digits_graph, digits.test_batches())
    raw = binarized(digits_graph, keep_last=False)
    result = PassManager([Binarize(keep_last=False, distill_epochs=3, lr=2e-3, progress=False)],
                         context=PassContext({"train_data": train_batches})).run(digits_graph)
    stats = result.records[1].stats
    assert stats["distill_steps"] == 69 and stats["distill_loss_last"] < stats["distill_loss_first"]
    trained = top1_accuracy(result.graph, digits.test_batches())
    assert trained > top1_accuracy(raw, digits.test_batches())
    assert trained >= teacher_acc - 0.03


def test_bn_folding_after_binarize_then_freeze(digits_graph, tmp_path):
    # latent weights: folding BN is exact (sign(W*f)*mean|W*f| = f*sign(W)*mean|W|); then freeze
    result = PassManager([Binarize(freeze=False, progress=False), FoldBatchNorm(), FreezeBinary()]).run(digits_graph)
    assert result.records[2].stats["folded"] == 2 and result.records[3].stats["frozen"] == 1
    binary_backend.save_binary(result.graph, tmp_path / "ok.gobin")
    # folding into an already frozen layer rescales alpha off the fp16 grid: saving says so
    stale = PassManager([Binarize(progress=False), FoldBatchNorm()]).run(digits_graph).graph
    with pytest.raises(ExportError, match="'features.3': weights are not ±alpha.*run freeze_binary"):
        binary_backend.save_binary(stale, tmp_path / "stale.gobin")
    unfrozen = binarized(digits_graph, freeze=False)
    with pytest.raises(ExportError, match="'features.3' still holds latent weights"):
        binary_backend.save_binary(unfrozen, tmp_path / "latent.gobin")
    assert sorted(os.listdir(tmp_path)) == ["ok.gobin"]


# -- storage --------------------------------------------------------------------------
@pytest.mark.parametrize("activations", [False, True])
def test_storage_round_trip_is_bit_identical_and_small(digits_graph, tmp_path, activations):
    graph = binarized(digits_graph, keep_last=False, activations=activations)
    path = tmp_path / "m.gobin"
    report = binary_backend.export(graph, path)
    assert report.max_abs_error == 0.0 and report.bytes == os.path.getsize(path)
    # 32x16x3x3 + 10x512 weights binarized: (4608 + 5120) / 8 bytes of bits + 2 * (32 + 10) of alpha
    assert report.details["binary_fp32_bytes"] == 4 * (4608 + 5120)
    assert report.details["binary_bytes"] == (4608 + 5120) // 8 + 2 * 42
    assert report.details["binary_ratio"] >= 25
    for template in (digits_graph, graph):  # the fp32 original or the binarized graph
        loaded = binary_backend.load_binary(path, template)
        ours, theirs = graph.gm.state_dict(), loaded.gm.state_dict()
        assert list(ours) == list(theirs)
        for key in ours:
            a, b = ours[key], theirs[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert a.numpy().tobytes() == b.numpy().tobytes(), key
        x = torch.randn(8, 1, 8, 8)
        assert torch.equal(loaded.run(x), graph.run(x))


def test_damaged_or_foreign_files_are_refused(digits_graph, tmp_path):
    graph = binarized(digits_graph)
    path = tmp_path / "m.gobin"
    binary_backend.save_binary(graph, path)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    (tmp_path / "bad.gobin").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum mismatch"):
        binary_backend.load_binary(tmp_path / "bad.gobin", digits_graph)
    (tmp_path / "x.gobin").write_bytes(b"hello world, not ours")
    with pytest.raises(ConfigError, match="not a graphopt binary-weights file"):
        binary_backend.load_binary(tmp_path / "x.gobin", digits_graph)
    other = graphopt.trace(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(1, 4))
    with pytest.raises(ConfigError, match="binary layer 'features.3' is not in the graph"):
        binary_backend.load_binary(path, other)


# -- exports --------------------------------------------------------------------------
def test_binary_weights_export_to_onnx_and_torchscript(digits_graph, tmp_path):
    # the deployment order: binarize, fold BatchNorm into the latent weights, freeze
    graph = PassManager([Binarize(keep_last=False, freeze=False, progress=False), FoldBatchNorm(),
                         FreezeBinary()]).run(digits_graph).graph
    report = onnx_backend.export(graph, tmp_path / "m.onnx")
    assert report.max_rel_error <= 1e-4
    model = onnx.load(tmp_path / "m.onnx")
    assert [n.op_type for n in model.graph.node].count("Conv") == 2 and "Sign" not in str(model)
    # the exported weights are the ±alpha values
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w = graph.gm.get_submodule("features.3").weight.detach().numpy()
    assert any(v.shape == w.shape and np.array_equal(v, w) for v in weights.values())
    report = ts_backend.export(graph, tmp_path / "m.pt")
    assert report.details["method"] == "script" and report.max_rel_error <= 1e-5


def test_binary_activations_export_with_sign_of_zero(tmp_path):
    # inputs exactly equal to the shift must binarize to +1 in onnxruntime too (ONNX Sign(0) = 0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 6)
    graph = graphopt.trace(model, x)
    graph = binarized(graph, activations=True)
    layer = graph.gm.get_submodule("2")
    with torch.no_grad():
        layer.shift.zero_()  # ReLU zeros now sit exactly on the threshold
    assert (graph.gm.get_submodule("1")(graph.gm.get_submodule("0")(x)) == 0).any()
    report = onnx_backend.export(graph, tmp_path / "m.onnx")
    assert report.max_rel_error <= 1e-5
    assert "Sign" not in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    report = ts_backend.export(graph, tmp_path / "m.pt")
    assert report.details["method"] == "script" and report.max_rel_error <= 1e-6


# -- XNOR-popcount runtime ------------------------------------------------------------
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (1, 2)])
def test_xnor_conv_matches_the_float_binary_layer(stride, padding):
    conv = BinaryConv2d(70, 16, 3, stride=stride, padding=padding, activations=True)
    with torch.no_grad():
        conv.shift.uniform_(-0.5, 0.5)
    freeze(conv.eval())
    x = torch.randn(3, 70, 9, 9)
    with torch.no_grad():
        expected = conv(x)
    out = xnor_cpu.run_layer(conv, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_xnor_linear_matches_and_rejects_weight_only_layers():
    linear = BinaryLinear(200, 10, activations=True)
    freeze(linear.eval())
    x = torch.randn(5, 200)
    with torch.no_grad():
        expected = linear(x)
    torch.testing.assert_close(xnor_cpu.run_layer(linear, x), expected, rtol=1e-5, atol=1e-5)
    weights_only = BinaryLinear(8, 2)
    freeze(weights_only)
    with pytest.raises(ConfigError, match="needs a frozen binary layer with binary activations"):
        xnor_cpu.compile_layer(weights_only)


# -- pipeline file --------------------------------------------------------------------
def test_binarize_from_a_pipeline_file(tmp_path):
    path = digits_pipeline(tmp_path, """

[data]
train_data = "graphopt.tools.digits:train_batches"

[[passes]]
name = "binarize"
keep_last = false
distill_epochs = 1.0
lr = 0.002
progress = false

[[backends]]
name = "binary"
path = "out/m.gobin"

[[backends]]
name = "onnx"
path = "out/m.onnx"

[evaluate]
data = "graphopt.tools.digits:test_batches"
""", batch=2, name="p.toml")
    outcome = run_pipeline(load_pipeline(path), progress=False)
    assert outcome.records[1].stats["layers"] == ["features.3", "classifier.2"]
    assert outcome.exports[0].details["binary_ratio"] >= 25
    assert outcome.metrics["after"]["top1"] >= 0.9


def _reseal(path, edit):
    """Edit a .gobin header and give the file a valid CRC again: a crafted, not a damaged, file."""
    import json
    import struct
    import zlib

    blob = path.read_bytes()
    magic = binary_backend.MAGIC
    (length,) = struct.unpack("<I", blob[len(magic):len(magic) + 4])
    start = len(magic) + 4
    header = json.loads(blob[start:start + length])
    edit(header)
    head = json.dumps(header).encode()
    body = magic + struct.pack("<I", len(head)) + head + blob[start + length:-4]
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(format=2), "format 2 is not supported"),
    (lambda h: h["tensors"][0].update(encoding="zstd"), "encoding 'zstd'; known: raw, bits"),
    (lambda h: h["tensors"][0].update(dtype="object"), "dtype 'object'"),
    (lambda h: h["tensors"][0].update(offset=10 ** 9), "lies outside the file"),
    (lambda h: h["tensors"][0].update(shape=[10 ** 6]), "its shape and dtype need"),
    (lambda h: h["tensors"][0].pop("name"), "a tensor entry has no name"),
    (lambda h: h.update(tensors={"a": 1}), "not a table of tensors and layers"),
])
def test_crafted_files_with_a_valid_crc_are_refused_by_name(digits_graph, tmp_path, edit, message):
    path = tmp_path / "m.gobin"
    binary_backend.save_binary(binarized(digits_graph), path)
    _reseal(path, edit)
    with pytest.raises(ConfigError, match=message):
        binary_backend.load_binary(path, digits_graph)
