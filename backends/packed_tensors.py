"""Tensor encodings of the packed format, chosen per tensor as the smallest exact one.

Kinds (all decode to the saved values bit for bit):

- ``raw``: the bytes, as fp16 when every value is an fp16 number, else in the tensor's dtype.
- ``codebook``: few distinct values (weight sharing): a codebook (fp16 when exact) and one
  integer code per weight.
- ``quant``: ``code * scale[group]`` with one scale per flat group of ``group`` weights
  (per channel or per group), as annotated by the quantization pass.
- ``sparse``: positions of the non-zero weights as gaps between them (relative indices,
  with an escape symbol for long gaps), plus one of the kinds above over the non-zeros.

Integer streams (codes, gaps) are stored as a constant, fixed-width bit fields or a
zstandard frame (canonical Huffman in version-1 files), whichever is smallest. Every part is
tallied by role (values, index, codebook/scales, coding overhead) for the size report.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

from graphopt.backends.packed_codec import MAX_ZSTD_SYMBOL, pack_bits, unpack_bits, width_for, zstd_decode, zstd_encode
from graphopt.backends.packed_huffman import HuffmanStream, huffman_decode_many, read_stream
from graphopt.memory import check_fits, tensor_bytes

MAX_CODEBOOK = 1 << 12        # try codebook coding below this many distinct values
MIN_ZERO_FRACTION = 0.2       # try sparse coding above this fraction of exact zeros
ESCAPES = (15, 63, 255, 1023, 4095)  # gap symbols 0..escape: one byte up to 255
#: integer codecs each format version writes (and so the only ones a file of that version may hold)
CODECS = {1: frozenset({"const", "bits", "huffman"}), 2: frozenset({"const", "bits", "zstd"})}

_DTYPES = {name: getattr(torch, name) for name in
           ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return _DTYPES[name]


class BlobWriter:
    """Appends byte segments to the data section; a segment is ``[offset, length]``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes, align: int = 1) -> list[int]:
        pad = -self.size % align
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        self.parts.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data)]


class Tally(Counter):
    """Bytes by role: values, index, codebook, overhead."""

    def total(self) -> int:  # type: ignore[override]
        return sum(self.values())


