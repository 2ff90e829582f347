"""Byte-level building blocks of a codec payload: a writer, a bounds-checked reader, varints.

Every length or count that comes out of a payload is checked against the bytes that remain
BEFORE anything is allocated, so a hostile payload can make the reader raise `CodecError`
but never allocate more than the payload (or the caller's expected size) justifies.
Varints are LEB128 (7 bits a byte, low group first, high bit = "more bytes follow"); the
array versions are vectorised with numpy because index lists hold thousands of them.
"""
from __future__ import annotations

import numpy as np

from protocol.errors import CodecError, Reason

MAX_VARINT_BYTES = 10  # enough for any uint64
F32_MAX = float(np.finfo(np.float32).max)
MAX_ABS_VALUE = 2.0**100  # ~1.3e30: encoders refuse larger values; they are not model updates
DECODE_LIMIT = 2.0 * MAX_ABS_VALUE  # decoders allow rounding headroom above that, no more


def truncated(what: str, need: int, have: int) -> CodecError:
    return CodecError(Reason.TRUNCATED, f"payload ends inside {what}: needs {need} more bytes, {have} left")


def bad_payload(detail: str) -> CodecError:
    return CodecError(Reason.BAD_PAYLOAD, detail)


def check_peak(peak: float, scale: float, what: str) -> None:
    """Refuse decoded magnitudes no encoder produces, or that overflow float32 once scaled.

    `peak` is the largest |value| before scaling; NaN fails the test too. Checking this one
    number up front keeps NaN/inf (and numpy overflow warnings) out of the decoded values.
    """
    if not peak <= DECODE_LIMIT:
        raise bad_payload(f"{what} hold NaN, infinity or magnitudes above {DECODE_LIMIT:g} ({peak:g})")
    if peak * abs(scale) * (1 + 1e-6) > F32_MAX:
        raise bad_payload(f"{what} times {scale:g} overflow float32")


class ByteWriter:
    """Collects the sections of a payload; `getvalue` joins them once."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._parts.append(bytes(data))

    def u8(self, value: int) -> None:
        self._parts.append(bytes((value,)))

    def varint(self, value: int) -> None:
        self._parts.append(encode_varint(value))

    def array(self, values: np.ndarray, dtype: str) -> None:
        """Append `values` as little-endian `dtype` (e.g. "<f4")."""
        self._parts.append(np.ascontiguousarray(values, dtype=dtype).tobytes())

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class ByteReader:
    """Reads a payload front to back; every read checks the remaining length first."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = data if isinstance(data, bytes) else bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _advance(self, nbytes: int, what: str) -> int:
        """Check that `nbytes` remain, move past them, return where they start."""
        if nbytes < 0:
            raise bad_payload(f"negative length for {what}")
        if nbytes > self.remaining:
            raise truncated(what, nbytes, self.remaining)
        start = self._pos
        self._pos += nbytes
        return start

    def take(self, nbytes: int, what: str) -> bytes:
        start = self._advance(nbytes, what)
        return self._data[start:self._pos]

    def u8(self, what: str) -> int:
        if self.remaining < 1:
            raise truncated(what, 1, 0)
        value = self._data[self._pos]
        self._pos += 1
        return value

    def varint(self, what: str, max_value: int) -> int:
        """One LEB128 varint no larger than `max_value` (BAD_PAYLOAD otherwise)."""
        result = 0
        for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
            byte = self.u8(what)
            result |= (byte & 0x7F) << shift
            if result > max_value:
                raise bad_payload(f"{what} is larger than {max_value}")
            if byte < 0x80:
                return result
        raise bad_payload(f"{what} is a varint longer than {MAX_VARINT_BYTES} bytes")

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """`count` little-endian values of `dtype`, as a read-only array over the payload."""
        start = self._advance(count * np.dtype(dtype).itemsize, what)
        return np.frombuffer(self._data, dtype=dtype, count=count, offset=start)

    def finish(self) -> None:
        """Refuse trailing bytes: a payload must be exactly what its codec writes."""
        if self.remaining:
            raise bad_payload(f"{self.remaining} unexpected bytes after the end of the payload")


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"varint must be >= 0, got {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes each value of a non-negative integer array takes as a varint (1..5 for uint32)."""
    v = np.asarray(values, dtype=np.uint64)
    sizes = np.ones(v.shape, dtype=np.int64)
    for bits in (7, 14, 21, 28, 35, 42, 49, 56, 63):
        sizes += v >= np.uint64(1 << bits)
    return sizes


def encode_varint_array(values: np.ndarray) -> bytes:
    """All values of a non-negative integer array as consecutive varints (vectorised)."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    sizes = varint_sizes(v)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(sizes.max())):
        has = sizes > j
        group = ((v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (sizes[has] > j + 1).astype(np.uint8) << 7
        out[starts[has] + j] = group | more
    return out.tobytes()


def decode_varint_array(data: bytes, count: int, max_bytes_each: int, what: str) -> np.ndarray:
    """Exactly `count` varints filling all of `data`, each at most `max_bytes_each` long (int64)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if buf.size:
            raise bad_payload(f"{what}: {buf.size} bytes for zero values")
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count:
        raise bad_payload(f"{what}: holds {ends.size} varints, expected {count}")
    if ends[-1] != buf.size - 1:
        raise bad_payload(f"{what}: last varint is unterminated")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    sizes = ends - starts + 1
    longest = int(sizes.max())
    if longest > max_bytes_each:
        raise bad_payload(f"{what}: a varint of {longest} bytes, at most {max_bytes_each} allowed")
    result = (buf[starts] & 0x7F).astype(np.int64)
    for j in range(1, longest):
        has = sizes > j
        result[has] |= (buf[starts[has] + j] & 0x7F).astype(np.int64) << (7 * j)
    return result
