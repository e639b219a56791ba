"""1-bit weight storage for binarized graphs: packed sign bits plus an fp16 alpha per channel.

File layout (little endian)::

    b"GOBIN\\x00\\x00\\x01"  uint32 header length  JSON header  payload  uint32 CRC-32 of all before

The header lists the binary layers (module name, type, whether inputs are binary) and every
tensor of the state dict: ``bits`` tensors (frozen binary weights) as ``ceil(n/8)`` packed
bytes then one fp16 alpha per output channel; every other tensor ``raw`` in its own dtype.
The file holds weights, not structure: :func:`load_binary` fills a graph of the same model
(the traced original, or one already binarized) and gives back weights bit-identical to
those saved.
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
import zlib

import numpy as np
import torch

from graphopt.backend import ExportReport, register_backend
from graphopt.quant.binary import BINARY_LAYERS, to_binary, weight_from_bits
from graphopt.backends._bitpack import pack_bits, packed_size, unpack_bits
from graphopt.errors import ConfigError, ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.backends.parity import parity_report
from graphopt.options import Tolerance

MAGIC = b"GOBIN\x00\x00\x01"


def _binary_layers(graph: Graph) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in graph.modules().items() if isinstance(m, BINARY_LAYERS)}


def _bits_and_alpha(name: str, layer) -> tuple[np.ndarray, np.ndarray]:
    """Sign bits and fp16 alpha of a frozen layer; ExportError if its weight is not exactly ±alpha."""
    if not layer.frozen:
        raise ExportError(f"binary layer {name!r} still holds latent weights: freeze it first "
                          "(Binarize(freeze=True) or the freeze_binary pass)")
    w = layer.weight.detach().cpu().float()
    bits = ~torch.signbit(w)
    alpha16 = w.abs().amax(dim=tuple(range(1, w.dim()))).to(torch.float16)
    if not torch.equal(weight_from_bits(bits, alpha16).view(torch.int32), w.view(torch.int32)):
        raise ExportError(f"binary layer {name!r}: weights are not ±alpha with an fp16 alpha per channel "
                          "(did a later pass change them? run freeze_binary after it)")
    return bits.numpy(), alpha16.numpy()


def encode(graph: Graph) -> tuple[bytes, dict]:
    """The file's bytes and size statistics."""
    layers = _binary_layers(graph)
    binary_weights = {f"{name}.weight": name for name in layers}
    entries, chunks, offset = [], [], 0
    stats = {"binary_bytes": 0, "binary_fp32_bytes": 0, "other_bytes": 0}
    for key, tensor in graph.gm.state_dict().items():
        entry = {"name": key, "shape": list(tensor.shape), "offset": offset}
        if key in binary_weights:
            bits, alpha = _bits_and_alpha(binary_weights[key], layers[binary_weights[key]])
            data = pack_bits(bits) + alpha.tobytes()
            entry.update(encoding="bits", dtype=str(tensor.dtype).removeprefix("torch."), alphas=int(alpha.size))
            stats["binary_bytes"] += len(data)
            stats["binary_fp32_bytes"] += tensor.numel() * 4
        else:
            array = tensor.detach().cpu().contiguous()
            try:
                data = array.numpy().tobytes()
            except TypeError as exc:
                raise ExportError(f"tensor {key!r}: dtype {tensor.dtype} cannot be stored: {exc}") from None
            entry.update(encoding="raw", dtype=str(array.numpy().dtype))
            stats["other_bytes"] += len(data)
        entry["length"] = len(data)
        entries.append(entry)
        chunks.append(data)
        offset += len(data)
    header = {"format": 1, "tensors": entries,
              "layers": {name: {"type": type(m).__name__, "activations": m.binary_activations}
                         for name, m in layers.items()}}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)
    return body + struct.pack("<I", zlib.crc32(body)), stats


def _decode_header(path: str) -> tuple[dict, memoryview]:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(blob) < len(MAGIC) + 8 or blob[:len(MAGIC)] != MAGIC:
        raise ConfigError(f"{path}: not a graphopt binary-weights file")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) != crc:
        raise ConfigError(f"{path}: checksum mismatch (file damaged or truncated)")
    (length,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start:start + length])
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: malformed header ({type(exc).__name__}: {exc})") from None
    payload = memoryview(blob)[start + length:-4]
    _check_header(header, len(payload), path)
    return header, payload