# -- encoding -------------------------------------------------------------------------------
class _Draft:
    """A candidate encoding: its manifest entry, the byte segments it adds, and its tally.

    Segments are kept apart until the winner is chosen so that losers cost nothing."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        self.tally = Tally()

    def segment(self, data: bytes, role: str, align: int = 1) -> dict:
        self.chunks.append((data, align))
        self.tally[role] += len(data)
        return {"seg": len(self.chunks) - 1}

    def array(self, values: np.ndarray, role: str) -> dict:
        """A float array, as fp16 when that is exact."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        half = values.astype(np.float16)
        if np.array_equal(half.astype(np.float32).view(np.int32), values.view(np.int32)):
            return {"dtype": "float16", "n": int(values.size), **self.segment(half.tobytes(), role, 2)}
        return {"dtype": "float32", "n": int(values.size), **self.segment(values.tobytes(), role, 4)}

    def ints(self, values: np.ndarray, role: str) -> dict:
        """Non-negative integers as the smallest of: constant, fixed-width bits, zstandard."""
        values = np.asarray(values, dtype=np.int64)
        n = int(values.size)
        if n == 0 or values.min() == values.max():
            return {"codec": "const", "n": n, "value": int(values[0]) if n else 0}
        low, high = int(values.min()), int(values.max())
        width = width_for(high - low)
        if high < MAX_ZSTD_SYMBOL:
            frame, sym_bytes = zstd_encode(values)
            if len(frame) < (n * width + 7) // 8:
                return {"codec": "zstd", "n": n, "width": sym_bytes, **self.segment(frame, role)}
        packed = pack_bits(values - low, width)
        return {"codec": "bits", "n": n, "width": width, "low": low, **self.segment(packed, role)}

    def adopt(self, other: "_Draft") -> int:
        """Take ``other``'s segments and tally; returns the number its first segment now has."""
        base = len(self.chunks)
        self.chunks.extend(other.chunks)
        self.tally.update(other.tally)
        return base

    def size(self) -> int:
        return self.tally.total()


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def encode_tensor(tensor: torch.Tensor, hint: dict | None = None) -> tuple[dict, list[tuple[bytes, int]], Tally]:
    """(manifest entry, byte chunks, tally) of the smallest exact encoding of ``tensor``.

    ``hint`` is the tensor's compression annotation; ``{"quant": {"scales": ...}}`` (one scale
    per flat group) lets the quantized kind be tried."""
    tensor = tensor.detach().cpu().contiguous()
    entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    if tensor.dtype != torch.float32 or tensor.numel() < 16:
        draft = _Draft()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        entry["enc"] = {"kind": "raw", "array": {"dtype": entry["dtype"], "n": tensor.numel(),
                                                  **draft.segment(data, "values", tensor.element_size())}}
        return entry, draft.chunks, draft.tally
    flat = tensor.reshape(-1).numpy()
    quant = (hint or {}).get("quant")
    scales = None if quant is None else np.asarray(quant["scales"], dtype=np.float32).reshape(-1)
    group = None if scales is None or flat.size % scales.size else flat.size // scales.size
    candidates: list[tuple[dict, _Draft]] = []
    for sparse in (False, True):
        if sparse:
            nonzero = flat.view(np.int32) != 0
            if 1 - nonzero.mean() < MIN_ZERO_FRACTION:
                continue
            positions = np.flatnonzero(nonzero)
            values = flat[positions]
            index = _Draft()
            gaps = _encode_positions(index, positions)  # shared by every kind of values
        else:
            positions, values = None, flat
        for kind in ("raw", "quant", "codebook"):
            draft = _Draft()
            if sparse:
                gaps_desc = {**gaps, "gaps": _shift_segments(gaps["gaps"], draft.adopt(index))}
            enc = _encode_values(draft, kind, values, positions, scales, group)
            if enc is None:
                continue
            if sparse:
                enc = {"kind": "sparse", "nnz": int(positions.size), **gaps_desc, "values": enc}
            candidates.append((enc, draft))
    enc, draft = min(candidates, key=lambda c: c[1].size())
    entry["enc"] = enc
    return entry, draft.chunks, draft.tally


def _encode_values(draft: _Draft, kind: str, values: np.ndarray, positions: np.ndarray | None,
                   scales: np.ndarray | None, group: int | None) -> dict | None:
    if kind == "raw":
        return {"kind": "raw", "array": draft.array(values, "values")}
    if kind == "quant":
        if scales is None or group is None:
            return None
        index = (positions if positions is not None else np.arange(values.size)) // group
        step = scales[index]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.rint(values / step)
        if not np.all(np.isfinite(codes)):
            return None
        codes = codes.astype(np.int64)
        if not _bits_equal(codes.astype(np.float32) * step, values):
            return None  # the weights are not (or no longer) code * scale
        zero = -int(codes.min()) if codes.size else 0
        return {"kind": "quant", "group": group, "zero": zero, "scales": draft.array(scales, "codebook"),
                "codes": draft.ints(codes + zero, "values")}
    if kind == "codebook":
        patterns = values.view(np.int32)  # distinct bit patterns: -0.0 is not 0.0
        if not values.size or np.unique(patterns[: 1 << 16]).size > MAX_CODEBOOK:
            return None
        book, codes = np.unique(patterns, return_inverse=True)
        if book.size > MAX_CODEBOOK:
            return None
        return {"kind": "codebook", "codebook": draft.array(book.view(np.float32), "codebook"),
                "codes": draft.ints(codes, "values")}
    raise ValueError(kind)


def _encode_positions(draft: _Draft, positions: np.ndarray) -> dict:
    """Gaps between successive non-zero positions, long gaps split by an escape symbol."""
    gaps = np.diff(positions, prepend=-1) - 1
    best = None
    for escape in ESCAPES:
        escapes = gaps // escape
        symbols = np.full(int(escapes.sum() + gaps.size), escape, dtype=np.int64)
        symbols[np.cumsum(escapes + 1) - 1] = gaps % escape
        trial = _Draft()
        stream = trial.ints(symbols, "index")
        if best is None or trial.size() < best[2].size():
            best = (escape, stream, trial)
        if gaps.size == 0 or gaps.max() < escape:
            break
    escape, stream, trial = best
    return {"escape": escape, "gaps": _shift_segments(stream, draft.adopt(trial))}


