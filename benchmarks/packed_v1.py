"""A version-1 copy of a packed file: its integer streams re-coded with canonical Huffman.

graphopt wrote version 1 before zstandard became the coder; this rebuilds what it wrote
(each stream as Huffman where that is smaller than fixed-width bits, as the version-1 writer
chose) so a benchmark can time both coders on the same model, and tests can make
version-1 files of any model. The graph and every other byte stay as they are.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

import numpy as np

from graphopt.backends import packed
from graphopt.backends.packed_codec import pack_bits, width_for
from graphopt.backends.packed_huffman import MAX_SYMBOL, huffman_encode, stored_parts, stored_size
from graphopt.backends.packed_tensors import BlobWriter, Reader, torch_dtype
from graphopt.files import atomic_path


def write_version_1(src: str, dst: str) -> None:
    """Write ``dst``: the packed file ``src`` (version 2) with version-1 Huffman streams."""
    manifest, blob, version = packed._read_checked(src)
    if version != 2:
        raise ValueError(f"{src} is version {version}, not 2")
    reader, out = Reader(blob, version), BlobWriter()

    def copy(node: Any, align: int = 1) -> Any:
        if isinstance(node, list):
            return [copy(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "codec" in node:
            return _recode(reader.ints(node, limit=node["n"])(), out)
        if "dtype" in node:  # an array: keep its alignment
            align = torch_dtype(node["dtype"]).itemsize
        return {k: (out.add(bytes(reader.span(v)), align) if k == "seg" else copy(v, align))
                for k, v in node.items()}

    manifest = {**manifest, "version": 1, "tensors": copy(manifest["tensors"])}
    text = zlib.compress(json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode(), 9)
    pad = -(packed._HEADER.size + len(text)) % packed._ALIGN
    body = text + b"\0" * pad + b"".join(out.parts)
    fields = (packed.MAGIC, 1, packed._FLAG_ZLIB, len(text), out.size)
    digest = hashlib.sha256(struct.pack("<8sIIQQ", *fields) + body).digest()
    with atomic_path(dst, ".gpk") as tmp:
        with open(tmp, "wb") as f:
            f.write(packed._HEADER.pack(*fields, digest) + body)


def _recode(values: np.ndarray, out: BlobWriter) -> dict:
    values = values.astype(np.int64)
    n = int(values.size)
    if n == 0 or values.min() == values.max():
        return {"codec": "const", "n": n, "value": int(values[0]) if n else 0}
    low = int(values.min())
    width = width_for(int(values.max()) - low)
    bits = pack_bits(values - low, width)
    if values.max() < MAX_SYMBOL:
        stream = huffman_encode(values)
        if stored_size(stream) < len(bits):
            parts = stored_parts(stream)
            return {"codec": "huffman", "n": n, "symbols": int(stream.symbols.size), "sym_width": parts["sym_width"],
                    "off_width": parts["off_width"], "seg": out.add(parts["data"]), "table": out.add(parts["table"]),
                    "offsets": out.add(parts["offsets"])}
    return {"codec": "bits", "n": n, "width": width, "low": low, "seg": out.add(bits)}
