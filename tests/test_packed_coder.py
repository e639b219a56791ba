"""The packed format's entropy coder (zstandard in version 2, canonical Huffman in version 1),
its version handling, and loading while tensors decode."""
import hashlib
import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.backends import packed
from graphopt.backends import packed_tensors
from graphopt.backends.packed_codec import zstd_decode, zstd_encode
from graphopt.backends.packed_huffman import MAX_CODE_LEN, huffman_decode_many, huffman_encode, stored_size
from graphopt.backends.packed_tensors import BlobWriter, Reader, _Draft, encode_tensor, place
from graphopt.passes import FoldBatchNorm, PruneMagnitude, QuantizeWeights, ShareWeights
from benchmarks.packed_v1 import write_version_1

DATA = os.path.join(os.path.dirname(__file__), "data")
V1_FILE = os.path.join(DATA, "digits_pruned_shared_v1.gpk")
_HEAD = struct.Struct("<8sIIQQ32s")


def _fibonacci_counts(n):
    counts = [1, 1]
    while len(counts) < n:
        counts.append(counts[-1] + counts[-2])
    return np.array(counts)


def _edge_streams():
    rng = np.random.default_rng(0)
    fib, flat = _fibonacci_counts(17), _fibonacci_counts(24)  # Huffman codes of 16 bits; of 23, cut to 16
    return {"one value": np.array([7]), "one symbol, many values": np.full(3000, 42),
            "two symbols": rng.integers(0, 2, 5000), "byte edge": np.array([0, 255, 255, 3]),
            "two-byte symbols": rng.integers(0, 1 << 16, 4000), "max symbol": np.array([65535, 0, 65535]),
            "longest codes": rng.permutation(np.repeat(np.arange(fib.size), fib)),
            "limited codes": rng.permutation(np.repeat(np.arange(flat.size), flat)),
            "skewed": rng.geometric(0.3, 20000) - 1}


# -- the coders ---------------------------------------------------------------------------------
def test_zstd_and_huffman_decode_edge_case_streams_to_the_same_values():
    streams = _edge_streams()
    assert huffman_encode(streams["longest codes"]).lengths.max() == MAX_CODE_LEN
    assert huffman_encode(streams["limited codes"]).lengths.max() <= MAX_CODE_LEN
    huffman = huffman_decode_many([huffman_encode(s) for s in streams.values()])
    for (name, values), old in zip(streams.items(), huffman):
        frame, width = zstd_encode(values)
        assert width == (2 if values.max() > 255 else 1), name
        new = zstd_decode(frame, values.size, width)
        assert new.dtype == (np.uint16 if width == 2 else np.uint8)
        np.testing.assert_array_equal(new, values, err_msg=name)
        np.testing.assert_array_equal(old, values, err_msg=name)
    assert huffman_decode_many([huffman_encode(np.zeros(0, dtype=np.int64))])[0].size == 0


def test_zstd_stream_is_as_small_as_the_huffman_stream_it_replaces():
    rng = np.random.default_rng(1)
    codes = np.clip(np.rint(rng.laplace(128, 12, 200_000)), 0, 255).astype(np.int64)  # int8 codes of trained weights
    _, counts = np.unique(codes, return_counts=True)
    entropy_bytes = -(counts * np.log2(counts / counts.sum())).sum() / 8  # ~6 bits a code
    frame, _ = zstd_encode(codes)
    assert len(frame) < 1.02 * entropy_bytes
    assert len(frame) < 1.01 * stored_size(huffman_encode(codes))  # table and chunk offsets included


def test_zstd_stream_of_the_wrong_length_or_damaged_is_refused():
    frame, width = zstd_encode(np.arange(1000) % 7)
    with pytest.raises(ValueError, match="declares 1000 bytes"):
        zstd_decode(frame, 999, width)
    with pytest.raises(ValueError, match="1 or 2 bytes"):
        zstd_decode(frame, 1000, 3)
    damaged = bytearray(frame)
    damaged[len(damaged) // 2] ^= 0xFF
    damaged[-1] ^= 0xFF
    with pytest.raises(ValueError, match="zstd"):
        zstd_decode(bytes(damaged), 1000, width)
    with pytest.raises(ValueError, match="zstd"):
        zstd_decode(frame + b"\0", 1000, width)
    with pytest.raises(ValueError, match="zstd stream symbols"):
        zstd_encode(np.array([1 << 16]))


def _decode_ints(desc, chunks):
    blob = BlobWriter()
    desc = place(desc, chunks, blob)
    reader = Reader(memoryview(bytearray(b"".join(blob.parts))), packed.FORMAT_VERSION)
    decode = reader.ints(desc, limit=10 ** 7)
    reader.run()
    return decode()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 16) - 1), max_size=3000), st.sampled_from([1, 2, 16, 256, 1 << 16]))
