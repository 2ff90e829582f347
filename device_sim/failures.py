"""Injected failures: the app killed mid-training, a crash in a round, an upload cut off.

Real fleets lose devices for reasons no sensor announces: the OS kills a background job, the
app crashes, the radio drops in the middle of an upload. Each draw is keyed by (seed, device,
round), so whether device 17 crashes in round 4 is fixed by the seed and does not depend on
how the simulator's threads happened to interleave.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from device_sim.timeline import Stream, device_rng


@dataclass(frozen=True)
class FailureSpec:
    """Rates of failures no eligibility rule can see coming.

    - `kill_per_train_min`: probability that the app is killed during one minute of training
      (so P(killed in s seconds) = 1 - (1 - p) ** (s / 60)).
    - `crash_per_round`: probability that the app crashes in a round it was selected for.
    - `upload_loss`: probability that an upload is cut off (on top of the link really changing
      mid-upload, which the connectivity model decides); the cut happens at a uniform fraction.
    """

    kill_per_train_min: float = 0.005
    crash_per_round: float = 0.01
    upload_loss: float = 0.01

    def __post_init__(self) -> None:
        for name in ("kill_per_train_min", "crash_per_round", "upload_loss"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")

    @property
    def kill_rate_per_s(self) -> float:
        if self.kill_per_train_min >= 1.0:
            return math.inf
        return -math.log1p(-self.kill_per_train_min) / 60.0


class FailureModel:
    """Deterministic failure draws of one device."""

    __slots__ = ("spec", "seed", "index")

    def __init__(self, spec: FailureSpec, seed: int, index: int) -> None:
        self.spec = spec
        self.seed = seed
        self.index = index

    def kill_after_s(self, round_id: int) -> float:
        """Seconds of training in round `round_id` after which the app is killed (inf: never)."""
        rate = self.spec.kill_rate_per_s
        if rate == 0.0:
            return math.inf
        if math.isinf(rate):
            return 0.0
        return float(device_rng(self.seed, self.index, Stream.KILL, round_id).exponential(1.0 / rate))

    def killed_during(self, round_id: int, elapsed_s: float, duration_s: float) -> bool:
        """Is the app killed in training seconds (elapsed_s, elapsed_s + duration_s] of the round?"""
        kill = self.kill_after_s(round_id)
        return elapsed_s < kill <= elapsed_s + duration_s or (kill == 0.0 and elapsed_s == 0.0)

    def crashes(self, round_id: int) -> bool:
        p = self.spec.crash_per_round
        return p > 0 and bool(device_rng(self.seed, self.index, Stream.CRASH, round_id).random() < p)

    def upload_cut_at(self, round_id: int, attempt: int = 0) -> float | None:
        """Fraction of the upload done when it is cut off, or None if it goes through."""
        p = self.spec.upload_loss
        if p <= 0:
            return None
        rng = device_rng(self.seed, self.index, Stream.UPLOAD, round_id, attempt)
        lost, where = rng.random(2)
        return float(where) if lost < p else None
