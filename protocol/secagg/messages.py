"""The messages of the four phases of secure aggregation, with a strict binary form.

    phase 0  device -> server   AdvertiseKeys    c_pk, s_pk (and an optional signature)
             server -> all      KeyRoster        the round's parameters and every advertised key
    phase 1  device -> server   ShareKeys        one AES-GCM ciphertext of shares per peer
             server -> device   ShareBundle      the ciphertexts addressed to that device
    phase 2  device -> server   MaskedInput      the masked update, uint values mod 2^bits
             server -> all      UnmaskRequest    which devices' masked inputs arrived
    phase 3  device -> server   UnmaskResponse   self-mask shares of survivors, key shares of the dropped

Layout (little-endian): magic ``FSA1``, version u8, type u8, round u32, then the body of the
type. Strings are u8 length + ASCII device id (the topic id rule); byte strings are u16
length + bytes; lists are u16 count + items; the masked vector is u8 bits, u32 count, then
1, 2 or 4 bytes per value. Parsing checks every length against the bytes present before
reading, refuses trailing bytes, duplicate or unsorted ids, and values >= 2^bits; any
failure is a `SecAggFormatError` and nothing else. These bytes travel as the payload of a
transport envelope (see aggregator/PRIVACY.md, "Carrying secure aggregation over MQTT").
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from protocol.errors import Reason
from protocol.secagg.errors import format_error
from protocol.secagg.keys import KEY_BYTES, SIGNATURE_BYTES
from protocol.secagg.params import PACKED_BYTES, SecAggParams
from protocol.topics import ID_PATTERN

MAGIC = b"FSA1"
VERSION = 1
_HEADER = struct.Struct("<4sBBI")
HEADER_BYTES = _HEADER.size
MAX_BLOB_BYTES = 4096
MAX_ENTRIES = 0xFFFF


class MessageType(enum.IntEnum):
    ADVERTISE_KEYS = 1
    KEY_ROSTER = 2
    SHARE_KEYS = 3
    SHARE_BUNDLE = 4
    MASKED_INPUT = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7


# -- writing -----------------------------------------------------------------------------------
class _Writer:
    def __init__(self, kind: MessageType | None, round_id: int = 0) -> None:
        self.parts: list[bytes] = []
        if kind is None:  # a bare body (the plaintext inside a share ciphertext)
            return
        if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id < 2**32:
            raise format_error(Reason.BAD_FIELD, f"round id {round_id!r} must be an int in 0..2^32-1")
        self.parts.append(_HEADER.pack(MAGIC, VERSION, int(kind), round_id))

    def ident(self, value: str) -> None:
        if not isinstance(value, str) or not ID_PATTERN.match(value):
            raise format_error(Reason.BAD_FIELD, f"device id {value!r} is not 1-64 of A-Z a-z 0-9 _ . -")
        raw = value.encode("ascii")
        self.parts.append(bytes((len(raw),)) + raw)

    def fixed(self, value: bytes, size: int, what: str) -> None:
        if not isinstance(value, (bytes, bytearray)) or len(value) != size:
            raise format_error(Reason.BAD_FIELD, f"{what} must be {size} bytes")
        self.parts.append(bytes(value))

    def blob(self, value: bytes, what: str) -> None:
        if not isinstance(value, (bytes, bytearray)) or len(value) > MAX_BLOB_BYTES:
            raise format_error(Reason.TOO_LARGE, f"{what} must be bytes of at most {MAX_BLOB_BYTES}")
        self.parts.append(struct.pack("<H", len(value)) + bytes(value))

    def count(self, n: int, what: str) -> None:
        if n > MAX_ENTRIES:
            raise format_error(Reason.TOO_LARGE, f"{n} {what} are more than {MAX_ENTRIES}")
        self.parts.append(struct.pack("<H", n))

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


# -- reading -----------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise format_error(Reason.BAD_FIELD,
                               f"a secure aggregation message must be bytes, got {type(data).__name__}")
        self.view = memoryview(data).cast("B")
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        left = len(self.view) - self.pos
        if n > left:
            raise format_error(Reason.TRUNCATED, f"message ends inside {what}: needs {n} bytes, {left} left")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def ident(self, what: str) -> str:
        n = self.u8(what)
        raw = bytes(self.take(n, what))
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise format_error(Reason.BAD_FIELD, f"{what} is not ASCII") from None
        if not ID_PATTERN.match(text):
            raise format_error(Reason.BAD_FIELD, f"{what} {text!r} is not a valid device id")
        return text

    def blob(self, what: str) -> bytes:
        n = self.u16(what)
        if n > MAX_BLOB_BYTES:
            raise format_error(Reason.TOO_LARGE, f"{what} of {n} bytes exceeds {MAX_BLOB_BYTES}")
        return bytes(self.take(n, what))

    def end(self) -> None:
        left = len(self.view) - self.pos
        if left:
            raise format_error(Reason.BAD_FIELD, f"{left} unexpected bytes after the message")


def _ids_in_order(ids: list[str], what: str) -> None:
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise format_error(Reason.BAD_FIELD, f"{what} must be sorted and unique")


def _header(reader: _Reader) -> tuple[MessageType, int]:
    magic, version, kind, round_id = _HEADER.unpack(reader.take(HEADER_BYTES, "the header"))
    if magic != MAGIC:
        raise format_error(Reason.BAD_MAGIC,
                           f"magic {bytes(magic)!r} is not {MAGIC!r}: not a secure aggregation message")
    if version != VERSION:
        raise format_error(Reason.BAD_VERSION,
                           f"secure aggregation message version {version}, this build reads {VERSION}")
    try:
        return MessageType(kind), round_id
    except ValueError:
        raise format_error(Reason.BAD_KIND, f"unknown secure aggregation message type {kind}") from None


def _open(data: bytes, expected: MessageType) -> tuple[_Reader, int]:
    reader = _Reader(data)
    kind, round_id = _header(reader)
    if kind != expected:
        raise format_error(Reason.BAD_KIND, f"got a {kind.name} message where {expected.name} was expected")
    return reader, round_id


def _write_map(w: _Writer, entries: Mapping[str, bytes], what: str) -> None:
    ids = sorted(entries)
    w.count(len(ids), what)
    for device in ids:
        w.ident(device)
        w.blob(entries[device], what)


def _read_map(r: _Reader, what: str) -> dict[str, bytes]:
    n = r.u16(f"the number of {what}")
    out: dict[str, bytes] = {}
    for _ in range(n):
        device = r.ident(f"a device id in {what}")
        out[device] = r.blob(what)
    if len(out) != n:
        raise format_error(Reason.BAD_FIELD, f"{what} name a device twice")
    _ids_in_order(list(out), what)
    return out


# -- phase 0 -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertiseKeys:
    """A device's two fresh public keys for this round (and its signature over them, if any)."""

    round_id: int
    device: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""

    def _write_body(self, w: _Writer) -> None:
        w.ident(self.device)
        w.fixed(self.c_pk, KEY_BYTES, "c_pk")
        w.fixed(self.s_pk, KEY_BYTES, "s_pk")
        if len(self.signature) not in (0, SIGNATURE_BYTES):
            raise format_error(Reason.BAD_FIELD, f"signature must be empty or {SIGNATURE_BYTES} bytes")
        w.raw(bytes((len(self.signature),)) + bytes(self.signature))

    @classmethod
    def _read_body(cls, r: _Reader, round_id: int) -> AdvertiseKeys:
        device = r.ident("the device id")
        c_pk = bytes(r.take(KEY_BYTES, "c_pk"))
        s_pk = bytes(r.take(KEY_BYTES, "s_pk"))
        n = r.u8("the signature length")
        if n not in (0, SIGNATURE_BYTES):
            raise format_error(Reason.BAD_FIELD, f"signature length {n} is neither 0 nor {SIGNATURE_BYTES}")
        return cls(round_id, device, c_pk, s_pk, bytes(r.take(n, "the signature")))

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.ADVERTISE_KEYS, self.round_id)
        self._write_body(w)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r, round_id = _open(data, MessageType.ADVERTISE_KEYS)
        msg = cls._read_body(r, round_id)
        r.end()
        return msg


