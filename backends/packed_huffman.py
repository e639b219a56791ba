"""Canonical Huffman integer streams: the entropy coder of packed format version 1.

Version 2 files use zstandard (see ``packed_codec``), which decodes ~60x faster; this module
stays so version-1 files still load bit for bit, and so the coder comparison benchmark can
measure both. Streams are cut into chunks of ``CHUNK`` symbols whose starting bit offsets are
stored, so the decoder advances every chunk of every stream of a file in one numpy step per
symbol position (``CHUNK`` steps in all) instead of one Python step per symbol.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from graphopt.backends.packed_codec import pack_bits, unpack_bits, width_for

MAX_CODE_LEN = 16      # the decoder reads 24-bit windows: code length + 7 must fit
CHUNK = 1024           # symbols per independently decodable Huffman chunk
MAX_SYMBOL = 1 << 16   # symbols are < 2**16 (codebook indices, shifted codes, gap symbols)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths (<= MAX_CODE_LEN) for symbols with the given positive ``counts``."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 1:
        return np.ones(1, dtype=np.int64)
    work = counts.copy()
    while True:
        heap = [(int(c), i, (i,)) for i, c in enumerate(work)]
        heapq.heapify(heap)
        lengths = np.zeros(counts.size, dtype=np.int64)
        tiebreak = counts.size
        while len(heap) > 1:
            c1, _, s1 = heapq.heappop(heap)
            c2, _, s2 = heapq.heappop(heap)
            members = s1 + s2
            lengths[list(members)] += 1
            heapq.heappush(heap, (c1 + c2, tiebreak, members))
            tiebreak += 1
        if lengths.max() <= MAX_CODE_LEN:
            return lengths
        work = (work >> 1) | 1  # flatten the distribution until the longest code fits


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, codes): symbol ranks sorted by (length, rank) and their canonical codes."""
    order = np.lexsort((np.arange(lengths.size), lengths))
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, int(lengths[order[0]])
    for position, rank in enumerate(order):
        length = int(lengths[rank])
        if position:
            code = (code + 1) << (length - previous)
        codes[rank] = code
        previous = length
    return order, codes


@dataclass
class HuffmanStream:
    """An encoded stream: ``symbols`` (sorted) and their code ``lengths`` form the table."""

    count: int
    symbols: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray   # starting bit of each chunk after the first
    data: bytes


def huffman_encode(values: np.ndarray) -> HuffmanStream:
    values = np.asarray(values, dtype=np.int64)
    symbols, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if symbols.size and (symbols[0] < 0 or symbols[-1] >= MAX_SYMBOL):
        raise ValueError(f"Huffman symbols must lie in [0, {MAX_SYMBOL})")
    lengths = huffman_lengths(counts) if symbols.size else np.zeros(0, dtype=np.int64)
    if not symbols.size:
        return HuffmanStream(0, symbols, lengths, np.zeros(0, dtype=np.int64), b"")
    _, codes = canonical_codes(lengths)
    sym_len, sym_code = lengths[inverse], codes[inverse]
    ends = np.cumsum(sym_len)
    starts = ends - sym_len
    bits = np.zeros(int(ends[-1]), dtype=np.uint8)
    for k in range(int(lengths.max())):
        live = sym_len > k
        bits[starts[live] + k] = (sym_code[live] >> (sym_len[live] - 1 - k)) & 1
    offsets = starts[CHUNK::CHUNK]
    return HuffmanStream(int(values.size), symbols, lengths, offsets, np.packbits(bits).tobytes())


@dataclass
class _Pending:
    stream: HuffmanStream
    lut_base: int
    max_len: int


