"""`SecAggParams`: what the server announces for a round of secure aggregation.

The integer grid: each device clips every coordinate of its update to [-value_range,
value_range] and rounds it (stochastically) to an integer in [-levels, levels], with
``levels = (2^(bits-1) - 1) // max_clients``. The sum of up to ``max_clients`` such integers
lies in [-(2^(bits-1) - 1), 2^(bits-1) - 1], so reading the unmasked sum modulo 2^bits as a
signed (two's complement) number recovers it exactly: the modular sum cannot wrap. The price
of a larger cohort or fewer bits is a coarser grid, ``step = value_range / levels``.

Examples (value_range 1): bits 32, 50 devices: step 2.3e-8 (finer than float32 updates);
bits 16, 50 devices: step 1.5e-3; bits 8, 50 devices: 2 levels, useless.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from protocol.errors import Reason
from protocol.secagg.errors import format_error

_PACKED = struct.Struct("<IIHBHd")
PACKED_BYTES = _PACKED.size
MAX_CLIENTS = 0xFFFF


@dataclass(frozen=True)
class SecAggParams:
    """One round's settings; every device and the server must use the same ones.

    ``threshold``: how many devices must survive to the end (and how many shares recover a
    secret). Bonawitz et al. recommend more than half of the cohort against an
    honest-but-curious server (more than two thirds against an active one); fewer makes
    dropout recovery easier and collusion with the server cheaper.
    """

    round_id: int
    dim: int
    threshold: int
    max_clients: int
    bits: int = 32
    value_range: float = 1.0

    def __post_init__(self) -> None:
        def bad(detail: str) -> ValueError:
            return ValueError(f"secure aggregation parameters: {detail}")

        for name, low, high in (("round_id", 0, 2**32 - 1), ("dim", 1, 2**32 - 1),
                                ("threshold", 2, MAX_CLIENTS), ("max_clients", 2, MAX_CLIENTS), ("bits", 2, 32)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(f"{name} must be an int in {low}..{high}, got {value!r}")
        if self.threshold > self.max_clients:
            raise bad(f"threshold {self.threshold} exceeds max_clients {self.max_clients}")
        if isinstance(self.value_range, bool) or not isinstance(self.value_range, (int, float)) \
                or not (math.isfinite(self.value_range) and self.value_range > 0):
            raise bad(f"value_range must be a finite number > 0, got {self.value_range!r}")
        object.__setattr__(self, "value_range", float(self.value_range))
        if self.levels < 1:
            raise bad(f"{self.bits} bits leave no room for {self.max_clients} devices: the sum of their "
                      f"values must stay below 2^{self.bits - 1}; use more bits or fewer devices")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def mask(self) -> int:
        """Bit mask that reduces a uint32 modulo 2^bits."""
        return self.modulus - 1

    @property
    def levels(self) -> int:
        """Largest |integer| one device may contribute per coordinate."""
        return ((1 << (self.bits - 1)) - 1) // self.max_clients

    @property
    def step(self) -> float:
        """Value of one integer unit: the grid spacing."""
        return self.value_range / self.levels

    @property
    def value_bytes(self) -> int:
        """Bytes per coordinate on the wire: 1, 2 or 4."""
        return 1 if self.bits <= 8 else 2 if self.bits <= 16 else 4

    def to_bytes(self) -> bytes:
        return _PACKED.pack(self.round_id, self.dim, self.threshold, self.bits, self.max_clients, self.value_range)

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggParams:
        """Strict parse of exactly `PACKED_BYTES` bytes; `SecAggFormatError` otherwise."""
        if len(data) != PACKED_BYTES:
            raise format_error(Reason.TRUNCATED if len(data) < PACKED_BYTES else Reason.BAD_FIELD,
                               f"secure aggregation parameters are {PACKED_BYTES} bytes, got {len(data)}")
        round_id, dim, threshold, bits, max_clients, value_range = _PACKED.unpack(bytes(data))
        try:
            return cls(round_id, dim, threshold, max_clients, bits, value_range)
        except ValueError as exc:
            raise format_error(Reason.BAD_FIELD, str(exc)) from None
