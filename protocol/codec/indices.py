"""Compact coding of a sorted set of k distinct indices out of n: delta-varint or bitmap.

Per message the smaller of two forms is chosen (one mode byte says which):
- mode 0, gaps: varint(byte length), then each gap idx[i] - idx[i-1] - 1 (idx[0] for the
  first) as a varint. About 1-2 bytes an index when 1 % of the coordinates are kept.
- mode 1, bitmap: ceil(n / 8) bytes, bit i (most significant first) set when i is kept.
  Smaller once more than about 1 in 8-16 coordinates is kept.
Both decode with numpy only; the count k is known to the decoder and is checked.
"""
from __future__ import annotations

import numpy as np

from protocol.codec.container import (
    ByteReader, ByteWriter, bad_payload, decode_varint_array, encode_varint_array, varint_sizes,
)

MODE_GAPS = 0
MODE_BITMAP = 1


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def write_indices(indices: np.ndarray, n: int, out: ByteWriter) -> None:
    """Write sorted unique `indices` (< n) in whichever form is smaller."""
    gaps = _gaps(np.asarray(indices, dtype=np.int64))
    gap_bytes = int(varint_sizes(gaps).sum())
    bitmap_bytes = (n + 7) // 8
    if gap_bytes + 5 < bitmap_bytes:
        out.u8(MODE_GAPS)
        out.varint(gap_bytes)
        out.write(encode_varint_array(gaps))
    else:
        bits = np.zeros(n, dtype=np.uint8)
        bits[indices] = 1
        out.u8(MODE_BITMAP)
        out.write(np.packbits(bits).tobytes())


def read_indices(reader: ByteReader, n: int, k: int) -> np.ndarray:
    """The k sorted unique int64 indices in [0, n) written by `write_indices`."""
    mode = reader.u8("index mode")
    if mode == MODE_GAPS:
        nbytes = reader.varint("index byte length", max_value=reader.remaining)
        data = reader.take(nbytes, "index gaps")
        max_bytes_each = max(1, -(-max(n, 1).bit_length() // 7))
        gaps = decode_varint_array(data, k, max_bytes_each, "index gaps")
        indices = np.cumsum(gaps + 1) - 1
        if k and indices[-1] >= n:
            raise bad_payload(f"index {int(indices[-1])} out of range for {n} coordinates")
        return indices
    if mode == MODE_BITMAP:
        packed = reader.array("u1", (n + 7) // 8, "index bitmap")
        spare = packed.size * 8 - n
        if spare and int(packed[-1]) & ((1 << spare) - 1):
            raise bad_payload("index bitmap has bits set beyond the vector length")
        indices = np.flatnonzero(np.unpackbits(packed, count=n))
        if indices.size != k:
            raise bad_payload(f"index bitmap marks {indices.size} coordinates, expected {k}")
        return indices.astype(np.int64, copy=False)
    raise bad_payload(f"index mode {mode} is unknown (0 = gaps, 1 = bitmap)")


def max_index_bytes(n: int, k: int) -> int:
    """An upper bound on what `write_indices` writes (for the zstd output limit)."""
    max_bytes_each = max(1, -(-max(n, 1).bit_length() // 7))
    return 1 + max(5 + k * max_bytes_each, (n + 7) // 8)
