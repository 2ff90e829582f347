"""Cohort selection with over-selection, and pace steering (Bonawitz et al. 2019, sec. 2.3).

Over-selection: some selected devices always drop out (unplugged, lost network, too slow), so
a round selects more devices than it needs (130 % by default) and commits as soon as the goal
count has reported; later reports are refused with `round_closed`.

Pace steering: a device that was not selected is told when to come back. With a small
population the answer is "at the next round", so that every round sees enough check-ins;
with a large one the devices are spread at random over the next few rounds, so each round's
window sees about `checkins_per_slot` check-ins per cohort seat instead of the whole fleet
at once (the thundering herd that a global clock would cause).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np


def select_cohort(candidates: list[str], size: int, rng: np.random.Generator) -> list[str]:
    """`size` of the candidates drawn uniformly without replacement (sorted; seeded by `rng`)."""
    pool = sorted(set(candidates))
    size = min(size, len(pool))
    if size <= 0:
        return []
    return sorted(rng.choice(pool, size=size, replace=False).tolist())


class PaceSteering:
    """Decides `Assignment.retry_after_s` for devices that are not needed now.

    It learns two things as rounds run: the round period (an exponential average of the time
    from one plan to the next) and the population (distinct devices that checked in during
    the last `memory_rounds` rounds). Until it has seen one full round it says "come back at
    the next round" (0 s).
    """

    def __init__(self, *, checkins_per_slot: float = 2.0, max_skip_rounds: int = 8, memory_rounds: int = 20,
                 smoothing: float = 0.3, seed: int = 0) -> None:
        if checkins_per_slot < 1 or max_skip_rounds < 1 or memory_rounds < 1 or not 0 < smoothing <= 1:
            raise ValueError("need checkins_per_slot >= 1, max_skip_rounds >= 1, memory_rounds >= 1, 0 < smoothing <= 1")
        self.checkins_per_slot = checkins_per_slot
        self.max_skip_rounds = max_skip_rounds
        self.smoothing = smoothing
        self.period_s: float | None = None
        self._rounds: deque[set[str]] = deque(maxlen=memory_rounds)
        self._rounds.append(set())
        self._rng = np.random.default_rng(seed)

    # -- observations ------------------------------------------------------------------------
    def observe_checkin(self, device: str) -> None:
        self._rounds[-1].add(device)

    def observe_round(self, duration_s: float) -> None:
        """A round ended after `duration_s` (plan to plan); a new round's memory starts."""
        if duration_s > 0 and math.isfinite(duration_s):
            self.period_s = duration_s if self.period_s is None else \
                (1 - self.smoothing) * self.period_s + self.smoothing * duration_s
        self._rounds.append(set())

    @property
    def population(self) -> int:
        """Distinct devices seen checking in over the remembered rounds."""
        return len(set().union(*self._rounds))

    # -- the answer ----------------------------------------------------------------------------
    def spread_rounds(self, cohort_size: int) -> float:
        """Over how many rounds the population is spread (1 = everyone comes every round)."""
        need = max(1.0, cohort_size * self.checkins_per_slot)
        return float(min(self.max_skip_rounds, max(1.0, self.population / need)))

    def retry_after(self, cohort_size: int, elapsed_in_round_s: float) -> float:
        """Seconds until an unselected device should check in again (0 = at the next round)."""
        if self.period_s is None:
            return 0.0
        span = self.spread_rounds(cohort_size)
        if span <= 1.0:
            return 0.0
        until_next = max(0.0, self.period_s - elapsed_in_round_s)
        return until_next + float(self._rng.uniform(0.0, span - 1.0)) * self.period_s
