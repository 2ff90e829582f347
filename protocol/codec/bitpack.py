"""Pack small unsigned codes (1, 2, 4 or 8 bits each) densely into bytes, and back.

Codes are packed most-significant-first: with 4 bits the first code is the high nibble of
the first byte (the same order as `np.packbits`). The unused low bits of the last byte must
be zero; `unpack_codes` refuses anything else so that a payload has exactly one encoding.
"""
from __future__ import annotations

import numpy as np

from protocol.codec.container import bad_payload

PACKABLE_BITS = (1, 2, 4, 8)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """`codes` (uint8, each < 2**bits) as ceil(len*bits/8) bytes."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.tobytes()
    if bits == 1:
        return np.packbits(codes).tobytes()
    per_byte = 8 // bits
    padded = np.zeros(packed_size(codes.size, bits) * per_byte, dtype=np.uint8)
    padded[:codes.size] = codes
    columns = padded.reshape(-1, per_byte)
    packed = columns[:, 0] << (8 - bits)
    for j in range(1, per_byte):
        packed |= columns[:, j] << (8 - bits * (j + 1))
    return packed.tobytes()


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` codes held in `packed` (uint8 array of exactly packed_size(count, bits))."""
    if packed.size != packed_size(count, bits):
        raise bad_payload(f"{packed.size} bytes cannot hold exactly {count} {bits}-bit codes")
    if bits == 8:
        return packed
    spare = packed.size * 8 - count * bits
    if spare and int(packed[-1]) & ((1 << spare) - 1):
        raise bad_payload("padding bits after the last code are not zero")
    if bits == 1:
        return np.unpackbits(packed, count=count)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    columns = np.empty((packed.size, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        np.bitwise_and(packed >> (8 - bits * (j + 1)), mask, out=columns[:, j])
    return columns.reshape(-1)[:count]
