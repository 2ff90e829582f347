"""Key agreement and share encryption: X25519 + HKDF-SHA256 + AES-256-GCM (cryptography).

Each device makes two fresh X25519 key pairs per round (Bonawitz et al. 2017, round 0):
``c`` to encrypt the Shamir shares it sends to each peer through the server, and ``s`` to
agree on the pairwise mask seeds. Fresh keys per round mean a key revealed to unmask one
round (a dropped device's ``s_sk``) is worthless for any other round.

Every derived key is bound to its purpose, the round and the two device ids (HKDF ``info``),
so a share or mask seed of one pair and round can never be taken for another's. The AES-GCM
associated data binds each share ciphertext to (round, sender, recipient): the server that
relays the ciphertexts can drop them but not redirect, replay across rounds or alter them.

Optional device signatures (Ed25519) over the advertised keys defend against a server that
substitutes its own keys (a man in the middle); without them the keys are bound to the
device id only by the broker's per-device topic ACL. See aggregator/PRIVACY.md.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import Reason
from protocol.secagg.errors import format_error, trust_error

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"fedboard.secagg.v1"
PURPOSE_ENCRYPT = b"share-encryption"
PURPOSE_MASK = b"pairwise-mask"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32 raw bytes that travel."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        private = X25519PrivateKey.generate()
        return cls(private, public_bytes(private))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild from the 32 raw private bytes (what the server reconstructs from shares)."""
        if len(raw) != KEY_BYTES:
            raise format_error(Reason.BAD_FIELD, f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
        private = X25519PrivateKey.from_private_bytes(bytes(raw))
        return cls(private, public_bytes(private))

    def private_bytes(self) -> bytes:
        return private_bytes(self.private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def _pair_info(purpose: bytes, round_id: int, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return b"/".join((_DOMAIN, purpose, str(round_id).encode(), low.encode("ascii"), high.encode("ascii")))


def agree(private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_id: int, a: str, b: str) -> bytes:
    """32 bytes both ends of the pair (a, b) derive: HKDF-SHA256(X25519(sk, peer_pk), info).

    Symmetric in (a, b). `SecAggTrustError` if the peer key is malformed or a low-order point
    (which would make the shared secret all zeros, known to everyone).
    """
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
        raise format_error(Reason.BAD_FIELD, f"an X25519 public key is {KEY_BYTES} bytes")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:
        raise trust_error(f"key agreement with the key of {b if a else a!r} failed ({exc}): "
                          "a low-order or invalid public key") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=_pair_info(purpose, round_id, a, b)).derive(shared)


def share_aad(round_id: int, sender: str, recipient: str) -> bytes:
    """The associated data that binds a share ciphertext to its round, sender and recipient."""
    return b"/".join((_DOMAIN, b"share", str(round_id).encode(), sender.encode("ascii"), recipient.encode("ascii")))


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce, then ciphertext and tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes, *, what: str) -> bytes:
    """Inverse of `encrypt`; `SecAggTrustError` if the ciphertext or its binding was altered."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise format_error(Reason.TRUNCATED, f"{what} is {len(blob)} bytes, shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), aad)
    except InvalidTag:
        raise trust_error(f"{what} does not authenticate: forged, corrupted, or meant for another "
                          "device or round") from None


# -- device signatures over the advertised keys -------------------------------------------------
def advertisement_bytes(round_id: int, device: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a device signs in round 0: domain, round, device id and both public keys."""
    dev = device.encode("ascii")
    return _DOMAIN + b"/advertise/" + struct.pack("<IB", round_id, len(dev)) + dev + bytes(c_pk) + bytes(s_pk)


def sign_advertisement(identity: Ed25519PrivateKey, round_id: int, device: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return identity.sign(advertisement_bytes(round_id, device, c_pk, s_pk))


def verify_advertisement(identity: Ed25519PublicKey, round_id: int, device: str, c_pk: bytes, s_pk: bytes,
                         signature: bytes) -> None:
    """Return if the signature holds; `SecAggTrustError` if not."""
    if len(signature) != SIGNATURE_BYTES:
        raise trust_error(f"the keys of {device!r} carry no valid signature ({len(signature)} bytes)")
    try:
        identity.verify(bytes(signature), advertisement_bytes(round_id, device, c_pk, s_pk))
    except InvalidSignature:
        raise trust_error(f"the signature over the keys of {device!r} does not verify: "
                          "substituted keys or a wrong identity key") from None
