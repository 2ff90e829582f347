"""The error-feedback residual: what compression dropped, kept on the device between rounds.

Stored as one raw float32 file written atomically (temp file + rename), so a crash or a
restart of the client never leaves a half-written residual; memory-only when no directory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ResidualStore:
    def __init__(self, directory: Path | None, name: str = "residual.f32") -> None:
        self.path = Path(directory) / name if directory is not None else None
        self._memory: np.ndarray | None = None

    def load(self, size: int) -> np.ndarray | None:
        """The saved residual, or None if there is none (or it belongs to another model size)."""
        if self.path is None:
            return None if self._memory is None or self._memory.size != size else self._memory.copy()
        if not self.path.exists():
            return None
        data = np.fromfile(self.path, dtype="<f4")
        if data.size != size or not np.all(np.isfinite(data)):
            log.warning("discarding residual %s: %d values, model has %d", self.path, data.size, size)
            return None
        return data.astype(np.float32, copy=False)

    def save(self, residual: np.ndarray) -> None:
        residual = np.ascontiguousarray(residual, dtype="<f4")
        if self.path is None:
            self._memory = residual.copy()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(memoryview(residual).cast("B"))  # no bytes copy of the vector
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self._memory = None
        if self.path is not None and self.path.exists():
            self.path.unlink()
