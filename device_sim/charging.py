"""When a device is plugged in: nightly charging, daytime top-ups, or always (mains power).

Phones in the field charge mostly overnight in their owner's time zone, which is why
federated keyboards train at night (Hard et al. 2018, Gboard). Each local day draws its own
sessions from (seed, device, day), so any instant can be answered without replaying the past.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from device_sim.clock import HOUR_S, local_day, local_to_sim, weekday
from device_sim.timeline import Stream, device_rng


@dataclass(frozen=True)
class ChargingSpec:
    """Charging habits in local time; hours may exceed 24 (25.0 = 01:00 the next day).

    - overnight: on `overnight_prob` of nights the device is plugged in around `plug_h`
      (normal jitter `plug_jitter_h`) until `unplug_h` the next morning.
    - desk: on `desk_prob` of weekdays a daytime top-up starts around `desk_h` and lasts
      `desk_len_h` on average (exponential, at least 10 minutes).
    - mains_powered: always plugged (a Raspberry Pi on a power supply); the rest is ignored.
    """

    mains_powered: bool = False
    overnight_prob: float = 0.9
    plug_h: float = 22.5
    plug_jitter_h: float = 1.0
    unplug_h: float = 7.0
    unplug_jitter_h: float = 0.5
    desk_prob: float = 0.3
    desk_h: float = 13.0
    desk_jitter_h: float = 2.0
    desk_len_h: float = 1.5

    def __post_init__(self) -> None:
        for name in ("overnight_prob", "desk_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("plug_jitter_h", "unplug_jitter_h", "desk_jitter_h"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 12.0 <= self.plug_h <= 28.0:
            raise ValueError(f"plug_h must be an evening/night hour in [12, 28], got {self.plug_h}")
        if not 0.0 <= self.unplug_h <= 14.0:
            raise ValueError(f"unplug_h must be a morning hour in [0, 14] of the next day, got {self.unplug_h}")
        if not 0.0 <= self.desk_h <= 24.0:
            raise ValueError(f"desk_h must be in [0, 24], got {self.desk_h}")
        if not self.desk_len_h > 0:
            raise ValueError(f"desk_len_h must be > 0, got {self.desk_len_h}")


Interval = tuple[float, float]


def merge(intervals: list[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of half-open intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class ChargingModel:
    """Plugged-in intervals of one device; `plugged_at(t)` and `intervals(t0, t1)`."""

    __slots__ = ("spec", "seed", "index", "offset_s", "_cache")

    def __init__(self, spec: ChargingSpec, seed: int, index: int, utc_offset_s: float) -> None:
        self.spec = spec
        self.seed = seed
        self.index = index
        self.offset_s = utc_offset_s
        self._cache: dict[int, tuple[Interval, ...]] = {}

    def sessions(self, day: int) -> tuple[Interval, ...]:
        """Sessions that START on local day `day` (an overnight one ends the next morning)."""
        hit = self._cache.get(day)
        if hit is not None:
            return hit
        s = self.spec
        rng = device_rng(self.seed, self.index, Stream.CHARGING, day)
        u_night, z_plug, z_unplug, u_desk, z_desk, e_len = (rng.random(), rng.standard_normal(),
                                                           rng.standard_normal(), rng.random(),
                                                           rng.standard_normal(), rng.exponential())
        out: list[Interval] = []
        if u_desk < s.desk_prob and weekday(day) < 5:
            start_h = min(max(s.desk_h + s.desk_jitter_h * z_desk, 8.0), 20.0)
            length_h = max(s.desk_len_h * e_len, 1.0 / 6.0)
            out.append((local_to_sim(day, start_h, self.offset_s),
                        local_to_sim(day, min(start_h + length_h, 21.0), self.offset_s)))
        if u_night < s.overnight_prob:
            plug_h = min(max(s.plug_h + s.plug_jitter_h * z_plug, 18.0), 27.5)
            unplug_h = 24.0 + min(max(s.unplug_h + s.unplug_jitter_h * z_unplug, 4.0), 12.0)
            if unplug_h - plug_h >= 0.5:
                out.append((local_to_sim(day, plug_h, self.offset_s), local_to_sim(day, unplug_h, self.offset_s)))
        result = tuple(merge(out))
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[day] = result
        return result

    def plugged_at(self, t: float) -> bool:
        if self.spec.mains_powered:
            return True
        day = local_day(t, self.offset_s)
        for d in (day - 1, day):
            for start, end in self.sessions(d):
                if start <= t < end:
                    return True
        return False

    def intervals(self, t0: float, t1: float) -> list[Interval]:
        """Plugged intervals clipped to [t0, t1)."""
        if t1 <= t0:
            return []
        if self.spec.mains_powered:
            return [(t0, t1)]
        first, last = local_day(t0, self.offset_s) - 1, local_day(t1, self.offset_s)
        found = [iv for d in range(first, last + 1) for iv in self.sessions(d)]
        return [(max(a, t0), min(b, t1)) for a, b in merge(found) if b > t0 and a < t1]

    def next_change(self, t: float, horizon_s: float = 14 * 24 * HOUR_S) -> float:
        """The first instant after `t` at which plugged/unplugged flips (inf if none)."""
        if self.spec.mains_powered:
            return math.inf
        for a, b in self.intervals(t, t + horizon_s):
            if a > t:
                return a
            if b < t + horizon_s:
                return b
        return math.inf