def _shift_segments(desc: dict, base: int) -> dict:
    out = dict(desc)
    for key in ("seg", "table", "offsets"):  # "table" and "offsets": version-1 Huffman streams
        if key in out:
            out[key] = out[key] + base
    return out


def place(enc: Any, chunks: list[tuple[bytes, int]], blob: BlobWriter) -> Any:
    """Write a draft's chunks into the blob, turning chunk numbers into [offset, length]."""
    spans = [blob.add(data, align) for data, align in chunks]

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (spans[v] if k in ("seg", "table", "offsets") else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return fix(enc)


# -- decoding -------------------------------------------------------------------------------
class Reader:
    """Decodes the tensors of a file of format ``version``. ``plan(entry)`` checks an entry and
    returns a builder that decodes that one tensor; builders share nothing mutable, so they
    may run in any order and on any thread. A version-1 file's Huffman streams are decoded
    together by ``run()`` first (the numpy decoder is fast only on the whole batch)."""

    def __init__(self, blob: memoryview, version: int):
        self.blob = blob
        self.version = version
        self.codecs = CODECS[version]
        self.pending: list[HuffmanStream] = []
        self.decoded: list[np.ndarray] = []

    def span(self, seg: list[int]) -> memoryview:
        offset, length = (int(v) for v in seg)
        if offset < 0 or length < 0 or offset + length > len(self.blob):
            raise ValueError(f"segment [{offset}, {offset + length}) lies outside the data section")
        return self.blob[offset:offset + length]

    def ints(self, desc: dict, limit: int) -> Callable[[], np.ndarray]:
        """A decoder of the integer stream ``desc`` (at most ``limit`` values)."""
        n, codec = int(desc["n"]), desc["codec"]
        if codec not in self.codecs:
            raise ValueError(f"integer codec {codec!r} is not one of format version {self.version}'s "
                             f"({', '.join(sorted(self.codecs))})")
        if not 0 <= n <= limit:
            raise ValueError(f"integer stream of {n} values where at most {limit} fit the tensor")
        if codec == "const":
            value = int(desc["value"])
            return lambda: np.full(n, value, dtype=np.int64)
        if codec == "bits":
            data, width, low = self.span(desc["seg"]), int(desc["width"]), int(desc["low"])
            if not 1 <= width <= 63:
                raise ValueError(f"bit field width {width} is outside 1..63")
            return lambda: unpack_bits(data, width, n) + low
        if codec == "zstd":
            data, width = self.span(desc["seg"]), int(desc["width"])
            return lambda: zstd_decode(data, n, width)
        stream = read_stream(n, int(desc["symbols"]), int(desc["sym_width"]), int(desc["off_width"]),
                             self.span(desc["table"]), self.span(desc["offsets"]), self.span(desc["seg"]))
        index = len(self.pending)
        self.pending.append(stream)
        return lambda: self.decoded[index]

    def _array(self, desc: dict) -> np.ndarray:
        dtype = {"float16": np.float16, "float32": np.float32}[desc["dtype"]]
        n = int(desc["n"])
        data = self.span(desc["seg"])
        if len(data) != n * np.dtype(dtype).itemsize:
            raise ValueError(f"array of {n} {desc['dtype']} values has {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype).astype(np.float32)

    def plan(self, entry: dict) -> Callable[[], torch.Tensor]:
        shape = [int(d) for d in entry["shape"]]
        dtype = torch_dtype(entry["dtype"])
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor shape {shape} has a negative size")
        numel = math.prod(shape)
        check_fits(tensor_bytes(shape, dtype), f"shape {shape} ({entry['dtype']})", ValueError)
        enc = entry["enc"]
        if enc["kind"] == "raw" and enc["array"]["dtype"] == entry["dtype"]:
            array = enc["array"]
            if int(array["n"]) != numel:
                raise ValueError("raw tensor does not match its shape and dtype")
            data = self.span(array["seg"])
            if len(data) != numel * torch.empty(0, dtype=dtype).element_size():
                raise ValueError(f"tensor data has {len(data)} bytes, shape {shape} needs more or fewer")
            return lambda: (torch.frombuffer(data, dtype=dtype, count=numel) if numel else
                            torch.empty(0, dtype=dtype)).reshape(shape)
        if dtype != torch.float32:
            raise ValueError(f"{enc['kind']} encoding is only for float32 tensors, not {entry['dtype']}")
        if enc["kind"] != "sparse":
            values = self._values(enc, numel, numel)
            return lambda: torch.from_numpy(values(None)).reshape(shape)
        nnz, escape = int(enc["nnz"]), int(enc["escape"])
        if not 0 <= nnz <= numel or escape < 1:
            raise ValueError(f"sparse tensor of {numel} values with {nnz} non-zeros and escape {escape}")
        gaps = self.ints(enc["gaps"], nnz + numel // escape + 1)
        values = self._values(enc["values"], nnz, numel)

        def build_sparse() -> torch.Tensor:
            positions = _positions(gaps(), escape, nnz, numel)
            full = np.zeros(numel, dtype=np.float32)
            full[positions] = values(positions)
            return torch.from_numpy(full).reshape(shape)

        return build_sparse

    def _values(self, enc: dict, n: int, numel: int) -> Callable[[np.ndarray | None], np.ndarray]:
        """A decoder of ``n`` values; it takes their flat positions (None: all ``numel``, in order)."""
        kind = enc["kind"]
        if kind == "raw":
            array = self._array(enc["array"])
            if array.size != n:
                raise ValueError("value count does not match")
            return lambda positions: array
        if kind == "codebook":
            book = self._array(enc["codebook"])
            codes = self.ints(enc["codes"], n)

            def from_book(positions: np.ndarray | None) -> np.ndarray:
                c = codes()
                if c.size != n or (c.size and c.max() >= book.size):
                    raise ValueError("codebook codes do not match")
                return book[c]

            return from_book
        if kind == "quant":
            scales = self._array(enc["scales"])
            group, zero = int(enc["group"]), int(enc["zero"])
            if group < 1 or scales.size * group != numel:
                raise ValueError(f"{scales.size} scales of groups of {group} do not cover {numel} values")
            codes = self.ints(enc["codes"], n)

            def from_codes(positions: np.ndarray | None) -> np.ndarray:
                c = codes()
                if c.size != n:
                    raise ValueError("quantized codes do not match")
                steps = (c.astype(np.int64 if c.dtype == np.int64 else np.int32) - zero).astype(np.float32)
                if positions is None:  # dense: every group in full
                    return (steps.reshape(scales.size, group) * scales[:, None]).reshape(-1)
                ends = np.searchsorted(positions, np.arange(1, scales.size + 1, dtype=np.int64) * group)
                return steps * np.repeat(scales, np.diff(ends, prepend=0))

            return from_codes
        raise ValueError(f"unknown value encoding {kind!r}")

    def run(self) -> None:
        """Decode a version-1 file's Huffman streams (all together)."""
        if self.pending:
            self.decoded = huffman_decode_many(self.pending)


def _positions(symbols: np.ndarray, escape: int, nnz: int, numel: int) -> np.ndarray:
    """Flat positions of the non-zeros from their gap symbols (``escape``: skip ``escape`` places)."""
    entries = symbols != escape
    reach = symbols.size * (max(escape, int(symbols.max(initial=0)) + 1) + 1)
    advance = symbols.astype(np.int32 if reach < 2 ** 31 else np.int64)  # int32 sums: ~2x faster
    advance += 1
    if not entries.all():
        advance[~entries] = escape
    positions = np.cumsum(advance, dtype=advance.dtype)
    positions -= 1
    if not entries.all():
        positions = positions[entries]
    if positions.size != nnz or (positions.size and positions[-1] >= numel):
        raise ValueError("sparse positions do not match the tensor")
    return positions
