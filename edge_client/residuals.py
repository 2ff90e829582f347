"""The error-feedback residual: what compression dropped, kept on the device between rounds.

Stored as one raw float32 file written atomically (temp file + rename), so a crash or a
restart of the client never leaves a half-written residual; memory-only when no directory.
With a `Keyring` the file is sealed (AES-GCM, bound to its name, edge_client/sealing.py): the
residual is a function of the user's text. A plain file left by an older client is read and
sealed by `reseal()`; one sealed with an unknown key is a StoreKeyError, never discarded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edge_client.sealing import Keyring, SealedDataCorrupt, StoreKeyError, is_sealed, sealed_key_id

log = logging.getLogger(__name__)


RESIDUAL_FILE = "residual.f32"


class ResidualStore:
    def __init__(self, directory: Path | None, name: str = RESIDUAL_FILE, *, keyring: Keyring | None = None) -> None:
        self.path = Path(directory) / name if directory is not None else None
        self.keyring = keyring
        self._aad = b"fedboard/residual/v1\0" + name.encode("utf-8")
        self._memory: np.ndarray | None = None

    def _read_raw(self) -> bytes | None:
        """The residual's float32 bytes (opened if sealed); None if there is no file."""
        assert self.path is not None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not is_sealed(raw):
            return raw
        if self.keyring is None:
            raise StoreKeyError(f"residual {self.path} is encrypted: open it with the device's store key")
        return self.keyring.open(raw, self._aad, f"residual {self.path}")

    def check_key(self) -> None:
        """StoreKeyError if the file is sealed with a key the keyring does not hold (reads nothing else)."""
        if self.path is None or self.keyring is None:
            return
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(64)
        except FileNotFoundError:
            return
        key_id = sealed_key_id(head)
        if key_id is not None and not self.keyring.has(key_id):
            self.keyring.open(head, self._aad, f"residual {self.path}")  # raises, naming the key ids

    def reseal(self) -> bool:
        """Rewrite the file sealed with the keyring's current key (a plain file, or another key
        during a rotation); True if it was rewritten."""
        if self.path is None or self.keyring is None:
            return False
        raw = self._read_raw()
        if raw is None or sealed_key_id(self.path.read_bytes()) == self.keyring.current.key_id:
            return False
        self._write(raw)
        return True

    def load(self, size: int) -> np.ndarray | None:
        """The saved residual, or None if there is none (or it belongs to another model size)."""
        if self.path is None:
            return None if self._memory is None or self._memory.size != size else self._memory.copy()
        try:
            raw = self._read_raw()
        except SealedDataCorrupt as exc:
            log.warning("discarding residual: %s", exc)
            return None
        if raw is None:
            return None
        if len(raw) % 4:
            log.warning("discarding residual %s: %d bytes is not a float32 vector", self.path, len(raw))
            return None
        data = np.frombuffer(raw, dtype="<f4")
        if data.size != size or not np.all(np.isfinite(data)):
            log.warning("discarding residual %s: %d values, model has %d", self.path, data.size, size)
            return None
        return data.astype(np.float32)  # a writable copy: frombuffer's view is read-only

    def save(self, residual: np.ndarray) -> None:
        residual = np.ascontiguousarray(residual, dtype="<f4")
        if self.path is None:
            self._memory = residual.copy()
            return
        self._write(memoryview(residual).cast("B"))  # no bytes copy of the vector when plain

    def _write(self, data: bytes | memoryview) -> None:
        assert self.path is not None
        if self.keyring is not None:
            data = self.keyring.seal(bytes(data), self._aad)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self._memory = None
        if self.path is not None and self.path.exists():
            self.path.unlink()
