"""Integer streams of the packed format: fixed-width bit fields and zstandard frames.

Both carry 1-D arrays of non-negative integers (codes, codebook indices, index gaps).
zstandard is the entropy coder of format version 2: on weight codes and index gaps its
Huffman-coded literal blocks are as small as version 1's canonical Huffman streams with their
chunk offsets (within 1.5% of the order-0 entropy), and they decode at ~1 G symbols/s in C, where
the numpy Huffman decoder (``packed_huffman``) manages ~15 M (``bench_packed`` measures both).
Symbols are stored one byte each, or as two byte planes (low bytes, then high bytes) when
they need 16 bits, so each block's Huffman table sees one distribution.
"""
from __future__ import annotations

import numpy as np
import zstandard

MAX_ZSTD_SYMBOL = 1 << 16
# Literal-heavy streams: a 128 KiB window (one block) and the optimal parser with a long
# target length keep zstd from trading literals for useless short matches. Measured on the
# streams of a pruned int8 ResNet-50: 0.1% smaller than level 19, in a seventh of its time.
_PARAMS = zstandard.ZstdCompressionParameters(window_log=17, chain_log=10, hash_log=10, search_log=1, min_match=7,
                                              target_length=64, strategy=zstandard.STRATEGY_BTOPT,
                                              write_checksum=False, write_content_size=True, write_dict_id=False)


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
    if width == 8:
        return raw[:count].astype(np.int64)
    if width <= 25:  # every field lies in the 4 bytes from its first one
        buf = np.concatenate([raw[:needed], np.zeros(3, dtype=np.uint8)]).astype(np.int64)
        start = np.arange(count, dtype=np.int64) * width
        byte = start >> 3
        window = (buf[byte] << 24) | (buf[byte + 1] << 16) | (buf[byte + 2] << 8) | buf[byte + 3]
        return (window >> (32 - width - (start & 7))) & ((1 << width) - 1)
    bits = np.unpackbits(raw[:needed])[: count * width].reshape(count, width).astype(np.int64)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits @ weights


# -- zstandard --------------------------------------------------------------------------
def zstd_encode(values: np.ndarray) -> tuple[bytes, int]:
    """(one zstandard frame, bytes per symbol) for integers in [0, 2**16)."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= MAX_ZSTD_SYMBOL):
        raise ValueError(f"zstd stream symbols must lie in [0, {MAX_ZSTD_SYMBOL})")
    width = 1 if not values.size or values.max() < 256 else 2
    if width == 1:
        raw = values.astype(np.uint8).tobytes()
    else:
        raw = np.ascontiguousarray(values.astype("<u2").view(np.uint8).reshape(-1, 2).T).tobytes()
    return zstandard.ZstdCompressor(compression_params=_PARAMS).compress(raw), width


def zstd_decode(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of ``zstd_encode``: ``count`` symbols (uint8 or uint16). Raises ValueError
    unless ``data`` is exactly one frame that declares and holds ``count * width`` bytes."""
    if width not in (1, 2):
        raise ValueError(f"zstd stream symbols are 1 or 2 bytes wide, not {width}")
    size = count * width
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd stream has no valid frame header: {exc}") from exc
    if declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes; a stream of {count} symbols of {width} bytes "
                         f"needs {size}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd stream does not decode: {exc}") from exc
    if len(raw) != size:
        raise ValueError(f"zstd stream holds {len(raw)} bytes, {size} expected")
    planes = np.frombuffer(raw, dtype=np.uint8)
    if width == 1:
        return planes
    out = np.empty(count, dtype="<u2")
    pairs = out.view(np.uint8).reshape(count, 2)
    pairs[:, 0], pairs[:, 1] = planes[:count], planes[count:]
    return out