def huffman_decode_many(streams: list[HuffmanStream]) -> list[np.ndarray]:
    """Decode several streams together (int64 arrays), advancing all their chunks at once."""
    results: list[np.ndarray | None] = [None] * len(streams)
    buffers, lut_syms, lut_lens = [], [], []
    chunk_bit, chunk_lut, chunk_shift, chunk_count = [], [], [], []
    lut_size, byte_pos = 0, 0
    width = 1
    plans = []
    for index, stream in enumerate(streams):
        if stream.count == 0:
            results[index] = np.zeros(0, dtype=np.int64)
            continue
        max_len = int(stream.lengths.max())
        width = max(width, max_len)
        plans.append((index, stream, max_len))
    if not plans:
        return results  # type: ignore[return-value]
    for index, stream, max_len in plans:
        order, _ = canonical_codes(stream.lengths)
        span = 1 << (max_len - stream.lengths[order])
        if span.sum() > (1 << max_len):
            raise ValueError("Huffman table violates the Kraft inequality")
        syms = np.repeat(stream.symbols[order], span)
        lens = np.repeat(stream.lengths[order], span)
        pad = (1 << max_len) - syms.size  # incomplete code (a single symbol): fill the rest
        syms = np.concatenate([syms, np.zeros(pad, dtype=np.int64)])
        lens = np.concatenate([lens, np.full(pad, max_len, dtype=np.int64)])
        lut_syms.append(syms)
        lut_lens.append(lens)
        starts = np.concatenate([[0], np.asarray(stream.offsets, dtype=np.int64)])
        n_chunks = (stream.count + CHUNK - 1) // CHUNK
        if starts.size != n_chunks or (starts.size > 1 and np.any(np.diff(starts) < 0)) \
                or (starts.size and starts[-1] > len(stream.data) * 8):
            raise ValueError("Huffman chunk offsets do not match the stream")
        chunk_bit.append(starts + byte_pos * 8)
        chunk_lut.append(np.full(n_chunks, lut_size, dtype=np.int64))
        chunk_shift.append(np.full(n_chunks, max_len, dtype=np.int64))
        counts = np.full(n_chunks, CHUNK, dtype=np.int64)
        counts[-1] = stream.count - CHUNK * (n_chunks - 1)
        chunk_count.append(counts)
        buffers.append(np.frombuffer(stream.data, dtype=np.uint8))
        lut_size += syms.size
        byte_pos += len(stream.data)
    # reading past a stream's end decodes garbage that is masked away; pad so reads stay in range
    buffers.append(np.zeros(2 * CHUNK + 8, dtype=np.uint8))
    buf = np.concatenate(buffers).astype(np.int64)
    syms_all, lens_all = np.concatenate(lut_syms), np.concatenate(lut_lens)
    pos = np.concatenate(chunk_bit)
    base = np.concatenate(chunk_lut)
    shift = width - np.concatenate(chunk_shift)
    counts = np.concatenate(chunk_count)
    out = np.zeros((pos.size, CHUNK), dtype=np.int64)
    mask = (1 << width) - 1
    steps = int(counts.max())
    for step in range(steps):
        byte, bit = pos >> 3, pos & 7
        window = (buf[byte] << 16) | (buf[byte + 1] << 8) | buf[byte + 2]
        window = ((window >> (24 - width - bit)) & mask) >> shift
        slot = base + window
        out[:, step] = syms_all[slot]
        pos = pos + lens_all[slot]
    cursor = 0
    for index, stream, _ in plans:
        n_chunks = (stream.count + CHUNK - 1) // CHUNK
        results[index] = out[cursor:cursor + n_chunks].reshape(-1)[: stream.count].copy()
        cursor += n_chunks
    return results  # type: ignore[return-value]


# -- the version-1 file layout of a stream: data, table (symbols + lengths), chunk offsets ------------
def stored_parts(stream: HuffmanStream) -> dict:
    """The segments and widths a version-1 file stores for ``stream`` (see ``read_stream``)."""
    sym_width = width_for(int(stream.symbols[-1]))
    off_width = width_for(int(stream.offsets[-1]) if stream.offsets.size else 0)
    return {"sym_width": sym_width, "off_width": off_width, "data": stream.data,
            "table": pack_bits(stream.symbols, sym_width) + pack_bits(stream.lengths - 1, 4),
            "offsets": pack_bits(stream.offsets, off_width)}


def stored_size(stream: HuffmanStream) -> int:
    """Bytes a version-1 file spends on ``stream`` (data, table and chunk offsets)."""
    parts = stored_parts(stream)
    return len(parts["data"]) + len(parts["table"]) + len(parts["offsets"])


def read_stream(n: int, symbols: int, sym_width: int, off_width: int, table: memoryview, offsets: memoryview,
                data: memoryview) -> HuffmanStream:
    """The stream a version-1 file describes with these fields and segments."""
    raw = np.frombuffer(table, dtype=np.uint8)
    syms = unpack_bits(raw, sym_width, symbols)
    lengths = unpack_bits(raw[(symbols * sym_width + 7) // 8:], 4, symbols) + 1
    n_offsets = max(0, (n + CHUNK - 1) // CHUNK - 1)
    return HuffmanStream(n, syms, lengths, unpack_bits(offsets, off_width, n_offsets), bytes(data))
