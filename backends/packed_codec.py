"""Integer streams for the packed format: fixed-width bit packing and canonical Huffman.

Both work on 1-D arrays of non-negative integers (codes, codebook indices, index gaps)
and are vectorised with numpy. Huffman streams are cut into chunks of ``CHUNK`` symbols
whose starting bit offsets are stored, so that the decoder advances every chunk of every
stream of a file in one numpy step per symbol position (``CHUNK`` steps in all, however
many tensors the file holds) instead of one Python step per symbol.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

MAX_CODE_LEN = 16      # the decoder reads 24-bit windows: code length + 7 must fit
CHUNK = 1024           # symbols per independently decodable Huffman chunk
MAX_SYMBOL = 1 << 16   # symbols are < 2**16 (codebook indices, shifted codes, gap symbols)


def width_for(max_value: int) -> int:
    """Bits needed to store integers in [0, max_value] (at least 1)."""
    return max(1, int(max_value).bit_length())


# -- fixed width ------------------------------------------------------------------------
def pack_bits(values: np.ndarray, width: int) -> bytes:
    """``values`` (non-negative, < 2**width) as big-endian ``width``-bit fields, zero padded."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(data: bytes | memoryview | np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` integers (int64)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    needed = (count * width + 7) // 8
    if raw.size < needed:
        raise ValueError(f"bit-packed stream holds {raw.size} bytes, {needed} needed")
    bits = np.unpackbits(raw[:needed])[: count * width].reshape(count, width).astype(np.int64)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits @ weights


# -- canonical Huffman ------------------------------------------------------------------
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
