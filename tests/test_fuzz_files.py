"""Fuzzing the files graphopt reads: packed models (.gpk) and 1-bit weights (.gobin).

Damaged files (bytes flipped, cut, inserted) and crafted ones (edited, then sealed again
with a valid sha256 or CRC: hostile names, unknown versions and encodings, wrong shapes and
dtypes, huge declared sizes) must raise the format's own error: PackedFormatError for .gpk,
ConfigError for .gobin. Never a raw Python error, never code the file names, never a hang
or an allocation the file's size does not justify.
"""
from __future__ import annotations

import copy
import hashlib
import json
import resource
import struct
import time
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import graphopt
from graphopt.backends import binary as binary_backend
from graphopt.backends import packed
from graphopt.errors import ConfigError
from graphopt.pass_manager import PassManager
from graphopt.passes import Binarize, PruneMagnitude, QuantizeWeights, ShareWeights
from graphopt.tools.digits import trained_digits_cnn

from fuzz_support import bounded_memory, fuzz  # noqa: F401  (bounded_memory: autouse)

HEAD = struct.Struct("<8sIIQQ32s")
SENTINEL = "PWNED"
# Python that fx would paste into the generated forward() if a name reached it unchecked
HOSTILE = [f"x=__import__('pathlib').Path('{SENTINEL}').touch()", f"__import__('os').system('touch {SENTINEL}')",
           "a; import os", "__class__", "features.__dict__", "x\n    import os", "", "1x", "torch.nn.Module.__init__",
           "builtins.exec", "os.system", "__reduce__", "def", "a.b..c", "x" * 300]


@pytest.fixture(scope="module")
def graphs():
    """The digits CNN with every tensor encoding in play (codebook, sparse with Huffman gaps,
    quantized codes, raw), and a binarized one for .gobin."""
    graph = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    compressed = PassManager([PruneMagnitude(sparsity=0.7, layers=["features.3"]),
                              ShareWeights(bits=3, layers=["features.0"]),
                              QuantizeWeights(bits=4, layers=["classifier.2"])]).run(graph).graph
    binarized = PassManager([Binarize(keep_last=False, activations=True, progress=False)]).run(graph).graph
    return graph, compressed, binarized


@pytest.fixture(scope="module")
def files(graphs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_files")
    packed.save(graphs[1], folder / "good.gpk")
    binary_backend.save_binary(graphs[2], folder / "good.gobin")
    return folder, (folder / "good.gpk").read_bytes(), (folder / "good.gobin").read_bytes()


# -- sealing crafted files ---------------------------------------------------------------------
def _gpk_parts(data: bytes) -> tuple[dict, bytes]:
    _, _, _, mlen, _, _ = HEAD.unpack_from(data)
    start = HEAD.size + mlen + (-(HEAD.size + mlen) % 64)
    return json.loads(zlib.decompress(data[HEAD.size:HEAD.size + mlen])), data[start:]


def seal_gpk(manifest_bytes: bytes, blob: bytes, version: int = packed.FORMAT_VERSION, flags: int = 1, compress: bool = True) -> bytes:
    """A .gpk whose header and sha256 are right for whatever it holds: only its content is hostile."""
    text = zlib.compress(manifest_bytes) if compress else manifest_bytes
    body = text + b"\0" * (-(HEAD.size + len(text)) % 64) + blob
    fields = (packed.MAGIC, version, flags, len(text), len(blob))
    return HEAD.pack(*fields, hashlib.sha256(struct.pack("<8sIIQQ", *fields) + body).digest()) + body


def _gobin_parts(data: bytes) -> tuple[dict, bytes]:
    magic = binary_backend.MAGIC
    (length,) = struct.unpack("<I", data[len(magic):len(magic) + 4])
    start = len(magic) + 4
    return json.loads(data[start:start + length]), data[start + length:-4]


def seal_gobin(header_bytes: bytes, payload: bytes) -> bytes:
    body = binary_backend.MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body))


# -- what every read must satisfy ------------------------------------------------------------
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kilobytes


def read_gpk(path, monkeypatch) -> graphopt.Graph | None:
    """Load a .gpk: a graph, or None after a PackedFormatError; in bounded time and memory, and
    without running anything the file names."""
    monkeypatch.chdir(path.parent)
    peak, start = _peak_rss(), time.perf_counter()
    try:
        return packed.load(path)
    except packed.PackedFormatError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        return None
    finally:
        assert time.perf_counter() - start < 20, "reading one small file took over 20 s"
        assert _peak_rss() - peak < 1 << 30, "reading one small file allocated over 1 GiB"
        assert not (path.parent / SENTINEL).exists(), "the file ran code"


