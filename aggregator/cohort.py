"""Cohort selection with over-selection, and pace steering (Bonawitz et al. 2019, sec. 2.3).

Over-selection: some selected devices always drop out (unplugged, lost network, too slow), so
a round selects more devices than it needs (130 % by default) and commits as soon as the goal
count has reported; later reports are refused with `round_closed`.

Pace steering: every device that checked in is told when to come back (a selected one, for
after its round: coming straight back, the cohort made up a third of the next window). With a
small population the answer is "at the next round", so that every round sees enough check-ins;
with a large one the devices are spread over the next few rounds, so each round's window sees
about `checkins_per_slot` check-ins per cohort seat instead of the whole fleet at once (the
thundering herd that a global clock would cause). Each device goes to the least-booked of
those rounds, counting the devices already sent away: drawing every return at random over the
span brought devices back after half the span on average, twice the check-ins aimed for.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Container, Iterable

import numpy as np


def thin_but_due(checkins: int, target: int, due: Iterable[str], arrived: Container[str]) -> bool:
    """Keep a window open that has fewer check-ins than the cohort target while a device booked
    for this round is still on its way (its retry ran long: the rounds came faster than pace
    steering expected). Closing on the devices already in gave rounds of a few devices."""
    return checkins < target and any(d not in arrived for d in due)


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

    def until_next_round(self, elapsed_in_round_s: float) -> float:
        """Seconds until the next round is expected to start (0 before the period is known)."""
        return 0.0 if self.period_s is None else max(0.0, self.period_s - elapsed_in_round_s)

    def rounds_ahead(self, retry_s: float, elapsed_in_round_s: float) -> int:
        """Which round a device told `retry_s` now comes back for: 1 = the next one."""
        if self.period_s is None:
            return 1
        start = self.until_next_round(elapsed_in_round_s) - self.period_s
        return 1 + max(0, math.floor((retry_s - start) / self.period_s))

    def retry_after(self, cohort_size: int, elapsed_in_round_s: float, booked_s: Iterable[float] = ()) -> float:
        """Seconds until one unselected device should check in again (0 = at the next round)."""
        return self.retry_afters(1, cohort_size, elapsed_in_round_s, booked_s)[0]

    def retry_afters(self, count: int, cohort_size: int, elapsed_in_round_s: float,
                     booked_s: Iterable[float] = ()) -> list[float]:
        """Seconds until each of `count` devices should check in again (0 = at the next round).

        The population is spread over the next `slots` = ceil(spread_rounds) rounds: slot k is
        the round period that ends with the plan of round r+1+k (slot 0: before the next plan).
        The devices already away (`booked_s`: each one's seconds left) fill the slots they come
        back in, and each new device takes the least-filled one, at a random point inside it.
        Which device gets which slot is shuffled, so a device's id does not decide how often it
        trains.
        """
        if count <= 0:
            return []
        if self.period_s is None:
            return [0.0] * count
        span = self.spread_rounds(cohort_size)
        if span <= 1.0:
            return [0.0] * count
        # every slot keeps at least a cohort's worth of the population (steady state never starves)
        slots = min(self.max_skip_rounds, math.ceil(span), max(1, self.population // max(1, cohort_size)))
        start = self.until_next_round(elapsed_in_round_s) - self.period_s  # slot 0 starts here
        load = [0] * slots
        for left in booked_s:
            k = math.floor((left - start) / self.period_s)
            if 0 <= k < slots:
                load[k] += 1
        order = [int(k) for k in self._rng.permutation(slots)]  # ties go in a random slot order
        chosen = []
        for _ in range(count):
            k = min(order, key=load.__getitem__)
            load[k] += 1
            chosen.append(k)
        self._rng.shuffle(chosen)
        jitter = self._rng.uniform(0.0, 1.0, size=count)
        return [max(0.0, start + (k + float(j)) * self.period_s) for k, j in zip(chosen, jitter)]