_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def _check_header(header, payload: int, path: str) -> None:
    """Refuse anything this reader does not know, before a byte is decoded: a CRC only catches
    accidents, so a crafted file must fail here with a named reason, not deep in numpy."""
    def bad(why: str):
        raise ConfigError(f"{path}: malformed binary-weights file: {why}")

    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list) \
            or not isinstance(header.get("layers"), dict):
        bad("the header is not a table of tensors and layers")
    if header.get("format") != 1:
        raise ConfigError(f"{path}: binary-weights format {header.get('format')!r} is not supported "
                          f"(this graphopt reads format 1)")
    for name, info in header["layers"].items():
        if not isinstance(info, dict) or not isinstance(info.get("activations"), bool):
            bad(f"layer {name!r} has no activations flag")
    names = set()
    for entry in header["tensors"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            bad("a tensor entry has no name")
        name = entry["name"]
        if name in names:
            bad(f"tensor {name!r} is listed twice")
        names.add(name)
        shape, offset, length = entry.get("shape"), entry.get("offset"), entry.get("length")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            bad(f"tensor {name!r} has shape {shape!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)) \
                or offset + length > payload:
            bad(f"tensor {name!r} lies outside the file (offset {offset!r}, length {length!r})")
        if entry.get("dtype") not in _DTYPES:
            bad(f"tensor {name!r} has dtype {entry.get('dtype')!r}; known: {', '.join(_DTYPES)}")
        count = math.prod(shape)   # exact: numpy's product wraps around at 2**63 and could match a short length
        if entry.get("encoding") == "raw":
            expected = count * np.dtype(entry["dtype"]).itemsize
        elif entry.get("encoding") == "bits":
            alphas = entry.get("alphas")
            if not shape or alphas != shape[0] or isinstance(alphas, bool):
                bad(f"tensor {name!r} has {alphas!r} scales for shape {shape} (one per output channel)")
            expected = packed_size(count) + 2 * alphas
        else:
            bad(f"tensor {name!r} has encoding {entry.get('encoding')!r}; known: raw, bits")
        if length != expected:
            bad(f"tensor {name!r} holds {length} bytes, its shape and dtype need {expected}")


def _decode_tensor(entry: dict, payload: memoryview) -> torch.Tensor:
    data = payload[entry["offset"]:entry["offset"] + entry["length"]]
    shape = tuple(entry["shape"])
    if entry["encoding"] == "bits":
        count = int(np.prod(shape))
        nbits = packed_size(count)
        bits = torch.from_numpy(unpack_bits(np.frombuffer(data[:nbits], np.uint8), count).reshape(shape))
        alpha16 = torch.from_numpy(np.frombuffer(data[nbits:], np.float16).copy())
        return weight_from_bits(bits, alpha16).to(getattr(torch, entry["dtype"]))
    return torch.from_numpy(np.frombuffer(data, np.dtype(entry["dtype"])).reshape(shape).copy())


def load_binary(path: str | os.PathLike, graph: Graph) -> Graph:
    """A copy of ``graph`` (same model, binarized or not) holding the weights saved at ``path``."""
    header, payload = _decode_header(os.fspath(path))
    loaded = graph.clone()
    modules = loaded.modules()
    for name, info in header["layers"].items():
        if name not in modules:
            raise ConfigError(f"{path}: binary layer {name!r} is not in the graph")
        layer = modules[name]
        if not isinstance(layer, BINARY_LAYERS):
            try:
                layer = to_binary(layer, info["activations"])
            except TypeError as exc:
                raise ConfigError(f"{path}: layer {name!r}: {exc}") from None
            loaded.replace_module(name, layer)
        layer.frozen = True
        layer.weight.requires_grad_(False)
    state = {e["name"]: _decode_tensor(e, payload) for e in header["tensors"]}
    expected = loaded.gm.state_dict()
    for name, tensor in state.items():   # load_state_dict would cast a wrong dtype silently
        if name in expected and (tensor.dtype, tensor.shape) != (expected[name].dtype, expected[name].shape):
            raise ConfigError(f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} "
                              f"{list(tensor.shape)}, the graph has {str(expected[name].dtype).removeprefix('torch.')} "
                              f"{list(expected[name].shape)}")
    try:
        loaded.gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit the graph: {' '.join(str(exc).split())[:300]}") from None
    loaded.commit()
    loaded.invalidate()
    return loaded


def save_binary(graph: Graph, path: str | os.PathLike) -> dict:
    """Write ``graph``'s weights with frozen binary layers bit-packed; returns size statistics."""
    return export(graph, path).details


@register_backend("binary")
def export(graph: Graph, path: str, *, tolerance: Tolerance = 0.0) -> ExportReport:
    """Write the 1-bit weights file, reload it into the graph and check the outputs.

    Options:
        tolerance: largest relative difference from the graph's outputs accepted after reloading (0: bit for bit)
    """
    started = time.perf_counter()
    path = os.fspath(path)
    data, stats = encode(graph)
    with atomic_path(path, ".gobin") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        outputs = load_binary(tmp, graph).run()
        fp32 = sum(t.numel() * 4 for t in graph.gm.state_dict().values() if t.is_floating_point())
        details = {**stats, "file_bytes": len(data), "fp32_bytes": fp32,
                   "binary_ratio": stats["binary_fp32_bytes"] / max(stats["binary_bytes"], 1)}
        report = parity_report("binary", graph, path, tmp, outputs, tolerance, started, details)
    return report
