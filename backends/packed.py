"""The packed format: one compact, code-free file per model (Deep Compression style).

Layout::

    header   64 bytes: magic, format version, flags, manifest length, data length, sha256
    manifest zlib-compressed JSON: the fx graph as data, module tree, tensor encodings
    data     the tensors' bytes: raw arrays, bit-packed and zstandard-coded integer streams

The sha256 covers the header fields before it and everything after the header. Tensors
are encoded by kind (see ``packed_tensors``); the graph through allow-lists (see
``packed_graph``). ``save``/``load``/``load_module``/``open_module`` are the Python API; the
``packed`` backend saves, reloads and checks that the outputs are bit for bit the graph's.

Version 2 codes integer streams with zstandard; version 1 (canonical Huffman) files still
load. A file of any other version is refused by name (``UnsupportedVersion``), and a stream
whose codec is not its version's is ``CorruptFile``, so no file is read with the wrong coder.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from typing import Any

import torch

import graphopt
from graphopt.backend import ExportReport, register_backend
from graphopt.backends.packed_errors import (CorruptFile, DisallowedTarget, PackedFormatError, TruncatedFile,
                                             UnsupportedGraph, UnsupportedVersion)
from graphopt.backends.packed_graph import decode_graph, decode_modules, encode_modules, encode_nodes
from graphopt.backends.packed_loading import PendingModule, start_decoding
from graphopt.backends.packed_report import build_report, size_table
from graphopt.backends.packed_tensors import (CODECS, BlobWriter, Reader, dtype_name, encode_tensor, place,
                                              torch_dtype)
from graphopt.backends.parity import module_runner, parity_report
from graphopt.errors import GraphoptError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.memory import check_fits, check_run_fits, tensor_bytes
from graphopt.options import Tolerance
from graphopt.quant.weights import ANNOTATIONS_KEY

__all__ = ["save", "load", "load_module", "open_module", "PendingModule", "export",
           "size_table", "ANNOTATIONS_KEY", "PackedFormatError", "TruncatedFile",
           "CorruptFile", "UnsupportedVersion", "DisallowedTarget", "UnsupportedGraph", "FORMAT_VERSION"]

MAGIC = b"GOPACK\r\n"
FORMAT_VERSION = 2
READ_VERSIONS = tuple(sorted(CODECS))   # 1: canonical Huffman streams; 2: zstandard streams
_HEADER = struct.Struct("<8sIIQQ32s")   # magic, version, flags, manifest bytes, data bytes, sha256
_FLAG_ZLIB = 1
_ALIGN = 64
MAX_MANIFEST = 64 << 20   # decompressed manifest bytes read at most (some 200,000 nodes)


def _annotations(graph: Graph) -> dict[str, dict]:
    return graph.gm.meta.get(ANNOTATIONS_KEY, {})


def _json_annotations(annotations: dict[str, dict]) -> dict[str, dict]:
    """The JSON part of the annotations (tensors such as scales live in the encodings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
        return value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)

    return {name: plain(entry) for name, entry in annotations.items()}


def _plain_meta(meta: dict) -> dict[str, str]:
    """The graph's string annotations (the int8 target): all a file carries of ``Graph.meta``."""
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}


def _encode(graph: Graph, metadata: dict | None) -> tuple[bytes, dict[str, Any]]:
    """(file bytes, size report)."""
    gm = graph.gm
    modules, tensors = encode_modules(gm)
    nodes = encode_nodes(gm)
    inputs = []
    for index, value in enumerate(graph.example_inputs):
        if not isinstance(value, torch.Tensor):
            raise UnsupportedGraph(f"example input {index} is a {type(value).__name__}; only tensors can be stored")
        inputs.append({"shape": list(value.shape), "dtype": dtype_name(value.dtype)})
    annotations = _annotations(graph)
    blob = BlobWriter()
    entries, rows = [], []
    for name, tensor, is_param in tensors:
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
            raise UnsupportedGraph(f"tensor {name!r} has dtype {tensor.dtype}, which the packed format cannot store")
        entry, chunks, tally = encode_tensor(tensor, annotations.get(name))
        entry["enc"] = place(entry["enc"], chunks, blob)
        entries.append({"name": name, "param": is_param, **entry})
        rows.append({"name": name, "numel": tensor.numel(), "kind": _kind_label(entry["enc"]), **tally})
    manifest = {"format": "graphopt.packed", "version": FORMAT_VERSION, "graphopt": graphopt.__version__,
                "torch": torch.__version__, "metadata": metadata or {},
                "graph": {"class_name": type(gm).__name__, "captured_by": graph.captured_by,
                          "properties": sorted(graph.properties), "meta": _plain_meta(graph.meta),
                          "inputs": inputs, "modules": modules,
                          "nodes": nodes},
                "tensors": entries, "annotations": _json_annotations(annotations)}
    try:
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise UnsupportedGraph(f"the graph's description is not plain data: {exc}") from exc
    packed_manifest = zlib.compress(text, 9)
    pad = -(_HEADER.size + len(packed_manifest)) % _ALIGN  # the data section starts aligned
    body = packed_manifest + b"\0" * pad + b"".join(blob.parts)
    fields = (MAGIC, FORMAT_VERSION, _FLAG_ZLIB, len(packed_manifest), blob.size)
    digest = hashlib.sha256(struct.pack("<8sIIQQ", *fields) + body).digest()
    data = _HEADER.pack(*fields, digest) + body
    report = build_report(rows, len(data), len(packed_manifest), gm.state_dict())
    return data, report


