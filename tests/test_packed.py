import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt import ConfigError, ExportError, GraphoptError
from graphopt.backends import packed
from graphopt.backends.packed_codec import pack_bits, unpack_bits
from graphopt.backends.packed_huffman import CHUNK, huffman_decode_many, huffman_encode
from graphopt.backends.packed_tensors import Reader, BlobWriter, encode_tensor, place
from graphopt.passes import FoldBatchNorm, PruneMagnitude, QuantizeWeights, ShareWeights

from conftest import digits_pipeline



def _same_state(a: graphopt.Graph, b: graphopt.Graph) -> None:
    sa, sb = a.gm.state_dict(), b.gm.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].view(-1).view(torch.uint8), sb[key].view(-1).view(torch.uint8)), key


# -- codecs ---------------------------------------------------------------------------------
def test_huffman_streams_round_trip_together_and_compress_skewed_data():
    rng = np.random.default_rng(0)
    streams = [rng.geometric(0.4, size=n) - 1 for n in (1, 7, CHUNK, CHUNK + 1, 5 * CHUNK + 3)]
    streams.append(rng.integers(0, 1 << 16, size=3000))
    encoded = [huffman_encode(s) for s in streams]
    for original, decoded in zip(streams, huffman_decode_many(encoded)):
        np.testing.assert_array_equal(decoded, original)
    skewed = encoded[4]
    _, counts = np.unique(streams[4], return_counts=True)
    entropy = -(counts / counts.sum() * np.log2(counts / counts.sum())).sum()  # ~2.4 bits
    assert entropy <= len(skewed.data) * 8 / skewed.count < entropy + 0.1  # vs 5 bits fixed width
    assert skewed.offsets.size == 5


@pytest.mark.parametrize("width", [1, 3, 8, 13])
def test_bit_packing_round_trips(width):
    values = np.random.default_rng(width).integers(0, 1 << width, size=1001)
    data = pack_bits(values, width)
    assert len(data) == (1001 * width + 7) // 8
    np.testing.assert_array_equal(unpack_bits(data, width, 1001), values)


def _round_trip_tensor(tensor, hint=None):
    entry, chunks, tally = encode_tensor(tensor, hint)
    blob = BlobWriter()
    entry["enc"] = place(entry["enc"], chunks, blob)
    reader = Reader(memoryview(bytearray(b"".join(blob.parts))), packed.FORMAT_VERSION)
    build = reader.plan(entry)
    reader.run()
    return entry, build(), tally


def test_tensor_kinds_are_chosen_by_size_and_decode_bit_exactly():
    torch.manual_seed(0)
    dense = torch.randn(64, 32)
    entry, out, _ = _round_trip_tensor(dense)
    assert entry["enc"]["kind"] == "raw" and torch.equal(out, dense)
    shared = torch.tensor([-0.5, 0.25, 1.0, -0.0])[torch.randint(0, 4, (64, 32))]
    entry, out, tally = _round_trip_tensor(shared)
    assert entry["enc"]["kind"] == "codebook" and entry["enc"]["codebook"]["dtype"] == "float16"
    assert torch.equal(out.view(torch.int32), shared.view(torch.int32))  # -0.0 keeps its sign
    assert tally["values"] <= 64 * 32 * 2 / 8 + 8
    sparse = dense.masked_fill(torch.rand(64, 32) > 0.05, 0.0)
    entry, out, tally = _round_trip_tensor(sparse)
    assert entry["enc"]["kind"] == "sparse" and tally["index"] > 0
    assert torch.equal(out, sparse)
    empty = torch.zeros(40, 40)
    entry, out, _ = _round_trip_tensor(empty)
    assert torch.equal(out, empty) and entry["enc"]["kind"] == "sparse"
    ints = torch.arange(20, dtype=torch.int64)
    assert torch.equal(_round_trip_tensor(ints)[1], ints)


