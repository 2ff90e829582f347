"""Model signing: a device runs only models the fleet's aggregator signed.

The aggregator holds an Ed25519 private key; devices ship with its public key. Each global
model travels with a manifest (fleet, model id, version, sha256 and length of the weights
payload, codec) signed over its canonical JSON. `ModelTrust` on the device accepts a model
only if the signature holds, the payload matches the hash, it belongs to this fleet/model,
and its version is newer than the last one accepted, so a broker or a man in the middle can
neither forge a model nor replay an old one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import Reason, TrustError

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 64 * 1024
SIGNATURE_BYTES = 64
# Binary form of a SignedManifest: magic, format version, 64-byte signature, manifest JSON.
SIGNED_MAGIC = b"FBSM"
SIGNED_FORMAT = 1
_HEADER = len(SIGNED_MAGIC) + 1
# Signatures cover this prefix + the canonical JSON, so a signature made by the same key for
# anything else (another message kind, a future format) can never pass as a manifest's.
_DOMAIN = b"fedboard.model-manifest.v1\n"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")  # same rule as topic ids
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_MAX_EXTRA_DEPTH = 8


# -- keys --------------------------------------------------------------------------------------
def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def write_keypair(directory: Path, name: str = "aggregator", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (mode 0600) and `<name>.pub` into `directory`; returns both paths.

    Refuses to replace existing files unless `overwrite=True`: losing the aggregator's key
    means every device must be given a new public key.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace the key pair")
    private_pem, public_pem = generate_keypair()
    _write_file(private_path, private_pem, 0o600)
    _write_file(public_path, public_pem, 0o644)
    log.info("wrote key pair %s, %s (fingerprint %s)", private_path, public_path,
             key_fingerprint(load_public_key(public_path)))
    return private_path, public_path


def _write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key; ValueError saying what is wrong otherwise."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({exc}); "
                         f"create one with protocol.signing.write_keypair") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key; TrustError if the file is not one (e.g. the private key)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        hint = " (this looks like a PRIVATE key: give devices the .pub file)" if b"PRIVATE" in data else ""
        raise TrustError(Reason.BAD_SIGNATURE, f"{path} is not a PEM public key{hint}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(Reason.BAD_SIGNATURE, f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _read_key_file(path: Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} not found") from None
    if len(data) > 16 * 1024:
        raise ValueError(f"{path} is {len(data)} bytes: too large to be an Ed25519 PEM key")
    return data


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short hex id of a public key, for logs and for checking a device got the right one."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `data`."""
    return private_key.sign(bytes(data))


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Return if `signature` is `public_key`'s signature of `data`; TrustError(BAD_SIGNATURE) if not."""
    if not isinstance(signature, (bytes, bytearray, memoryview)) or len(signature) != SIGNATURE_BYTES:
        raise TrustError(Reason.BAD_SIGNATURE, f"signature must be {SIGNATURE_BYTES} bytes")
    try:
        public_key.verify(bytes(signature), bytes(data))
    except InvalidSignature:
        raise TrustError(Reason.BAD_SIGNATURE, "signature does not match the data and the fleet's public key") from None


