"""Dense-to-dense stages that run before sparsification: `clip:C` and `ef`.

`clip:C` scales the vector down to L2 norm C when it is longer (the usual update clipping of
DP-FedAvg and robust aggregation) and writes 5 bytes: a flag saying whether it clipped and
the norm before clipping (float32), so the server can count clipped clients.

`ef` (error feedback) writes nothing; `Codec` adds the device's residual before the stages
that follow it and returns the new residual (see pipeline.py).
"""
from __future__ import annotations

import math

import numpy as np

from protocol.codec.container import ByteReader, ByteWriter, bad_payload
from protocol.codec.stages import Transform, format_number


def l2_norm(vec: np.ndarray) -> float:
    """L2 norm accumulated in float64 (float32 dot products drift on 10^6 values)."""
    v = vec.astype(np.float64)
    return math.sqrt(float(np.dot(v, v)))


class ClipStage(Transform):
    def __init__(self, max_norm: float) -> None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"clip norm must be finite and > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    @property
    def spec(self) -> str:
        return f"clip:{format_number(self.max_norm)}"

    def encode(self, vec: np.ndarray, out: ByteWriter) -> np.ndarray:
        norm = l2_norm(vec)
        clipped = norm > self.max_norm
        out.u8(1 if clipped else 0)
        out.array(np.array([min(norm, float(np.finfo(np.float32).max))]), "<f4")
        if not clipped:
            return vec
        return (vec * (self.max_norm / norm)).astype(np.float32)

    def read(self, reader: ByteReader) -> tuple[bool, float]:
        flag = reader.u8("clip flag")
        if flag not in (0, 1):
            raise bad_payload(f"clip flag is {flag}, expected 0 or 1")
        norm = float(reader.array("<f4", 1, "clip norm")[0])
        if not (math.isfinite(norm) and norm >= 0):
            raise bad_payload(f"clip norm {norm} is negative or not finite")
        return bool(flag), norm

    def max_section_bytes(self) -> int:
        return 5


class ErrorFeedback(Transform):
    """Marker stage: its work (residual in, residual out) is done by `Codec.encode`."""

    lossless = True

    @property
    def spec(self) -> str:
        return "ef"

    def encode(self, vec: np.ndarray, out: ByteWriter) -> np.ndarray:
        return vec

    def read(self, reader: ByteReader) -> None:
        return None

    def max_section_bytes(self) -> int:
        return 0