def _kind_label(enc: dict) -> str:
    if enc["kind"] == "sparse":
        return "sparse/" + _kind_label(enc["values"])
    if enc["kind"] == "raw":
        return f"raw-{enc['array']['dtype'].replace('float', 'fp')}"
    return enc["kind"]


def save(graph: Graph, path: str | os.PathLike, *, metadata: dict | None = None) -> dict[str, Any]:
    """Write ``graph`` to ``path`` atomically; returns the size report (see ``size_table``).

    Raises UnsupportedGraph (nothing written) if the graph uses a module, function or
    method outside the allow-list."""
    data, report = _encode(graph, metadata)
    with atomic_path(path, ".gpk") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return report


def _read_checked(path: str) -> tuple[dict, memoryview, int]:
    """(manifest, data section, format version) after checking magic, version, lengths and checksum."""
    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read())
    except OSError as exc:
        raise PackedFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:len(MAGIC)] != MAGIC[:len(raw)] or not raw:
        raise PackedFormatError(f"{path} is not a graphopt packed file (bad magic bytes)")
    if len(raw) < _HEADER.size:
        raise TruncatedFile(f"{path} is truncated: {len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, flags, manifest_len, data_len, digest = _HEADER.unpack_from(raw)
    if version not in READ_VERSIONS:
        newer = " (newer than this graphopt: upgrade graphopt to read it)" if version > FORMAT_VERSION else ""
        raise UnsupportedVersion(f"{path} was written in packed format version {version}{newer}; this graphopt "
                                 f"({graphopt.__version__}) reads versions "
                                 f"{', '.join(map(str, READ_VERSIONS))} and writes {FORMAT_VERSION}")
    data_start = _HEADER.size + manifest_len + (-(_HEADER.size + manifest_len) % _ALIGN)
    expected = data_start + data_len
    if len(raw) < expected:
        raise TruncatedFile(f"{path} is truncated: {len(raw)} bytes, the header says {expected}")
    if len(raw) > expected:
        raise CorruptFile(f"{path} has {len(raw) - expected} unexpected bytes after its end")
    view = memoryview(raw)
    checksum = hashlib.sha256(view[:_HEADER.size - 32])
    checksum.update(view[_HEADER.size:])
    if checksum.digest() != digest:
        raise CorruptFile(f"{path} is corrupted: its sha256 checksum does not match its contents")
    try:
        text = bytes(view[_HEADER.size:_HEADER.size + manifest_len])
        manifest = json.loads(_inflate(text) if flags & _FLAG_ZLIB else text)
    except (zlib.error, ValueError, RecursionError) as exc:   # RecursionError: arrays nested 10^5 deep
        raise CorruptFile(f"{path}: the manifest cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "graphopt.packed" \
            or manifest.get("version") != version:
        raise CorruptFile(f"{path}: the manifest is not a graphopt packed manifest of version {version}, "
                          f"as its header says")
    return manifest, view[data_start:], version


def _inflate(text: bytes) -> bytes:
    """The manifest, decompressed up to MAX_MANIFEST bytes: a few kilobytes of zlib can claim
    gigabytes (a zip bomb), so the output is bounded, not the input."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(text, MAX_MANIFEST)
    if inflater.unconsumed_tail:
        raise ValueError(f"it decompresses to more than {MAX_MANIFEST >> 20} MiB")
    if not inflater.eof:
        raise ValueError("its zlib stream ends early")
    return out


def load(path: str | os.PathLike) -> Graph:
    """Rebuild the Graph saved at ``path``; its outputs equal the saved graph's bit for bit.

    Example inputs are not stored: the loaded graph gets seeded random ones of the saved
    shapes and dtypes (shape propagation runs the model once on them). Raises a
    PackedFormatError subclass naming what is wrong."""
    pending, manifest = _load(os.fspath(path))
    gm = pending.wait()
    spec = manifest["graph"]
    try:
        inputs = _example_inputs(spec["inputs"])
    except GraphoptError as exc:
        raise CorruptFile(f"{path}: {exc}") from None
    except Exception as exc:
        raise CorruptFile(f"{path}: malformed input description: {exc}") from exc
    check_run_fits(gm, inputs, f"{path}: the graph on its declared inputs", CorruptFile)
    try:   # shape propagation runs the graph once: a file whose weights do not fit its graph fails here
        graph = Graph(gm, inputs, captured_by=str(spec.get("captured_by", "torch.fx")),
                      properties=[str(p) for p in spec.get("properties", [])])
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CorruptFile(f"{path}: the graph does not run on its declared inputs: {type(exc).__name__}: "
                          f"{text}") from exc
    meta = spec.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptFile(f"{path}: the graph's annotations are not a map of strings")
    graph.meta.update(meta)
    return graph


def load_module(path: str | os.PathLike) -> torch.fx.GraphModule:
    """Just the GraphModule saved at ``path``, every tensor decoded (no Graph analyses, nothing run)."""
    return open_module(path).wait()


def open_module(path: str | os.PathLike) -> PendingModule:
    """The GraphModule saved at ``path``, callable at once while its tensors decode on a thread
    pool (``torch.get_num_threads()`` threads); ``.wait()`` gives it with every tensor in place."""
    return _load(os.fspath(path))[0]


def _load(path: str) -> tuple[PendingModule, dict]:
    manifest, blob, version = _read_checked(path)
    futures: dict = {}
    try:
        reader = Reader(blob, version)
        builders, placeholders = {}, {}
        for entry in manifest["tensors"]:
            name, is_param = str(entry["name"]), bool(entry["param"])
            if name in builders:
                raise ValueError(f"tensor {name!r} is stored twice")
            builders[name] = _named(name, reader.plan, entry)
            placeholders[name] = (torch.empty([int(d) for d in entry["shape"]], dtype=torch_dtype(entry["dtype"]),
                                              device="meta"), is_param)
        reader.run()  # version 1: the Huffman streams, all at once, before any tensor is built
        futures = start_decoding(builders, torch.get_num_threads())  # decodes while the module is built
        spec = manifest["graph"]
        root = decode_modules(spec["modules"], placeholders)
        fx_graph = decode_graph(spec["nodes"])
        gm = torch.fx.GraphModule(root, fx_graph, _class_name(spec["class_name"]))
        gm.training = root.training
        gm.meta[ANNOTATIONS_KEY] = dict(manifest.get("annotations", {}))
        return PendingModule(gm, futures, {name: p for name, (_, p) in placeholders.items()}, path), manifest
    except Exception as exc:
        for future in futures.values():
            future.cancel()
        if isinstance(exc, PackedFormatError):
            raise
        # a checksummed file that still does not describe a graph
        raise CorruptFile(f"{path}: malformed contents: {type(exc).__name__}: {exc}") from exc


def _named(name: Any, step: Any, *args: Any) -> Any:
    """``step(*args)``, its failure naming the tensor it was decoding."""
    try:
        return step(*args)
    except (ValueError, KeyError, TypeError, IndexError, MemoryError, OverflowError) as exc:
        what = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
        raise ValueError(f"tensor {name!r}: {what}{exc}") from exc


def _class_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise DisallowedTarget(f"class name {name!r} is not a plain identifier")
    return name


def _example_inputs(specs: list[dict]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    inputs, total = [], 0
    for index, spec in enumerate(specs):
        shape, dtype = [int(d) for d in spec["shape"]], torch_dtype(spec["dtype"])
        if any(d < 0 for d in shape):
            raise ValueError(f"example input {index} has shape {shape}")
        total += tensor_bytes(shape, dtype)
        check_fits(total, f"example input {index} (shape {shape}, {spec['dtype']})", CorruptFile)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype))
    return tuple(inputs)


@register_backend("packed")
def export(graph: Graph, path: str, *, tolerance: Tolerance = 0.0, table: bool = False) -> ExportReport:
    """Write ``graph`` in the packed format, reload it and check its outputs (``tolerance``
    relative; 0 means bit for bit). ``table`` prints the per-layer size table.

    Options:
        tolerance: largest relative difference from the graph's outputs accepted after reloading (0: bit for bit)
        table: print the per-layer size table
    """
    started = time.perf_counter()
    path = os.fspath(path)
    data, report = _encode(graph, None)
    with atomic_path(path, ".gpk") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        reloaded = load_module(tmp)
        with torch.no_grad():   # the module alone: a Graph would re-run shape analysis first
            outputs = reloaded(*graph.example_inputs)
        details = {"size": report["totals"], "layers": report["layers"]}
        result = parity_report("packed", graph, path, tmp, outputs, tolerance, started, details)
    if table:
        print(size_table(report))
    result.runner = module_runner(reloaded)
    return result

