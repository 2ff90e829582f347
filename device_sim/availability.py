"""When the user is using the device (not idle): waking hours with bursts of typing.

A keyboard must never train while its user types, so availability is what turns a charged,
connected phone into an idle one. Each local day draws a waking window (later at weekends)
and, inside it, alternating active bursts and idle gaps (exponential lengths); asleep, the
device is idle. Days are independent draws from (seed, device, day): any instant can be
answered on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_sim.clock import local_day, local_to_sim, weekday
from device_sim.timeline import Stream, device_rng

Interval = tuple[float, float]


@dataclass(frozen=True)
class UsageSpec:
    """Daily usage in local time.

    - the user wakes around `wake_h` and goes to sleep around `sleep_h` (normal jitter);
      both `weekend_shift_h` later on Saturdays and Sundays;
    - while awake: active bursts of `active_mean_min` minutes on average, separated by idle
      gaps of `idle_mean_min` minutes on average (so about active/(active+idle) of the
      waking day is "in use"); asleep: idle.
    """

    wake_h: float = 7.0
    wake_jitter_h: float = 1.0
    sleep_h: float = 23.0
    sleep_jitter_h: float = 1.0
    weekend_shift_h: float = 1.0
    active_mean_min: float = 4.0
    idle_mean_min: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.wake_h <= 14.0:
            raise ValueError(f"wake_h must be in [0, 14], got {self.wake_h}")
        if not self.wake_h < self.sleep_h <= 28.0:
            raise ValueError(f"sleep_h must be after wake_h and <= 28 (04:00 next day), got {self.sleep_h}")
        for name in ("wake_jitter_h", "sleep_jitter_h", "weekend_shift_h"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("active_mean_min", "idle_mean_min"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def active_share_awake(self) -> float:
        return self.active_mean_min / (self.active_mean_min + self.idle_mean_min)


class UsageModel:
    """Active (in-use) intervals of one device; `active_at(t)` and `intervals(t0, t1)`."""

    __slots__ = ("spec", "seed", "index", "offset_s", "_cache")

    def __init__(self, spec: UsageSpec, seed: int, index: int, utc_offset_s: float) -> None:
        self.spec = spec
        self.seed = seed
        self.index = index
        self.offset_s = utc_offset_s
        self._cache: dict[int, np.ndarray] = {}

    def awake(self, day: int) -> Interval:
        """The waking window of local day `day` (sim seconds)."""
        rng = self._rng(day)
        return self._window(day, rng)

    def _rng(self, day: int) -> np.random.Generator:
        return device_rng(self.seed, self.index, Stream.USAGE, day)

    def _window(self, day: int, rng: np.random.Generator) -> Interval:
        s = self.spec
        shift = s.weekend_shift_h if weekday(day) >= 5 else 0.0
        z_wake, z_sleep = rng.standard_normal(2)
        wake_h = min(max(s.wake_h + shift + s.wake_jitter_h * z_wake, 4.0), 14.0)
        sleep_h = min(max(s.sleep_h + shift + s.sleep_jitter_h * z_sleep, wake_h + 2.0), 27.9)
        return local_to_sim(day, wake_h, self.offset_s), local_to_sim(day, sleep_h, self.offset_s)

    def day_edges(self, day: int) -> np.ndarray:
        """Active bursts of local day `day` as one sorted float64 array [start0, end0, start1, ...]:
        t is in a burst exactly when `edges.searchsorted(t, "right")` is odd."""
        hit = self._cache.get(day)
        if hit is not None:
            return hit
        s = self.spec
        rng = self._rng(day)
        wake, sleep = self._window(day, rng)
        span_min = (sleep - wake) / 60.0
        n = int(span_min / (s.active_mean_min + s.idle_mean_min) * 1.5) + 8
        while True:
            gaps = rng.exponential(s.idle_mean_min * 60.0, n)
            bursts = rng.exponential(s.active_mean_min * 60.0, n)
            # idle gap, burst, idle gap, burst, ... starting at wake
            ends = wake + np.cumsum(gaps + bursts)
            if ends[-1] >= sleep:
                break
            n *= 2  # rare: draw a longer sequence (from the same stream, still deterministic)
        starts = ends - bursts
        keep = starts < sleep
        edges = np.empty(2 * int(keep.sum()))
        edges[0::2] = starts[keep]
        edges[1::2] = np.minimum(ends[keep], sleep)
        if len(self._cache) >= 3:
            self._cache.pop(next(iter(self._cache)))
        self._cache[day] = edges
        return edges

    def day_intervals(self, day: int) -> np.ndarray:
        """Active intervals of local day `day` as an (n, 2) array of [start, end)."""
        return self.day_edges(day).reshape(-1, 2)

    def active_at(self, t: float) -> bool:
        day = local_day(t, self.offset_s)
        return bool(self.day_edges(day).searchsorted(t, "right") & 1
                    or self.day_edges(day - 1).searchsorted(t, "right") & 1)

    def intervals(self, t0: float, t1: float) -> list[Interval]:
        """Active intervals clipped to [t0, t1), in order."""
        if t1 <= t0:
            return []
        out: list[Interval] = []
        for d in range(local_day(t0, self.offset_s) - 1, local_day(t1, self.offset_s) + 1):
            edges = self.day_edges(d)
            lo = int(edges.searchsorted(t0, "right")) & ~1   # the burst containing or after t0
            hi = int(edges.searchsorted(t1, "left"))
            part = edges[lo:hi + (hi & 1)].tolist()
            out.extend((max(part[i], t0), min(part[i + 1], t1)) for i in range(0, len(part) - 1, 2))
        return [iv for iv in out if iv[1] > iv[0]]