@dataclass(frozen=True)
class KeyRoster:
    """The server's list of every device that advertised keys (U1), sorted by id, and the params."""

    params: SecAggParams
    keys: tuple[AdvertiseKeys, ...]

    @property
    def round_id(self) -> int:
        return self.params.round_id

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(k.device for k in self.keys)

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.KEY_ROSTER, self.params.round_id)
        w.raw(self.params.to_bytes())
        keys = sorted(self.keys, key=lambda k: k.device)
        w.count(len(keys), "roster entries")
        for k in keys:
            if k.round_id != self.params.round_id:
                raise format_error(Reason.WRONG_ROUND, f"keys of {k.device!r} are for round {k.round_id}")
            k._write_body(w)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRoster:
        r, round_id = _open(data, MessageType.KEY_ROSTER)
        params = SecAggParams.from_bytes(bytes(r.take(PACKED_BYTES, "the parameters")))
        if params.round_id != round_id:
            raise format_error(Reason.WRONG_ROUND, "roster parameters disagree with the header's round")
        n = r.u16("the number of roster entries")
        keys = tuple(AdvertiseKeys._read_body(r, round_id) for _ in range(n))
        r.end()
        _ids_in_order([k.device for k in keys], "roster entries")
        return cls(params, keys)


# -- phase 1 -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShareKeys:
    """One ciphertext of (s_sk share, b share) per peer, keyed by recipient."""

    round_id: int
    sender: str
    ciphertexts: Mapping[str, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.SHARE_KEYS, self.round_id)
        w.ident(self.sender)
        _write_map(w, self.ciphertexts, "share ciphertexts")
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        r, round_id = _open(data, MessageType.SHARE_KEYS)
        sender = r.ident("the sender id")
        cts = _read_map(r, "share ciphertexts")
        r.end()
        return cls(round_id, sender, cts)