# -- whole models ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_round_trip_bit_exactly(name, tmp_path):
    model = getattr(torchvision.models, name)(weights=None)
    for module in model.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    graph = graphopt.trace(model, x)
    report = packed.save(graph, tmp_path / f"{name}.gpk")
    loaded = packed.load(tmp_path / f"{name}.gpk")
    assert torch.equal(loaded.run(x), graph.run(x))
    _same_state(graph, loaded)
    assert report["totals"]["file_bytes"] == os.path.getsize(tmp_path / f"{name}.gpk")
    assert 0.95 < report["totals"]["ratio_vs_fp32"] < 1.1  # fp32, nothing to compress


def test_digits_round_trip_keeps_graph_metadata(digits_graph, tmp_path):
    path = tmp_path / "digits.gpk"
    packed.save(digits_graph, path)
    loaded = packed.load(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded.run(x), digits_graph.run(x))
    assert [n.name for n in loaded.nodes] == [n.name for n in digits_graph.nodes]
    assert type(loaded.gm).__name__ == "DigitsCNN"
    assert loaded.example_inputs[0].shape == (3, 1, 8, 8)
    assert not loaded.gm.training


def test_compressed_digits_is_small_and_exact(digits_graph, tmp_path):
    result = graphopt.PassManager([FoldBatchNorm(), PruneMagnitude(sparsity=0.7), ShareWeights(bits=4)]).run(
        digits_graph)
    report = packed.export(result.graph, tmp_path / "small.gpk")
    assert report.max_abs_error == 0.0
    size = report.details["size"]
    assert size["ratio_vs_fp32"] > 8
    kinds = {layer["layer"]: layer["kinds"] for layer in report.details["layers"]}
    assert kinds["classifier.2"].startswith("sparse/codebook")
    loaded = packed.load(tmp_path / "small.gpk")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.run(x), result.graph.run(x))
    assert loaded.gm.meta[packed.ANNOTATIONS_KEY]["classifier.2.weight"]["shared"] == {"bits": 4}


def test_quantized_weights_are_stored_as_codes_and_scales(digits_graph, tmp_path):
    result = graphopt.PassManager([FoldBatchNorm(), QuantizeWeights(bits=4)]).run(digits_graph)
    report = packed.export(result.graph, tmp_path / "q.gpk")
    layer = next(l for l in report.details["layers"] if l["layer"] == "features.3")
    assert layer["kinds"].startswith("quant")
    assert layer["codebook_bytes"] == 2 * 32  # one fp16 scale per output channel
    assert report.max_abs_error == 0.0


def test_size_table_lists_layers_and_ratios(digits_graph, tmp_path):
    report = packed.save(digits_graph, tmp_path / "d.gpk")
    text = packed.size_table(report)
    assert "classifier.2" in text and "zipped" in text


def test_registered_backend_and_options(digits_graph, tmp_path):
    export = graphopt.get_backend("packed")
    report = export(digits_graph, str(tmp_path / "r.gpk"))
    assert report.backend == "packed" and report.max_rel_error == 0.0
    with pytest.raises(ConfigError, match="backend 'packed': option 'tolerance' must be a float >= 0, got int -1"):
        export(digits_graph, str(tmp_path / "x.gpk"), tolerance=-1)


# -- refusal and damage ---------------------------------------------------------------------
def _rewrite_manifest(path, edit):
    """Edit a file's manifest and re-seal it with a valid checksum (a crafted file)."""
    raw = open(path, "rb").read()
    head = struct.Struct("<8sIIQQ32s")
    magic, version, flags, mlen, dlen, _ = head.unpack_from(raw)
    start = head.size + mlen + (-(head.size + mlen) % 64)
    manifest = json.loads(zlib.decompress(raw[head.size:head.size + mlen]))
    edit(manifest)
    text = zlib.compress(json.dumps(manifest).encode())
    body = text + b"\0" * (-(head.size + len(text)) % 64) + raw[start:]
    fields = (magic, version, flags, len(text), dlen)
    import hashlib
    digest = hashlib.sha256(struct.pack("<8sIIQQ", *fields) + body).digest()
    open(path, "wb").write(head.pack(*fields, digest) + body)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["graph"]["modules"][1].update(type="os.system"), "not in the allow-list"),
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "call_module").update(
        op="call_function", target="builtins.eval"), "function 'builtins.eval'"),
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "call_module").update(
        op="call_method", target="__reduce__"), "method '__reduce__'"),
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "call_module").update(
        target="features.__class__"), "dunder"),
    # Python in a keyword name would be pasted by torch.fx into the generated forward()
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "call_module").update(
        op="call_function", target="torch.relu", kwargs={"dict": {
            "x=__import__('pathlib').Path('PWNED').touch(), y": False}}), "keyword argument .* not a plain identifier"),
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "call_module").update(
        kwargs={"dict": {"dim": {"dict": {"a'): 0, **__import__('os').environ, ('": 1}}}}),
     "keyword argument .* not a plain identifier"),
])
def test_files_naming_anything_outside_the_allow_list_are_refused(digits_graph, tmp_path, edit, message,
                                                                  monkeypatch):
    path = tmp_path / "evil.gpk"
    packed.save(digits_graph, path)
    _rewrite_manifest(path, edit)
    monkeypatch.chdir(tmp_path)
    for load in (packed.load, packed.load_module):
        with pytest.raises(packed.DisallowedTarget, match=message):
            load(path)
    assert not (tmp_path / "PWNED").exists()


