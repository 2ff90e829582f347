"""`Codec`: the composition of parsed stages, with encode, decode and decode-into-a-sum.

Payload layout (before the optional zstd stage, which wraps all of it):

    version (1 byte, = 1) | n (varint) | transform sections | index section | value section

Decoding reads every section and checks that nothing is left over BEFORE it returns or
touches the caller's accumulator, so `decode_accumulate` is all-or-nothing: a payload that
raises has not changed `out`.

Error feedback: for `A|ef|B`, the encoder computes c = A(x) + residual, encodes c through B,
decodes those bytes again with B (the very code the server runs) and returns the new residual
c - decode(B(c)). Whatever B drops this round is therefore sent in later rounds.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from protocol.codec.container import MAX_ABS_VALUE, ByteReader, ByteWriter, bad_payload
from protocol.codec.floats import Float32Coder
from protocol.codec.sparsify import DenseLayout
from protocol.codec.spec import parse_stages
from protocol.codec.stages import ByteCoder, Layout, Transform, ValueCoder
from protocol.codec.transforms import ErrorFeedback
from protocol.errors import CodecError, Reason


FORMAT_VERSION = 1
MAX_WEIGHT = 2.0**64
_HEADER_MAX = 1 + 10


@dataclass
class EncodeResult:
    """The bytes to send, and the residual to keep on the device (None without `ef`)."""

    payload: bytes
    residual: np.ndarray | None


def bits_per_parameter(nbytes: int, n: int) -> float:
    """Payload bits per model parameter (32 for raw float32)."""
    return 8.0 * nbytes / n if n else 0.0


def check_vector(vec: np.ndarray, what: str = "update") -> np.ndarray:
    """`vec` as a 1-D float32 array with finite values of magnitude <= MAX_ABS_VALUE."""
    arr = np.asarray(vec)
    if arr.ndim != 1:
        raise CodecError(Reason.BAD_FIELD, f"{what} must be a 1-D vector, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CodecError(Reason.BAD_FIELD, f"{what} must hold real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size:
        # max |x| without an |x| temporary (a vector-sized copy); NaN propagates through both
        peak = max(-float(arr.min()), float(arr.max()))
        if not peak <= MAX_ABS_VALUE:  # also catches NaN
            raise CodecError(Reason.NOT_FINITE, f"{what} holds NaN, infinity or a value beyond "
                                                f"{MAX_ABS_VALUE:g} (max |x| = {peak}); refusing to encode it")
    return arr


class Codec:
    """An update codec built from a spec; immutable and safe to share between threads."""

    def __init__(self, transforms: list[Transform], layout: Layout | None, values: ValueCoder | None,
                 byte_coder: ByteCoder | None) -> None:
        self._transforms = tuple(transforms)
        self._layout = layout if layout is not None else DenseLayout()
        self._values = values if values is not None else Float32Coder()
        self._bytes = byte_coder
        parts = [t.spec for t in self._transforms] + [self._layout.spec, self._values.spec]
        parts += [self._bytes.spec] if self._bytes else []
        self._spec = "|".join(p for p in parts if p)

    # --- description ------------------------------------------------------------------

    @property
    def spec(self) -> str:
        """Canonical spec: parse_codec(c.spec).spec == c.spec."""
        return self._spec

    @property
    def uses_error_feedback(self) -> bool:
        return any(isinstance(t, ErrorFeedback) for t in self._transforms)

    @property
    def is_lossless(self) -> bool:
        """decode(encode(x).payload) == x bit for bit (with no residual carried in)."""
        return all(t.lossless for t in self._transforms) and self._layout.lossless and self._values.lossless

    def bits_per_parameter(self, payload_len: int, n: int) -> float:
        return bits_per_parameter(payload_len, n)

    def max_payload_body(self, n: int) -> int:
        """Upper bound on the payload size before zstd, for a vector of n values."""
        return (_HEADER_MAX + sum(t.max_section_bytes() for t in self._transforms)
                + self._layout.max_section_bytes(n) + self._values.max_section_bytes(self._layout.count(n)))

    def __repr__(self) -> str:
        return f"Codec({self._spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other._spec == self._spec

    def __hash__(self) -> int:
        return zlib.crc32(self._spec.encode())

    # --- encoding ---------------------------------------------------------------------

    def encode(self, vec: np.ndarray, *, residual: np.ndarray | None = None,
               rng: np.random.Generator | None = None) -> EncodeResult:
        """Encode one update; with `ef`, add `residual` first and return the new one."""
        x = check_vector(vec)
        if residual is not None:
            if not self.uses_error_feedback:
                raise CodecError(Reason.BAD_FIELD, f"a residual was given but codec {self._spec!r} has no 'ef'")
            residual = check_vector(residual, "residual")
            if residual.size != x.size:
                raise CodecError(Reason.WRONG_SIZE, f"residual has {residual.size} values, update has {x.size}")
        rng = rng if rng is not None else np.random.default_rng()
        out = ByteWriter()
        out.u8(FORMAT_VERSION)
        out.varint(x.size)
        new_residual = self._encode_from(0, x, residual, out, rng)
        payload = out.getvalue()
        if self._bytes is not None:
            payload = self._bytes.encode(payload)
        return EncodeResult(payload, new_residual)

    def _encode_from(self, start: int, vec: np.ndarray, residual: np.ndarray | None, out: ByteWriter,
                     rng: np.random.Generator) -> np.ndarray | None:
        for i in range(start, len(self._transforms)):
            stage = self._transforms[i]
            if isinstance(stage, ErrorFeedback):
                corrected = vec if residual is None else check_vector(vec + residual, "update + residual")
                rest = ByteWriter()
                self._encode_from(i + 1, corrected, None, rest, rng)
                body = rest.getvalue()
                reader = ByteReader(body)
                indices, values = self._decode_from(i + 1, reader, corrected.size, 1.0)
                reader.finish()
                # vec + residual is a fresh array: it becomes the new residual in place
                new_residual = corrected if residual is not None else corrected.copy()
                if indices is None:
                    new_residual -= values
                else:
                    new_residual[indices] -= values
                out.write(body)
                return new_residual
            vec = stage.encode(vec, out)
        values = self._layout.encode(vec, out, rng)
        self._values.encode(np.ascontiguousarray(values, dtype=np.float32), out, rng)
        return None

    # --- decoding ---------------------------------------------------------------------

    def _open(self, payload: bytes, expected_size: int) -> ByteReader:
        if not isinstance(expected_size, (int, np.integer)) or expected_size < 0:
            raise ValueError(f"expected_size must be an int >= 0, got {expected_size!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(Reason.BAD_PAYLOAD, f"payload must be bytes, got {type(payload).__name__}")
        if self._bytes is not None:
            payload = self._bytes.decode(bytes(payload), self.max_payload_body(int(expected_size)))
        reader = ByteReader(payload)
        version = reader.u8("format version")
        if version != FORMAT_VERSION:
            raise bad_payload(f"payload format version {version}, this decoder reads {FORMAT_VERSION}")
        n = reader.varint("vector length", max_value=1 << 40)
        if n != expected_size:
            raise CodecError(Reason.WRONG_SIZE, f"payload holds {n} values, expected {expected_size}")
        return reader

    def _decode_from(self, start: int, reader: ByteReader, n: int,
                     scale: float) -> tuple[np.ndarray | None, np.ndarray]:
        for stage in self._transforms[start:]:
            stage.read(reader)
        indices, factor = self._layout.decode(reader, n)
        count = n if indices is None else indices.size
        values = self._values.decode(reader, count, scale * factor)
        return indices, values

    def decode(self, payload: bytes, expected_size: int) -> np.ndarray:
        """The float32 vector of exactly `expected_size` values, or CodecError."""
        reader = self._open(payload, expected_size)
        indices, values = self._decode_from(0, reader, expected_size, 1.0)
        reader.finish()
        if indices is None:
            return np.array(values, dtype=np.float32, copy=True) if not values.flags.writeable else values
        dense = np.zeros(expected_size, dtype=np.float32)
        dense[indices] = values
        return dense

    def decode_accumulate(self, payload: bytes, out: np.ndarray, weight: float = 1.0) -> None:
        """out += weight * decode(payload, out.size), in place; `out` is untouched on error."""
        if not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype not in (np.float32, np.float64):
            raise TypeError("out must be a 1-D float32 or float64 numpy array")
        weight = float(weight)
        if not abs(weight) <= MAX_WEIGHT:
            raise ValueError(f"weight must be finite and at most {MAX_WEIGHT:g} in size, got {weight}")
        reader = self._open(payload, out.size)
        indices, values = self._decode_from(0, reader, out.size, weight)
        reader.finish()
        if indices is None:
            out += values
        else:
            out[indices] += values


def parse_codec(spec: str) -> Codec:
    """The codec a spec describes; CodecError(BAD_CODEC) saying what is wrong otherwise."""
    if not isinstance(spec, str):
        raise CodecError(Reason.BAD_CODEC, f"codec spec must be a string, got {type(spec).__name__}")
    return _parse_cached(spec)


@lru_cache(maxsize=128)
def _parse_cached(spec: str) -> Codec:
    # specs arrive in every message header: parse each distinct one once
    parsed = parse_stages(spec)
    return Codec(parsed.transforms, parsed.layout, parsed.values, parsed.byte_coder)
