"""Entropy coders compared on the integer streams of real packed files: size and decode speed.

Every non-constant integer stream of a file (weight codes, codebook indices, index gaps) is
coded by each coder; sizes count everything a file would store (Huffman tables and chunk
offsets, zstd frame headers, ANS probability tables). Decoding is timed per file, all its
streams, coders interleaved round by round (medians). Coders:

- fixed-width bits (no entropy coding; the floor every coder must beat);
- canonical Huffman, numpy decoder, all streams of a file at once (format version 1);
- zstandard with the format's parameters (version 2), and at levels 3 and 19;
- constriction's ANS with one categorical model per stream (not a format dependency:
  requirements-bench.txt);
- the order-0 entropy of each stream, as the bound.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import zstandard

from graphopt.backends import packed
from graphopt.backends.packed_codec import pack_bits, unpack_bits, width_for, zstd_decode, zstd_encode
from graphopt.backends.packed_huffman import huffman_decode_many, huffman_encode, stored_size
from graphopt.backends.packed_tensors import Reader
from graphopt.app.latency import interleaved_latency
from graphopt.report import markdown_table, table

FORMAT_ZSTD = "zstd, format v2 parameters"
HUFFMAN = "canonical Huffman, numpy (format v1)"


def file_streams(path: str) -> list[np.ndarray]:
    """The decoded non-constant integer streams of a packed file (int64)."""
    manifest, blob, version = packed._read_checked(path)
    reader, found = Reader(blob, version), []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("codec") not in (None, "const"):
                found.append(reader.ints(node, limit=int(node["n"])))
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest["tensors"])
    reader.run()
    return [decode().astype(np.int64) for decode in found]


def _bits(streams: list[np.ndarray]) -> tuple[int, Callable]:
    coded = [(pack_bits(s - s.min(), width_for(int(s.max() - s.min()))), width_for(int(s.max() - s.min())), s.size)
             for s in streams]
    return sum(len(c) for c, _, _ in coded), lambda: [unpack_bits(c, w, n) for c, w, n in coded]


def _huffman(streams: list[np.ndarray]) -> tuple[int, Callable]:
    coded = [huffman_encode(s) for s in streams]
    return sum(stored_size(c) for c in coded), lambda: huffman_decode_many(coded)


def _zstd(streams: list[np.ndarray], level: int | None) -> tuple[int, Callable]:
    coded = []
    for s in streams:
        frame, width = zstd_encode(s)
        if level is not None:  # the same byte layout, the library's level instead of the format's parameters
            raw = zstandard.ZstdDecompressor().decompress(frame)
            frame = zstandard.ZstdCompressor(level=level, write_checksum=False).compress(raw)
        coded.append((frame, s.size, width))
    return sum(len(f) for f, _, _ in coded), lambda: [zstd_decode(f, n, w) for f, n, w in coded]


def _ans(streams: list[np.ndarray]) -> tuple[int, Callable] | None:
    try:
        import constriction
    except ImportError:
        return None
    coded, size = [], 0
    for s in streams:
        symbols, index, counts = np.unique(s, return_inverse=True, return_counts=True)
        probs = (counts / counts.sum()).astype(np.float32)  # stored as float32: the decoder rebuilds the same model
        model = constriction.stream.model.Categorical(probs.astype(np.float64), perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(index.astype(np.int32), model)
        words = coder.get_compressed()
        coded.append((words, probs, symbols, s.size))
        size += words.nbytes + probs.nbytes + 2 * symbols.size + 8  # + symbol ids, counts

    def decode() -> list[np.ndarray]:
        out = []
        for words, probs, symbols, n in coded:
            model = constriction.stream.model.Categorical(probs.astype(np.float64), perfect=False)
            out.append(symbols[constriction.stream.stack.AnsCoder(words).decode(model, n)])
        return out

    return size, decode


def _entropy_bytes(streams: list[np.ndarray]) -> float:
    total = 0.0
    for s in streams:
        _, counts = np.unique(s, return_counts=True)
        total -= float((counts * np.log2(counts / counts.sum())).sum()) / 8
    return total


def compare(label: str, path: str, rounds: int = 3) -> dict:
    """Sizes and decode times of every coder on the streams of the file at ``path``."""
    streams = file_streams(path)
    symbols = int(sum(s.size for s in streams))
    coders = {"fixed-width bits": _bits(streams), HUFFMAN: _huffman(streams), FORMAT_ZSTD: _zstd(streams, None),
              "zstd level 3": _zstd(streams, 3), "zstd level 19": _zstd(streams, 19),
              "constriction ANS (categorical)": _ans(streams)}
    coders = {name: coder for name, coder in coders.items() if coder is not None}
    for name, (_, decode) in coders.items():  # every coder gives the streams back exactly
        if not all(np.array_equal(a, b) for a, b in zip(decode(), streams)):
            raise AssertionError(f"{name} does not decode {label}'s streams exactly")
    seconds = interleaved_latency({name: decode for name, (_, decode) in coders.items()}, rounds=rounds, warmup=0)
    base = coders[HUFFMAN][0]
    rows = [{"coder": name, "bytes": size, "vs_huffman": round(size / base, 4),
             "bits_per_symbol": round(8 * size / symbols, 3), "decode_s": round(seconds[name], 4),
             "msymbols_per_s": round(symbols / seconds[name] / 1e6, 1)} for name, (size, _) in coders.items()]
    entropy = _entropy_bytes(streams)
    rows.append({"coder": "order-0 entropy (bound)", "bytes": round(entropy), "vs_huffman": round(entropy / base, 4),
                 "bits_per_symbol": round(8 * entropy / symbols, 3), "decode_s": None, "msymbols_per_s": None})
    return {"model": label, "streams": len(streams), "symbols": symbols, "rounds": rounds, "rows": rows}


def coder_table(results: list[dict]) -> tuple[list[str], list[tuple]]:
    headers = ["model", "coder", "bytes", "x Huffman", "bits/sym", "decode s", "Msym/s"]
    rows = [(r["model"], row["coder"], row["bytes"], f"{row['vs_huffman']:.4f}", f"{row['bits_per_symbol']:.3f}",
             "-" if row["decode_s"] is None else f"{row['decode_s']:.4f}",
             "-" if row["msymbols_per_s"] is None else f"{row['msymbols_per_s']:.1f}")
            for r in results for row in r["rows"]]
    return headers, rows


def print_table(results: list[dict]) -> None:
    print(table(*coder_table(results)))


CODER_NAMES = {"fixed-width bits": "fixed-width bits (no entropy coding)",
               HUFFMAN: "canonical Huffman, vectorised numpy decoder (version 1)",
               FORMAT_ZSTD: "zstandard, the format's parameters (version 2)", "zstd level 3": "zstandard level 3",
               "zstd level 19": "zstandard level 19",
               "constriction ANS (categorical)": "constriction ANS, one categorical model a stream"}


def coder_markdown(result: dict) -> str:
    """One file's coders: bytes, against Huffman, decode time and speed."""
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)
    return markdown_table(
        [f"coder ({result['model']}: {result['symbols'] / 1e6:.1f} M symbols)", "bytes", "vs Huffman", "decode s",
         "M symbols/s"],
        [(CODER_NAMES.get(r["coder"], r["coder"]), f"{r['bytes']:,}".replace(",", " "), f"{r['vs_huffman']:.3f}",
          cell(r["decode_s"], ".3f"), cell(r["msymbols_per_s"], ".0f")) for r in result["rows"]])
