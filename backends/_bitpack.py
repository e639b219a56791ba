"""Bit packing: booleans to one bit each and back (numpy ``packbits``, little bit order).

Shared by every format that stores low-bit data (binary weights, packed masks). Bit ``i``
of the flat input lands in byte ``i // 8`` at position ``i % 8``; the last byte is padded
with zero bits, so ``count`` must be given back to unpack.
"""
from __future__ import annotations

import numpy as np


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a boolean array (any shape, read flat in C order) into ``ceil(n / 8)`` bytes."""
    flat = np.ascontiguousarray(bits, dtype=bool).reshape(-1)
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_bits(data: bytes | np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` bits of ``data`` as a flat boolean array."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if raw.size * 8 < count:
        raise ValueError(f"{raw.size} bytes hold {raw.size * 8} bits, fewer than the {count} asked for")
    return np.unpackbits(raw, count=count, bitorder="little").astype(bool)


def packed_size(count: int) -> int:
    """Bytes ``pack_bits`` uses for ``count`` bits."""
    return (count + 7) // 8


def pack_words(bits: np.ndarray) -> np.ndarray:
    """Pack the last axis of a boolean array into uint64 words (zero-padded to a multiple of 64
    bits), for popcount kernels: shape ``(..., K)`` -> ``(..., ceil(K / 64))``."""
    bits = np.asarray(bits, dtype=bool)
    k = bits.shape[-1]
    pad = (-k) % 64
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint64)