# -- manifests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelManifest:
    """What a published global model claims to be; every field is covered by the signature.

    `base_version` is None for full weights and the version the delta applies to for a
    delta downlink. `extra` holds JSON-able metadata (e.g. round id, metrics).
    """

    fleet: str
    model_id: str
    version: int
    weights_sha256: str
    codec: str
    payload_len: int
    base_version: int | None = None
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> TrustError:
            return TrustError(Reason.BAD_FIELD, f"manifest.{name}: {why}")

        for name in ("fleet", "model_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ID.match(value):
                raise bad(name, f"{value!r} is not 1-64 of A-Z a-z 0-9 _ . - starting alphanumeric")
        if not _is_int(self.version) or self.version < 0:
            raise bad("version", f"must be an int >= 0, got {self.version!r}")
        if not isinstance(self.weights_sha256, str) or not _SHA256.match(self.weights_sha256):
            raise bad("weights_sha256", "must be 64 lower-case hex digits")
        if not isinstance(self.codec, str) or len(self.codec) > 1024 or not self.codec.isprintable():
            raise bad("codec", "must be a printable string of at most 1024 characters")
        if not _is_int(self.payload_len) or self.payload_len < 0:
            raise bad("payload_len", f"must be an int >= 0, got {self.payload_len!r}")
        if self.base_version is not None and (
            not _is_int(self.base_version) or not 0 <= self.base_version < self.version
        ):
            raise bad("base_version", f"must be None or an int in [0, version), got {self.base_version!r}")
        if isinstance(self.created_at, bool) or not isinstance(self.created_at, (int, float)) \
                or not _finite_number(self.created_at):
            raise bad("created_at", f"must be a finite number, got {_short_repr(self.created_at)}")
        object.__setattr__(self, "created_at", float(self.created_at))
        if not isinstance(self.extra, dict):
            raise bad("extra", f"must be an object, got {type(self.extra).__name__}")
        _check_json_value(self.extra, "extra", 0)

    def canonical_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (sorted keys, no spaces): what the signature covers."""
        return self.to_json().encode("utf-8")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> ModelManifest:
        """Strict parse: TrustError on bad JSON, missing/extra/wrong-typed fields, > 64 KB."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) > MAX_MANIFEST_BYTES:
                raise TrustError(Reason.TOO_LARGE, f"manifest is {len(data)} bytes, limit {MAX_MANIFEST_BYTES}")
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise TrustError(Reason.BAD_FIELD, "manifest is not UTF-8") from None
        elif isinstance(data, str):
            text = data
            if len(text) > MAX_MANIFEST_BYTES:
                raise TrustError(Reason.TOO_LARGE, f"manifest is {len(text)} characters, limit {MAX_MANIFEST_BYTES}")
        else:
            raise TrustError(Reason.BAD_FIELD, f"manifest must be str or bytes, got {type(data).__name__}")
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
            raise TrustError(Reason.BAD_FIELD, f"manifest is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise TrustError(Reason.BAD_FIELD, f"manifest must be a JSON object, got {type(obj).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, extra = sorted(set(names) - set(obj)), sorted(set(obj) - set(names))
        if missing or extra:
            raise TrustError(Reason.BAD_FIELD, f"manifest fields: missing {missing}, unknown {extra}")
        try:
            return cls(**obj)
        except RecursionError:
            raise TrustError(Reason.BAD_FIELD, "manifest.extra is nested too deeply") from None


def _finite_number(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer beyond float range
        return False


def _short_repr(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_json_value(value: Any, where: str, depth: int) -> None:
    if depth > _MAX_EXTRA_DEPTH:
        raise TrustError(Reason.BAD_FIELD, f"manifest.{where}: nested deeper than {_MAX_EXTRA_DEPTH}")
    if value is None or isinstance(value, (bool, str)) or _is_int(value):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TrustError(Reason.BAD_FIELD, f"manifest.{where}: {value} is not finite")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TrustError(Reason.BAD_FIELD, f"manifest.{where}: key {key!r} is not a string")
            _check_json_value(item, f"{where}.{key}", depth + 1)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]", depth + 1)
        return
    raise TrustError(Reason.BAD_FIELD, f"manifest.{where}: {type(value).__name__} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


@dataclass(frozen=True)
class SignedManifest:
    """A manifest and the aggregator's signature of it; travels as `to_bytes()`."""

    manifest: ModelManifest
    signature: bytes

    def to_bytes(self) -> bytes:
        if len(self.signature) != SIGNATURE_BYTES:
            raise TrustError(Reason.BAD_SIGNATURE, f"signature must be {SIGNATURE_BYTES} bytes to serialize")
        return SIGNED_MAGIC + bytes([SIGNED_FORMAT]) + bytes(self.signature) + self.manifest.canonical_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        """Parse (not verify) a signed manifest; TrustError and nothing else on bad input."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TrustError(Reason.BAD_FIELD, f"signed manifest must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > _HEADER + SIGNATURE_BYTES + MAX_MANIFEST_BYTES:
            raise TrustError(Reason.TOO_LARGE, f"signed manifest is {len(data)} bytes")
        if data[: len(SIGNED_MAGIC)] != SIGNED_MAGIC:
            raise TrustError(Reason.BAD_MAGIC, "not a signed manifest (unsigned model, or not a fedboard model)")
        if len(data) < _HEADER + SIGNATURE_BYTES:
            raise TrustError(Reason.TRUNCATED, f"signed manifest is only {len(data)} bytes")
        if data[len(SIGNED_MAGIC)] != SIGNED_FORMAT:
            raise TrustError(Reason.BAD_VERSION, f"signed manifest format {data[len(SIGNED_MAGIC)]}, "
                                                 f"this device reads {SIGNED_FORMAT}: update the client")
        signature = data[_HEADER: _HEADER + SIGNATURE_BYTES]
        return cls(ModelManifest.from_json(data[_HEADER + SIGNATURE_BYTES:]), signature)

    def verify(self, public_key: Ed25519PublicKey) -> ModelManifest:
        """The manifest if the signature is the fleet key's; TrustError(BAD_SIGNATURE) otherwise."""
        verify(public_key, _DOMAIN + self.manifest.canonical_bytes(), self.signature)
        return self.manifest


def sign_manifest(private_key: Ed25519PrivateKey, manifest: ModelManifest) -> SignedManifest:
    """What the aggregator does before publishing a model."""
    return SignedManifest(manifest, sign(private_key, _DOMAIN + manifest.canonical_bytes()))


def sha256_hex(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# -- the device side ---------------------------------------------------------------------------
class ModelTrust:
    """Decides whether the device may load a published model.

    Versions must increase across the whole fleet's model stream, also when the model id
    changes (otherwise an old model of another id could be replayed). The caller persists
    `last_version` (e.g. beside the weights) and passes it back at start-up.
    """

    def __init__(self, public_key: Ed25519PublicKey, fleet: str, model_id: str | None = None,
                 *, last_version: int | None = None) -> None:
        if not isinstance(public_key, Ed25519PublicKey):
            raise TypeError(f"public_key must be an Ed25519PublicKey, got {type(public_key).__name__}")
        if last_version is not None and (not _is_int(last_version) or last_version < 0):
            raise ValueError(f"last_version must be None or an int >= 0, got {last_version!r}")
        self.public_key = public_key
        self.fleet = fleet
        self.model_id = model_id
        self._last_version = last_version
        self._last_sha: str | None = None  # the same version may come again (a device that dropped its copy)
        self._lock = threading.Lock()

    @property
    def last_version(self) -> int | None:
        return self._last_version

    @property
    def oldest_acceptable(self) -> int | None:
        """The oldest version `accept` can still admit (None: any). A round planned on an older
        one is of no use to this device: it could never load that round's model."""
        with self._lock:
            last = self._last_version
            return None if last is None else last if self._last_sha is not None else last + 1

    def accept(self, signed: SignedManifest, weights_payload: bytes) -> ModelManifest:
        """The verified manifest, after which `last_version` is its version; TrustError if refused.

        Checks, in order: signature (nothing is believed before it), fleet and model id,
        version newer than the last accepted, delta base equal to the last accepted, payload
        length and sha256.
        """
        try:
            with self._lock:
                manifest = self._check(signed, weights_payload)
                self._last_version = manifest.version
                self._last_sha = manifest.weights_sha256
        except TrustError as exc:
            log.warning("refused model for fleet %s: %s", self.fleet, exc)
            raise
        log.info("accepted model %s v%d for fleet %s (%d bytes)", manifest.model_id, manifest.version,
                 manifest.fleet, manifest.payload_len)
        return manifest

    def _check(self, signed: SignedManifest, payload: bytes) -> ModelManifest:
        if not isinstance(signed, SignedManifest):
            raise TrustError(Reason.BAD_SIGNATURE,
                             f"expected a SignedManifest, got {type(signed).__name__} (unsigned?)")
        manifest = signed.verify(self.public_key)
        if manifest.fleet != self.fleet:
            raise TrustError(Reason.WRONG_MODEL,
                             f"model is for fleet {manifest.fleet!r}, this device is in {self.fleet!r}")
        if self.model_id is not None and manifest.model_id != self.model_id:
            raise TrustError(Reason.WRONG_MODEL, f"model id {manifest.model_id!r}, expected {self.model_id!r}")
        last = self._last_version
        same_again = (last is not None and manifest.version == last and self._last_sha is not None
                      and hmac.compare_digest(manifest.weights_sha256, self._last_sha))
        if last is not None and manifest.version <= last and not same_again:
            raise TrustError(Reason.OLD_VERSION, f"version {manifest.version} is not newer than {last} (replay?)")
        if manifest.base_version is not None and manifest.base_version != last:
            raise TrustError(Reason.STALE_BASE, f"delta against version {manifest.base_version}, "
                                                f"but this device holds {last}: fetch the full model")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TrustError(Reason.BAD_HASH, f"weights payload must be bytes, got {type(payload).__name__}")
        if len(payload) != manifest.payload_len:
            raise TrustError(Reason.BAD_HASH, f"payload is {len(payload)} bytes, manifest says {manifest.payload_len}")
        if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), manifest.weights_sha256):
            raise TrustError(Reason.BAD_HASH, "payload sha256 differs from the signed manifest")
        return manifest
