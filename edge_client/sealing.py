"""Encryption at rest for what a device keeps: typed text, the residual, the outbox.

AES-256-GCM (`cryptography`) per record: every row of the text store and every file of the
residual and the outbox is sealed on its own, with associated data that names what it is and
where it belongs (purpose + row id or file name), so a sealed row moved to another row, or a
residual renamed into the outbox, fails authentication instead of being read as something else.

Sealed record: magic b"FBE1", key id (8 bytes), nonce (12 random bytes), ciphertext + 16-byte tag.
The key id is an HMAC of the key, never the key: it lets a reader say "sealed with another key"
(a wrong key, a rotation half done) instead of "corrupt", and pick the right key while a
rotation is staged. Random 96-bit nonces are safe far beyond what a device writes per key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
MAGIC = b"FBE1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES


class StoreKeyError(ValueError):
    """The store key is missing, malformed, or not the key the data was sealed with."""


class SealedDataCorrupt(ValueError):
    """A sealed record that does not authenticate: torn, bit-rotted, moved or forged."""


@dataclass(frozen=True)
class StoreKey:
    """One 256-bit device key (`material` never printed)."""

    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES:
            raise StoreKeyError(f"a store key is {KEY_BYTES} bytes, got {len(self.material)}")

    @classmethod
    def generate(cls) -> StoreKey:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def parse(cls, raw: bytes, source: str) -> StoreKey:
        """A key file's content: 64 hex digits (whitespace around is ignored) or 32 raw bytes."""
        text = raw.strip()
        if len(text) == 2 * KEY_BYTES:
            try:
                return cls(bytes.fromhex(text.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                pass
        if len(raw) == KEY_BYTES:
            return cls(bytes(raw))
        raise StoreKeyError(f"{source}: not a store key (expected {2 * KEY_BYTES} hex digits or {KEY_BYTES} "
                            f"raw bytes, got {len(raw)} bytes); make one with `openssl rand -hex 32`")

    def encode(self) -> bytes:
        return self.material.hex().encode("ascii") + b"\n"

    @property
    def key_id(self) -> bytes:
        return hmac.new(self.material, b"fedboard store key id", hashlib.sha256).digest()[:KEY_ID_BYTES]


def is_sealed(blob: bytes) -> bool:
    return len(blob) >= HEADER_BYTES + TAG_BYTES and blob[:len(MAGIC)] == MAGIC


def sealed_key_id(blob: bytes) -> bytes | None:
    """The key id a sealed record names, None if it is not sealed."""
    return bytes(blob[len(MAGIC):len(MAGIC) + KEY_ID_BYTES]) if is_sealed(blob) else None


class Keyring:
    """The key new records are sealed with, plus keys still accepted for reading.

    Reading accepts `current` and the `readable` extras: while a rotation is staged both the old
    and the new key are present, so every record stays readable whichever one sealed it.
    """

    def __init__(self, current: StoreKey, readable: tuple[StoreKey, ...] = ()) -> None:
        self.current = current
        self.keys = tuple({key.key_id: key for key in (*readable, current)}.values())
        self._keys = {key.key_id: AESGCM(key.material) for key in self.keys}

    @property
    def key_ids(self) -> frozenset[bytes]:
        return frozenset(self._keys)

    def has(self, key_id: bytes) -> bool:
        return key_id in self._keys

    def seal(self, plaintext: bytes, aad: bytes, key_id: bytes | None = None) -> bytes:
        """Seal with `key_id` (one of the ring's keys), by default the current key."""
        key_id = self.current.key_id if key_id is None else key_id
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + key_id + nonce + self._keys[key_id].encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        """The plaintext of a sealed record; StoreKeyError if another key sealed it,
        SealedDataCorrupt if it does not authenticate (`what` names it in both)."""
        if not is_sealed(blob):
            raise SealedDataCorrupt(f"{what}: not a sealed record")
        key_id = bytes(blob[len(MAGIC):len(MAGIC) + KEY_ID_BYTES])
        aead = self._keys.get(key_id)
        if aead is None:
            raise StoreKeyError(f"{what} is sealed with another key (key id {key_id.hex()}, the store key given "
                                f"has id {self.current.key_id.hex()}): wrong store key; nothing was changed")
        nonce = bytes(blob[len(MAGIC) + KEY_ID_BYTES:HEADER_BYTES])
        try:
            return aead.decrypt(nonce, bytes(blob[HEADER_BYTES:]), aad)
        except InvalidTag:
            raise SealedDataCorrupt(f"{what}: does not authenticate (torn, corrupted or moved)") from None
