"""The versioned binary envelope every fedboard message travels in.

One fixed-size header, three short identifiers, an optional small JSON metadata block and the
payload, guarded by a CRC-32. Parsing is strict: every length is checked against the bytes
that are actually there and against size limits BEFORE anything is allocated or decoded, so a
truncated, padded, corrupted or oversized message is a typed `EnvelopeError`, never a crash.

Layout (little-endian):
    magic      4s   b"FBD1"
    version    u8   ENVELOPE_VERSION
    kind       u8   Kind
    flags      u16  reserved, must be 0
    round      u32
    base_ver   u32  global model version the update was trained from (or the model version)
    examples   u32  example count (weight of an update)
    meta_len   u32  length of the JSON metadata block
    payload_len u32
    crc32      u32  over the header (crc field zeroed), identifiers, metadata and payload
    fleet_len  u8, device_len u8, codec_len u8, reserved u8
    fleet, device, codec   ASCII
    meta       UTF-8 JSON object (may be empty)
    payload
"""
from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import EnvelopeError, Reason
from protocol.topics import ID_PATTERN

MAGIC = b"FBD1"
ENVELOPE_VERSION = 1
_FIXED = struct.Struct("<4sBBHIIIIII4B")
HEADER_SIZE = _FIXED.size
_CRC_OFFSET = 4 + 1 + 1 + 2 + 4 * 5
MAX_META_BYTES = 16 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
_U32_MAX = 2**32 - 1


class Kind(enum.IntEnum):
    """What a message is; the receiver refuses a kind it did not expect on a topic."""

    MODEL = 1
    BUNDLE = 2
    PLAN = 3
    CHECKIN = 4
    ASSIGN = 5
    UPDATE = 6
    ACK = 7
    STATUS = 8
    INFERENCE_MODEL = 9
    METRICS = 10
    SECAGG = 11  # one secure-aggregation message (protocol/secagg) in the payload


@dataclass(frozen=True)
class Envelope:
    """A decoded message: header fields, metadata and the raw payload bytes."""

    kind: Kind
    fleet: str
    device: str = ""
    round: int = 0
    base_version: int = 0
    example_count: int = 0
    codec: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def encode(self) -> bytes:
        """Serialize; raises EnvelopeError on a field that does not fit the format."""
        fleet = _ident("fleet", self.fleet, required=True)
        device = _ident("device", self.device, required=False)
        codec = _ascii("codec", self.codec)
        for name in ("round", "base_version", "example_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
                raise EnvelopeError(Reason.BAD_FIELD, f"{name}={value!r} must be an int in 0..2^32-1")
        meta = json.dumps(self.meta, separators=(",", ":"), sort_keys=True).encode() if self.meta else b""
        if len(meta) > MAX_META_BYTES:
            raise EnvelopeError(Reason.TOO_LARGE, f"metadata is {len(meta)} bytes, limit {MAX_META_BYTES}")
        payload = bytes(self.payload) if not isinstance(self.payload, bytes) else self.payload
        header = _FIXED.pack(
            MAGIC, ENVELOPE_VERSION, int(Kind(self.kind)), 0, self.round, self.base_version,
            self.example_count, len(meta), len(payload), 0, len(fleet), len(device), len(codec), 0,
        )
        body = fleet + device + codec + meta
        crc = zlib.crc32(payload, zlib.crc32(body, zlib.crc32(header)))
        header = header[:_CRC_OFFSET] + struct.pack("<I", crc) + header[_CRC_OFFSET + 4:]
        return b"".join((header, body, payload))


def decode_envelope(
    data: bytes | bytearray | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    expect: Kind | tuple[Kind, ...] | None = None,
) -> Envelope:
    """Parse and verify one envelope; every failure is an EnvelopeError with a reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(Reason.BAD_FIELD, f"envelope must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        raise EnvelopeError(Reason.TRUNCATED, f"{len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, kind, flags, rnd, base, examples, meta_len, payload_len, crc,
     fleet_len, device_len, codec_len, reserved) = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise EnvelopeError(Reason.BAD_MAGIC, f"magic {bytes(magic)!r} is not {MAGIC!r}: not a fedboard message")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(Reason.BAD_VERSION, f"envelope version {version}, this build reads {ENVELOPE_VERSION}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise EnvelopeError(Reason.BAD_KIND, f"unknown message kind {kind}") from None
    if expect is not None:
        allowed = (expect,) if isinstance(expect, Kind) else expect
        if kind not in allowed:
            names = ", ".join(k.name for k in allowed)
            raise EnvelopeError(Reason.BAD_KIND, f"got a {kind.name} message where {names} was expected")
    if flags or reserved:
        raise EnvelopeError(Reason.BAD_FIELD, "reserved header bits are set")
    if meta_len > MAX_META_BYTES:
        raise EnvelopeError(Reason.TOO_LARGE, f"metadata of {meta_len} bytes exceeds {MAX_META_BYTES}")
    if payload_len > max_payload:
        raise EnvelopeError(Reason.TOO_LARGE, f"payload of {payload_len} bytes exceeds the limit of {max_payload}")
    expected = HEADER_SIZE + fleet_len + device_len + codec_len + meta_len + payload_len
    if len(view) < expected:
        raise EnvelopeError(Reason.TRUNCATED, f"message has {len(view)} bytes, header announces {expected}")
    if len(view) > expected:
        raise EnvelopeError(Reason.BAD_FIELD, f"{len(view) - expected} unexpected bytes after the payload")
    header = bytearray(view[:HEADER_SIZE])
    header[_CRC_OFFSET:_CRC_OFFSET + 4] = b"\0\0\0\0"
    actual = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(header))
    if actual != crc:
        raise EnvelopeError(Reason.BAD_CHECKSUM, f"crc32 {actual:08x} does not match header {crc:08x}: corrupted")
    pos = HEADER_SIZE
    fleet, pos = _read_text(view, pos, fleet_len, "fleet")
    device, pos = _read_text(view, pos, device_len, "device")
    codec, pos = _read_text(view, pos, codec_len, "codec")
    _ident("fleet", fleet, required=True)
    _ident("device", device, required=False)
    meta: dict[str, Any] = {}
    if meta_len:
        try:
            meta = json.loads(bytes(view[pos:pos + meta_len]).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, 4,300+ digit ints, deep nesting
            raise EnvelopeError(Reason.BAD_FIELD, f"metadata is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(meta, dict):
            raise EnvelopeError(Reason.BAD_FIELD, "metadata must be a JSON object")
    pos += meta_len
    return Envelope(kind, fleet, device, rnd, base, examples, codec, meta, bytes(view[pos:pos + payload_len]))


def _ident(name: str, value: str, *, required: bool) -> bytes:
    if not value and not required:
        return b""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise EnvelopeError(Reason.BAD_FIELD, f"{name} {value!r} is not a valid id (1-64 of A-Z a-z 0-9 _ . -)")
    return value.encode("ascii")


def _ascii(name: str, value: str) -> bytes:
    try:
        raw = value.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise EnvelopeError(Reason.BAD_FIELD, f"{name} {value!r} must be ASCII text") from None
    if len(raw) > 255:
        raise EnvelopeError(Reason.TOO_LARGE, f"{name} is {len(raw)} bytes, limit 255")
    return raw


def _read_text(view: memoryview, pos: int, length: int, name: str) -> tuple[str, int]:
    try:
        text = bytes(view[pos:pos + length]).decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(Reason.BAD_FIELD, f"{name} is not ASCII") from None
    return text, pos + length