def read_gobin(path, graph) -> graphopt.Graph | None:
    peak, start = _peak_rss(), time.perf_counter()
    try:
        return binary_backend.load_binary(path, graph)
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        return None
    finally:
        assert time.perf_counter() - start < 20
        assert _peak_rss() - peak < 1 << 30


# -- byte-level damage -------------------------------------------------------------------------
@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` with bytes flipped, cut away, inserted or appended."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "append"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if action == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del out[at:]
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        else:
            out += draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@fuzz(120)
@given(data=st.data())
def test_damaged_packed_files_are_packed_format_errors(files, monkeypatch, data):
    folder, good, _ = files
    bad = data.draw(damaged(good))
    path = folder / "damaged.gpk"
    path.write_bytes(bad)
    assert read_gpk(path, monkeypatch) is None or bad == good


@fuzz(80)
@given(data=st.data())
def test_damaged_binary_weight_files_are_config_errors(files, graphs, data):
    folder, _, good = files
    bad = data.draw(damaged(good))
    path = folder / "damaged.gobin"
    path.write_bytes(bad)
    assert read_gobin(path, graphs[0]) is None or bad == good


# -- crafted (validly sealed) content --------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
              st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 40, 2 ** 63, 10 ** 12]), st.floats(allow_nan=False),
              st.sampled_from(HOSTILE + ["float32", "float64", "int64", "bool", "complex64", "qint8", "object",
                                         "raw", "bits", "huffman", "const", "sparse", "quant", "codebook",
                                         "torch.nn.Linear", "torch.relu", "call_function", "get_attr"]),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=2),
                            st.builds(lambda tag, v: {tag: v},
                                      st.sampled_from(["tuple", "list", "dict", "node", "dtype", "slice", "float",
                                                       "device", "seg", "memory_format", "ellipsis"]), inner)),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


@st.composite
def edited(draw, document: dict) -> dict:
    """``document`` with one to three values replaced, dropped, or tables given a new key."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in _paths(doc) if p]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.sampled_from(["seg", "n", "shape", "name", "op", "extra"]))] = draw(json_values)
    return doc


@fuzz(500)
@given(data=st.data())
def test_crafted_packed_manifests_are_packed_format_errors(files, monkeypatch, data):
    folder, good, _ = files
    manifest, blob = _gpk_parts(good)
    doc = data.draw(edited(manifest))
    path = folder / "crafted.gpk"
    path.write_bytes(seal_gpk(json.dumps(doc).encode(), blob))
    read_gpk(path, monkeypatch)


@fuzz(60)
@given(data=st.data())
def test_crafted_packed_data_sections_load_or_are_packed_format_errors(files, monkeypatch, data):
    folder, good, _ = files
    manifest, blob = _gpk_parts(good)
    bad = data.draw(damaged(blob))
    path = folder / "crafted_data.gpk"
    path.write_bytes(seal_gpk(json.dumps(manifest).encode(), bad))
    read_gpk(path, monkeypatch)


@fuzz(250)
@given(data=st.data())
def test_crafted_binary_weight_headers_are_config_errors(files, graphs, data):
    folder, _, good = files
    header, payload = _gobin_parts(good)
    doc = data.draw(edited(header))
    path = folder / "crafted.gobin"
    path.write_bytes(seal_gobin(json.dumps(doc).encode(), payload))
    read_gobin(path, graphs[0])


@fuzz(60)
@given(where=st.sampled_from(["node name", "placeholder", "call_module", "get_attr", "kwargs key", "class",
                              "module path", "root attribute", "call_method", "call_function"]),
       name=st.sampled_from(HOSTILE))
def test_names_a_crafted_file_gives_never_run_as_code(files, monkeypatch, where, name):
    folder, good, _ = files
    manifest, blob = _gpk_parts(good)
    spec = manifest["graph"]
    nodes = {n["op"]: n for n in spec["nodes"]}
    if where == "node name":
        nodes["call_module"]["name"] = name
    elif where == "placeholder":
        nodes["placeholder"]["target"] = name
    elif where in ("call_module", "get_attr"):
        nodes["call_module"].update(op=where, target=name)
    elif where in ("call_method", "call_function"):
        nodes["call_module"].update(op=where, target=name)
    elif where == "kwargs key":
        nodes["call_module"]["kwargs"] = {"dict": {name: 1}}
    elif where == "class":
        spec["class_name"] = name
    elif where == "module path":
        spec["modules"][2]["path"] = name
    else:
        manifest["tensors"].append({**manifest["tensors"][0], "name": name})
    path = folder / "named.gpk"
    path.write_bytes(seal_gpk(json.dumps(manifest).encode(), blob))
    read_gpk(path, monkeypatch)


# -- hostile sizes, versions and shapes, one by one -----------------------------------------------
def _edit(good: bytes, edit) -> bytes:
    manifest, blob = _gpk_parts(good)
    edit(manifest)
    return seal_gpk(json.dumps(manifest).encode(), blob)


def _tensor(manifest: dict, name: str) -> dict:
    return next(t for t in manifest["tensors"] if t["name"] == name)


HOSTILE_FILES = {
    "header version 7": (lambda good: seal_gpk(zlib.compress(json.dumps(_gpk_parts(good)[0]).encode()),
                                               _gpk_parts(good)[1], version=7, compress=False),
                         packed.UnsupportedVersion, "version 7"),
    "manifest version 1": (lambda good: _edit(good, lambda m: m.update(version=1)), packed.CorruptFile,
                           "not a graphopt packed manifest of version 2"),
    "huge input": (lambda good: _edit(good, lambda m: m["graph"]["inputs"][0].update(shape=[10 ** 6] * 3)),
                   packed.CorruptFile, "example input 0 .* would need"),
    "negative input": (lambda good: _edit(good, lambda m: m["graph"]["inputs"][0].update(shape=[-1, 1, 8, 8])),
                       packed.CorruptFile, "input"),
    "input dtype": (lambda good: _edit(good, lambda m: m["graph"]["inputs"][0].update(dtype="complex64")),
                    packed.CorruptFile, "unsupported dtype 'complex64'"),
    "huge const tensor": (lambda good: _edit(good, lambda m: _tensor(m, "classifier.2.weight").update(
        shape=[10 ** 6, 10 ** 6], enc={"kind": "quant", "group": 1, "zero": 0,
                                       "scales": _tensor(m, "classifier.2.weight")["enc"]["scales"],
                                       "codes": {"codec": "const", "n": 10 ** 12, "value": 3}})),
        packed.CorruptFile, "would need"),
    "huge sparse tensor": (lambda good: _edit(good, lambda m: _tensor(m, "features.3.weight").update(
        shape=[10 ** 5, 10 ** 5, 10])), packed.CorruptFile, "would need"),
    "huge huffman count": (lambda good: _edit(good, lambda m: _tensor(m, "classifier.2.weight")["enc"]["codes"].update(
        n=10 ** 13)), packed.CorruptFile, "classifier.2.weight"),
    "wrong weight shape": (lambda good: _edit(good, lambda m: m["graph"]["modules"][-1]["args"].update(
        in_features=7)), packed.CorruptFile, "classifier.2"),
    "wrong tensor dtype": (lambda good: _edit(good, lambda m: _tensor(m, "features.1.bias").update(
        dtype="int32", enc={"kind": "raw", "array": {**_tensor(m, "features.1.bias")["enc"]["array"],
                                                     "dtype": "int32"}})), packed.CorruptFile, "features"),
    "unknown encoding": (lambda good: _edit(good, lambda m: _tensor(m, "features.1.bias")["enc"].update(
        kind="zstd")), packed.CorruptFile, "zstd"),
    "unknown codec": (lambda good: _edit(good, lambda m: _tensor(m, "features.0.weight")["enc"]["codes"].update(
        codec="lzma")), packed.CorruptFile, "lzma"),
    "deep nesting": (lambda good: seal_gpk(b'{"format": "graphopt.packed", "version": 2, "graph": '
                                           + b"[" * 100000 + b"]" * 100000 + b"}", _gpk_parts(good)[1]),
                     packed.CorruptFile, "manifest"),
    "deep arguments": (lambda good: _edit(good, lambda m: m["graph"]["nodes"][1].update(args=_nested(200))),
                       packed.CorruptFile, "nested more than 32 containers deep"),
    "huge intermediate": (lambda good: _edit(good, _repeat_input), packed.CorruptFile,
                          "node 'big' would need 5120.00GB of memory"),
    "zip bomb": (lambda good: seal_gpk(_bomb(), _gpk_parts(good)[1], compress=False), packed.CorruptFile,
                 "decompresses to more than 64 MiB"),
}


def _repeat_input(manifest: dict) -> None:
    """The first layer reads ``x.repeat(1, 1, 10**5, 10**5)``: allow-listed ops, 5 TB of output."""
    nodes = manifest["graph"]["nodes"]
    nodes.insert(1, {"name": "big", "op": "call_method", "target": "repeat", "kwargs": {"dict": {}},
                     "args": {"tuple": [{"node": nodes[0]["name"]}, 1, 1, 10 ** 5, 10 ** 5]}})
    nodes[2]["args"] = {"tuple": [{"node": "big"}]}


def _nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth):
        value = {"tuple": [value]}
    return value


def _bomb() -> bytes:
    """A manifest of 1 MiB of zlib that inflates to 1 GiB (compressed in pieces: the test never holds it)."""
    squeeze = zlib.compressobj(9)
    parts = [squeeze.compress(b'{"format": "graphopt.packed", "version": 2, "pad": "')]
    parts += [squeeze.compress(b" " * (1 << 20)) for _ in range(1024)]
    return b"".join(parts) + squeeze.compress(b'"}') + squeeze.flush()



@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_packed_files_are_refused_by_name(files, monkeypatch, case):
    folder, good, _ = files
    make, error, message = HOSTILE_FILES[case]
    path = folder / "hostile.gpk"
    path.write_bytes(make(good))
    monkeypatch.chdir(folder)
    peak, start = _peak_rss(), time.perf_counter()
    # load_module builds the module alone: the example inputs are only read by load
    for load in (packed.load,) if "input" in case or "intermediate" in case else (packed.load, packed.load_module):
        with pytest.raises(error, match=message):
            load(path)
    assert time.perf_counter() - start < 20 and _peak_rss() - peak < 1 << 30


def _bits_entry(header: dict) -> dict:
    return next(t for t in header["tensors"] if t["encoding"] == "bits")


def _raw_entry(header: dict) -> dict:
    return next(t for t in header["tensors"] if t["encoding"] == "raw" and t["shape"])


HOSTILE_GOBIN = {
    # alphas and bytes still add up, but there is no scale per output channel
    "scales per row": (lambda h: _bits_entry(h).update(shape=[16, 32, 3, 3]), "has 32 scales for shape \\[16, 32"),
    # 2**32 x 2**32 elements: numpy's int64 product is 0, which a zero length would have matched
    "overflowing shape": (lambda h: _raw_entry(h).update(shape=[2 ** 32, 2 ** 32], length=0),
                          "holds 0 bytes, its shape and dtype need 73786976294838206464"),
    "bits as int8": (lambda h: _bits_entry(h).update(dtype="int8"), "is int8 \\[32, 16, 3, 3\\], the graph has float32"),
    "bytes reread as int32": (lambda h: _raw_entry(h).update(dtype="int32"), "is int32 .* the graph has float32"),
    "listed twice": (lambda h: h["tensors"].append(dict(h["tensors"][0])), "is listed twice"),
    "layer that cannot be binary": (lambda h: h["layers"].update({"features.2": {"activations": False}}),
                                    "layer 'features.2': cannot binarize ReLU"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GOBIN))
def test_hostile_binary_weight_files_are_refused_by_name(files, graphs, case):
    folder, _, good = files
    edit, message = HOSTILE_GOBIN[case]
    header, payload = _gobin_parts(good)
    edit(header)
    path = folder / "hostile.gobin"
    path.write_bytes(seal_gobin(json.dumps(header).encode(), payload))
    with pytest.raises(ConfigError, match=message):
        binary_backend.load_binary(path, graphs[0])


@pytest.mark.parametrize("name", ["missing.gpk", "folder.gpk"])
def test_unreadable_paths_are_the_formats_errors(tmp_path, graphs, name):
    (tmp_path / "folder.gpk").mkdir()
    with pytest.raises(packed.PackedFormatError, match=f"cannot read .*{name}"):
        packed.load(tmp_path / name)
    with pytest.raises(ConfigError, match=f"cannot read .*{name}"):
        binary_backend.load_binary(tmp_path / name, graphs[0])