def test_integer_streams_round_trip_whatever_the_codec_chosen(values, modulus):
    values = np.array(values, dtype=np.int64) % modulus
    draft = _Draft()
    desc = draft.ints(values, "values")
    assert desc["codec"] in packed_tensors.CODECS[packed.FORMAT_VERSION]
    np.testing.assert_array_equal(_decode_ints(desc, draft.chunks), values)


def _round_trip(tensor, hint=None):
    entry, chunks, _ = encode_tensor(tensor, hint)
    blob = BlobWriter()
    entry["enc"] = place(entry["enc"], chunks, blob)
    reader = Reader(memoryview(bytearray(b"".join(blob.parts))), packed.FORMAT_VERSION)
    build = reader.plan(entry)
    reader.run()
    return entry["enc"], build()


def _kinds(enc):
    return enc["kind"] + ("/" + _kinds(enc["values"]) if enc["kind"] == "sparse" else "")


def test_tensors_reload_bit_exactly_in_every_encoding():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 48, generator=g)
    very_sparse = torch.zeros(300, 100)
    very_sparse.view(-1)[torch.tensor([0, 5, 20_000, 29_999])] = torch.tensor([1.0, -0.0, 2.5, -3.0])  # gaps > 4095
    scales = torch.rand(64, generator=g) * 0.01 + 1e-3
    codes = torch.randint(-127, 128, (64, 48), generator=g).float()
    quant = codes * scales[:, None]
    sparse_quant = quant.masked_fill(torch.rand(64, 48, generator=g) < 0.6, 0.0)
    skewed = np.random.default_rng(0).geometric(0.005, (64, 64))
    big_book = torch.from_numpy(skewed).float() / 7  # > 256 shared values, skewed: 2-byte zstd codes
    cases = {"empty": (torch.zeros(0, 5), None, "raw"), "all zero": (torch.zeros(40, 40), None, "sparse/raw"),
             "dense": (dense, None, "raw"), "long gaps": (very_sparse, None, "sparse/raw"),
             "quant": (quant, {"quant": {"scales": scales}}, "quant"),
             "sparse quant": (sparse_quant, {"quant": {"scales": scales}}, "sparse/quant"),
             "big codebook": (big_book, None, "codebook")}
    for name, (tensor, hint, kind) in cases.items():
        enc, out = _round_trip(tensor, hint)
        assert _kinds(enc) == kind, name
        assert out.shape == tensor.shape and torch.equal(out.view(torch.int32), tensor.view(torch.int32)), name
    enc, _ = _round_trip(big_book)
    assert enc["codes"]["codec"] == "zstd" and enc["codes"]["width"] == 2


# -- versions -------------------------------------------------------------------------------------
def _reseal(path, version=None, manifest_edit=None, data_edit=None):
    """Rewrite a file's header version, manifest or data section and seal it with a valid checksum."""
    raw = open(path, "rb").read()
    magic, old_version, flags, mlen, dlen, _ = _HEAD.unpack_from(raw)
    start = _HEAD.size + mlen + (-(_HEAD.size + mlen) % 64)
    manifest = json.loads(zlib.decompress(raw[_HEAD.size:_HEAD.size + mlen]))
    data = bytearray(raw[start:])
    if manifest_edit:
        manifest_edit(manifest)
    if data_edit:
        data_edit(manifest, data)
    text = zlib.compress(json.dumps(manifest).encode())
    body = text + b"\0" * (-(_HEAD.size + len(text)) % 64) + bytes(data)
    fields = (magic, old_version if version is None else version, flags, len(text), len(data))
    digest = hashlib.sha256(struct.pack("<8sIIQQ", *fields) + body).digest()
    open(path, "wb").write(_HEAD.pack(*fields, digest) + body)


def _streams(manifest):
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "codec" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest["tensors"])
    return found


def _digest(tensor):
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def test_version_1_file_written_by_the_huffman_coder_loads_bit_exactly(tmp_path):
    expected = json.load(open(os.path.join(DATA, "digits_pruned_shared_v1.json")))
    manifest, _, version = packed._read_checked(V1_FILE)
    assert version == 1 and {s["codec"] for s in _streams(manifest)} >= {"huffman"}
    old = packed.load(V1_FILE)
    state = old.gm.state_dict()
    assert list(state) == list(expected["tensors"])
    for name, tensor in state.items():
        assert list(tensor.shape) == expected["tensors"][name]["shape"], name
        assert _digest(tensor) == expected["tensors"][name]["sha256"], name
    packed.save(old, tmp_path / "again.gpk")  # written again: version 2, zstandard streams
    manifest, _, version = packed._read_checked(str(tmp_path / "again.gpk"))
    assert version == 2 and "huffman" not in {s["codec"] for s in _streams(manifest)}
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(packed.load_module(tmp_path / "again.gpk")(x), old.gm(x))


@pytest.fixture
def v2_file(digits_graph, tmp_path):
    graph = graphopt.PassManager([FoldBatchNorm(), PruneMagnitude(sparsity=0.7), QuantizeWeights(bits=8)]).run(
        digits_graph).graph
    path = tmp_path / "d.gpk"
    packed.save(graph, path)
    assert "zstd" in {s["codec"] for s in _streams(packed._read_checked(str(path))[0])}
    return graph, path