def test_saving_a_graph_outside_the_allow_list_writes_nothing(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return torch.special.expit(x)

    graph = graphopt.trace(nn.Sequential(nn.Linear(4, 4), Custom()), torch.randn(2, 4))
    path = tmp_path / "out.gpk"
    with pytest.raises(packed.UnsupportedGraph, match="expit.*allow-list"):
        packed.save(graph, path)
    assert not path.exists() and os.listdir(tmp_path) == []
    assert issubclass(packed.UnsupportedGraph, ExportError)


def test_failed_export_check_leaves_no_file(digits_graph, tmp_path, monkeypatch):
    path = tmp_path / "out.gpk"
    monkeypatch.setattr(packed, "load_module", lambda p: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        packed.export(digits_graph, path)
    assert os.listdir(tmp_path) == []


def test_truncated_corrupted_and_foreign_files(digits_graph, tmp_path):
    path = tmp_path / "d.gpk"
    packed.save(digits_graph, path)
    data = path.read_bytes()
    cases = {
        "short.gpk": (data[:40], packed.TruncatedFile, "shorter than the 64-byte header"),
        "cut.gpk": (data[:-100], packed.TruncatedFile, "truncated"),
        "flip.gpk": (data[:-50] + bytes([data[-50] ^ 1]) + data[-49:], packed.CorruptFile, "checksum"),
        "tail.gpk": (data + b"x", packed.CorruptFile, "unexpected bytes"),
        "other.gpk": (b"PK\x03\x04" + data[4:], packed.PackedFormatError, "not a graphopt packed file"),
        "v3.gpk": (data[:8] + struct.pack("<I", 3) + data[12:], packed.UnsupportedVersion, "version 3 .newer"),
        "empty.gpk": (b"", packed.PackedFormatError, "not a graphopt packed file"),
    }
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=message):
            packed.load(tmp_path / name)
    assert issubclass(packed.PackedFormatError, GraphoptError)
    with pytest.raises(packed.PackedFormatError, match="cannot read"):
        packed.load(tmp_path / "missing.gpk")


def test_well_sealed_but_inconsistent_manifest_is_a_clear_error(digits_graph, tmp_path):
    path = tmp_path / "d.gpk"
    packed.save(digits_graph, path)
    _rewrite_manifest(path, lambda m: m["tensors"].pop(0))
    with pytest.raises(packed.CorruptFile, match="lacks"):
        packed.load(path)


def test_pipeline_file_prunes_shares_and_exports_packed(tmp_path):
    from graphopt.app.pipeline import load_pipeline, run_pipeline
    path = digits_pipeline(tmp_path, """

[[passes]]
name = "fold_batchnorm"

[[passes]]
name = "prune_magnitude"
sparsity = 0.6

[[passes]]
name = "share_weights"
bits = 4

[[backends]]
name = "packed"
path = "digits.gpk"
""", batch=1, name="p.toml")
    outcome = run_pipeline(load_pipeline(str(path)), progress=False)
    export = outcome.exports[0]
    assert export.backend == "packed" and export.max_rel_error == 0.0
    assert export.details["size"]["ratio_vs_fp32"] > 5
    assert (tmp_path / "digits.gpk").exists()