@dataclass(frozen=True)
class ShareBundle:
    """The ciphertexts addressed to one device, keyed by sender (the senders are U2 minus it)."""

    round_id: int
    recipient: str
    ciphertexts: Mapping[str, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.SHARE_BUNDLE, self.round_id)
        w.ident(self.recipient)
        _write_map(w, self.ciphertexts, "share ciphertexts")
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        r, round_id = _open(data, MessageType.SHARE_BUNDLE)
        recipient = r.ident("the recipient id")
        cts = _read_map(r, "share ciphertexts")
        r.end()
        return cls(round_id, recipient, cts)


def encode_share_plaintext(sender: str, recipient: str, key_share: bytes, mask_share: bytes) -> bytes:
    """What one share ciphertext holds: both ids (checked on opening) and the two shares."""
    w = _Writer(None)
    w.ident(sender)
    w.ident(recipient)
    w.blob(key_share, "the key share")
    w.blob(mask_share, "the self-mask share")
    return w.getvalue()


def decode_share_plaintext(data: bytes) -> tuple[str, str, bytes, bytes]:
    r = _Reader(data)
    out = (r.ident("the share sender"), r.ident("the share recipient"), r.blob("the key share"),
           r.blob("the self-mask share"))
    r.end()
    return out


# -- phase 2 -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MaskedInput:
    """The masked update: ``bits``-bit ring elements, 1, 2 or 4 bytes each on the wire."""

    round_id: int
    device: str
    bits: int
    values: np.ndarray

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.MASKED_INPUT, self.round_id)
        w.ident(self.device)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 32:
            raise format_error(Reason.BAD_FIELD, f"bits must be in 2..32, got {self.bits!r}")
        v = np.asarray(self.values)
        if v.ndim != 1 or v.dtype.kind not in "iu" or v.size >= 2**32:
            raise format_error(Reason.BAD_FIELD, f"masked values must be a 1-D integer array, got {v.dtype}{v.shape}")
        if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << self.bits):
            raise format_error(Reason.BAD_FIELD, f"masked values must lie in [0, 2^{self.bits})")
        w.raw(struct.pack("<BI", self.bits, v.size))
        w.raw(v.astype(_wire_dtype(self.bits)).tobytes())
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_dim: int | None = None) -> MaskedInput:
        r, round_id = _open(data, MessageType.MASKED_INPUT)
        device = r.ident("the device id")
        bits = r.u8("the bit width")
        if not 2 <= bits <= 32:
            raise format_error(Reason.BAD_FIELD, f"bits {bits} outside 2..32")
        count = r.u32("the value count")
        if expect_dim is not None and count != expect_dim:
            raise format_error(Reason.WRONG_SIZE, f"masked input has {count} values, the round has {expect_dim}")
        dtype = _wire_dtype(bits)
        raw = r.take(count * dtype.itemsize, "the masked values")
        r.end()
        values = np.frombuffer(raw, dtype=dtype).astype(np.uint32)
        if bits < 32 and values.size and int(values.max()) >> bits:
            raise format_error(Reason.BAD_FIELD, f"a masked value is not below 2^{bits}")
        return cls(round_id, device, bits, values)