def test_version_1_copy_of_a_file_holds_huffman_streams_and_the_same_tensors(v2_file, tmp_path):
    graph, path = v2_file
    write_version_1(str(path), str(tmp_path / "v1.gpk"))
    manifest, _, version = packed._read_checked(str(tmp_path / "v1.gpk"))
    assert version == 1 and "huffman" in {s["codec"] for s in _streams(manifest)}
    state = packed.load_module(tmp_path / "v1.gpk").state_dict()
    for name, tensor in graph.gm.state_dict().items():
        assert _digest(state[name]) == _digest(tensor), name


def test_files_of_other_versions_or_another_versions_coder_are_refused_by_name(v2_file, tmp_path):
    _, path = v2_file
    for version, message in [(3, "version 3 \\(newer than this graphopt"), (0, "version 0;"),
                             (1 << 31, f"version {1 << 31} \\(newer")]:
        other = tmp_path / f"v{version}.gpk"
        other.write_bytes(path.read_bytes())
        _reseal(other, version=version)
        with pytest.raises(packed.UnsupportedVersion, match=message):
            packed.load(other)
    mixed = tmp_path / "mixed.gpk"  # a version-2 header over a version-1 manifest
    mixed.write_bytes(path.read_bytes())
    _reseal(mixed, manifest_edit=lambda m: m.update(version=1))
    with pytest.raises(packed.CorruptFile, match="not a graphopt packed manifest of version 2"):
        packed.load(mixed)
    relabelled = tmp_path / "relabelled.gpk"  # Huffman streams under a version-2 label
    relabelled.write_bytes(open(V1_FILE, "rb").read())
    _reseal(relabelled, version=2, manifest_edit=lambda m: m.update(version=2))
    with pytest.raises(packed.CorruptFile, match="codec 'huffman' is not one of format version 2's"):
        packed.load_module(relabelled)
    downgraded = tmp_path / "downgraded.gpk"  # zstandard streams under a version-1 label
    downgraded.write_bytes(path.read_bytes())
    _reseal(downgraded, version=1, manifest_edit=lambda m: m.update(version=1))
    with pytest.raises(packed.CorruptFile, match="codec 'zstd' is not one of format version 1's"):
        packed.load_module(downgraded)


def test_damaged_stream_under_a_valid_checksum_is_a_corrupt_file(v2_file, tmp_path):
    def damage(manifest, data):
        stream = max((s for s in _streams(manifest) if s["codec"] == "zstd"), key=lambda s: s["seg"][1])
        offset, length = stream["seg"]
        data[offset + length // 2:offset + length] = bytes(length - length // 2)

    def miscount(manifest):
        next(s for s in _streams(manifest) if s["codec"] == "zstd")["n"] -= 1

    for name, edit in {"damaged": dict(data_edit=damage), "miscounted": dict(manifest_edit=miscount)}.items():
        path = tmp_path / f"{name}.gpk"
        path.write_bytes(v2_file[1].read_bytes())
        _reseal(path, **edit)
        with pytest.raises(packed.CorruptFile, match="zstd"):
            packed.load_module(path)
        pending = packed.open_module(path)  # the module exists; running it reports the damage
        with pytest.raises(packed.CorruptFile, match="zstd"):
            pending.module(torch.rand(1, 1, 8, 8))


# -- loading while decoding -----------------------------------------------------------------------
def test_open_module_is_usable_before_its_tensors_are_decoded(v2_file, monkeypatch):
    graph, path = v2_file
    release, started = threading.Event(), []
    plan = Reader.plan

    def gated_plan(self, entry):
        build = plan(self, entry)

        def gated():
            started.append(entry["name"])
            assert release.wait(10), "the module was not returned before decoding ended"
            return build()

        return gated

    monkeypatch.setattr(Reader, "plan", gated_plan)
    pending = packed.open_module(path)  # returns while every decoder is held
    assert not pending.done()
    assert pending.module.get_submodule("features.0").weight.device.type == "meta"
    release.set()
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(pending.module(x), graph.gm(x))  # each layer waits for its own tensors
    module = pending.wait()
    assert pending.done() and started[0] == "features.0.weight"
    for name, tensor in graph.gm.state_dict().items():
        assert torch.equal(module.state_dict()[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_shared_weights_file_loads_the_same_eagerly_and_lazily(digits_graph, tmp_path):
    graph = graphopt.PassManager([FoldBatchNorm(), PruneMagnitude(sparsity=0.5), ShareWeights(bits=4)]).run(
        digits_graph).graph
    packed.save(graph, tmp_path / "s.gpk")
    x = torch.rand(3, 1, 8, 8)
    lazy = packed.open_module(tmp_path / "s.gpk")
    assert torch.equal(lazy.module(x), graph.gm(x))
    assert torch.equal(packed.load_module(tmp_path / "s.gpk")(x), graph.gm(x))
