"""Plain floating-point value coders: `f32` (lossless) and `f16` (half precision).

f16 error bound: values are first saturated to +-65504 (the largest float16), then rounded to
nearest, so for |x| <= 65504, |decode(x) - x| <= max(|x| * 2**-11, 2**-25) (relative for
normal halves, absolute below 2**-14 where halves are subnormal). Beyond 65504 the error is
|x| - 65504; with `ef` in front, that excess is carried to the next round.
"""
from __future__ import annotations

import numpy as np

from protocol.codec.container import ByteReader, ByteWriter, bad_payload, check_peak
from protocol.codec.stages import ValueCoder

F16_MAX = 65504.0


def _scaled(values: np.ndarray, scale: float) -> np.ndarray:
    return values if scale == 1.0 else values * np.float32(scale)


def _peak(values: np.ndarray) -> float:
    # abs + max raise no FP warning even on signalling NaNs from hostile bytes; NaN propagates
    return float(np.max(np.abs(values))) if values.size else 0.0


class Float32Coder(ValueCoder):
    lossless = True

    @property
    def spec(self) -> str:
        return "f32"

    def encode(self, values: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> None:
        out.array(values, "<f4")

    def decode(self, reader: ByteReader, count: int, scale: float = 1.0) -> np.ndarray:
        values = reader.array("<f4", count, "f32 values")
        check_peak(_peak(values), scale, "f32 values")
        return _scaled(values, scale)

    def max_section_bytes(self, count: int) -> int:
        return 4 * count


class Float16Coder(ValueCoder):
    @property
    def spec(self) -> str:
        return "f16"

    def encode(self, values: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> None:
        out.array(np.clip(values, -F16_MAX, F16_MAX), "<f2")

    def decode(self, reader: ByteReader, count: int, scale: float = 1.0) -> np.ndarray:
        halves = reader.array("<f2", count, "f16 values")
        # exponent all ones = infinity or NaN
        if ((halves.view("<u2") & 0x7C00) == 0x7C00).any():
            raise bad_payload("f16 values hold NaN or infinity")
        check_peak(F16_MAX, scale, "f16 values")
        values = halves.astype(np.float32)
        if scale != 1.0:
            values *= np.float32(scale)
        return values

    def max_section_bytes(self, count: int) -> int:
        return 2 * count