def _wire_dtype(bits: int) -> np.dtype:
    return np.dtype("u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")


# -- phase 3 -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnmaskRequest:
    """Which devices' masked inputs the server received (U3), sorted."""

    round_id: int
    survivors: tuple[str, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.UNMASK_REQUEST, self.round_id)
        ids = sorted(self.survivors)
        w.count(len(ids), "survivors")
        for device in ids:
            w.ident(device)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r, round_id = _open(data, MessageType.UNMASK_REQUEST)
        n = r.u16("the number of survivors")
        ids = [r.ident("a survivor id") for _ in range(n)]
        r.end()
        _ids_in_order(ids, "survivors")
        return cls(round_id, tuple(ids))


@dataclass(frozen=True)
class UnmaskResponse:
    """Shares (``Share.to_bytes``) of the survivors' self-mask seeds and of the dropped devices' s_sk."""

    round_id: int
    device: str
    mask_shares: Mapping[str, bytes] = field(default_factory=dict)
    key_shares: Mapping[str, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        w = _Writer(MessageType.UNMASK_RESPONSE, self.round_id)
        w.ident(self.device)
        _write_map(w, self.mask_shares, "self-mask shares")
        _write_map(w, self.key_shares, "key shares")
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r, round_id = _open(data, MessageType.UNMASK_RESPONSE)
        device = r.ident("the device id")
        mask_shares = _read_map(r, "self-mask shares")
        key_shares = _read_map(r, "key shares")
        r.end()
        return cls(round_id, device, mask_shares, key_shares)


Message = Union[AdvertiseKeys, KeyRoster, ShareKeys, ShareBundle, MaskedInput, UnmaskRequest, UnmaskResponse]
_CLASSES: dict[MessageType, type] = {
    MessageType.ADVERTISE_KEYS: AdvertiseKeys, MessageType.KEY_ROSTER: KeyRoster,
    MessageType.SHARE_KEYS: ShareKeys, MessageType.SHARE_BUNDLE: ShareBundle,
    MessageType.MASKED_INPUT: MaskedInput, MessageType.UNMASK_REQUEST: UnmaskRequest,
    MessageType.UNMASK_RESPONSE: UnmaskResponse,
}


def message_type(data: bytes) -> MessageType:
    """The type named in a message's header (checks magic and version only)."""
    return _header(_Reader(data))[0]


def decode_message(data: bytes) -> Message:
    """Parse any secure aggregation message by the type in its header."""
    return _CLASSES[message_type(data)].from_bytes(data)
