"""Battery charge, integrated exactly over the device's plugged / in-use timeline.

Between reads the draw is piecewise constant (charging, screen on, screen off), so the charge
is integrated segment by segment with clamping at empty and full. The result does not depend
on how often the battery is read, which keeps a timeline reproducible whatever the wall clock
did; only what the simulator asked the device to do (train, upload) changes it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from device_sim.timeline import BATTERY_EMPTY, Event

Interval = tuple[float, float]


@dataclass(frozen=True)
class BatterySpec:
    """A battery and what drains it (currents in mA at the battery, energy per MB in mAh).

    `present = false` is a device without battery (it must be mains powered). A training
    step costs `train_ma` for the step's duration; a megabyte sent costs `mah_per_mb_wifi`
    on wired/wifi and `mah_per_mb_cellular` on cellular (radio tail energy included). The
    initial charge is drawn uniformly from `initial_percent` = (low, high).
    """

    present: bool = True
    capacity_mah: float = 4000.0
    idle_ma: float = 25.0
    active_ma: float = 300.0
    charge_ma: float = 1500.0
    train_ma: float = 600.0
    mah_per_mb_wifi: float = 0.07
    mah_per_mb_cellular: float = 0.35
    initial_percent: tuple[float, float] = (40.0, 95.0)

    def __post_init__(self) -> None:
        if not self.capacity_mah > 0:
            raise ValueError(f"capacity_mah must be > 0, got {self.capacity_mah}")
        for name in ("idle_ma", "active_ma", "charge_ma", "train_ma", "mah_per_mb_wifi", "mah_per_mb_cellular"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        low, high = self.initial_percent
        if not 0.0 <= low <= high <= 100.0:
            raise ValueError(f"initial_percent must be [low, high] with 0 <= low <= high <= 100, got {self.initial_percent}")


class Battery:
    """Charge of one battery. `percent_at(t)` integrates forward; `drain(t, mah)` spends.

    `plugged(t0, t1)` and `active(t0, t1)` return the plugged-in and in-use intervals inside
    [t0, t1). While plugged the charger supplies the device and fills the battery at
    `charge_ma`; otherwise the battery pays `active_ma` or `idle_ma`. A device at 0 %
    unplugged is off (it draws nothing until plugged in again). Reads before the last
    integrated instant return the charge at that instant (time never runs backwards here).
    """

    __slots__ = ("spec", "_plugged", "_active", "_t", "_mah", "spent_mah", "events")

    def __init__(self, spec: BatterySpec, initial_percent: float, start_s: float,
                 plugged: Callable[[float, float], list[Interval]], active: Callable[[float, float], list[Interval]],
                 *, record_events: bool = False) -> None:
        self.spec = spec
        self._plugged = plugged
        self._active = active
        self._t = start_s
        self._mah = spec.capacity_mah * min(max(initial_percent, 0.0), 100.0) / 100.0
        self.spent_mah = 0.0  # spent on federated learning (training + uploads)
        self.events: list[Event] | None = [] if record_events else None

    @property
    def integrated_until(self) -> float:
        return self._t

    def percent_at(self, t: float) -> float:
        self._advance(t)
        return 100.0 * self._mah / self.spec.capacity_mah

    def drain(self, t: float, mah: float) -> float:
        """Spend `mah` at time `t` (after integrating up to it); returns what was really drawn."""
        if mah < 0:
            raise ValueError(f"cannot drain a negative charge ({mah} mAh)")
        self._advance(t)
        drawn = min(mah, self._mah)
        self._set(self._mah - mah, self._t)
        self.spent_mah += mah
        return drawn

    def _set(self, mah: float, t: float) -> None:
        was = self._mah
        self._mah = min(max(mah, 0.0), self.spec.capacity_mah)
        if self.events is not None and was > 0 and self._mah <= 0:
            self.events.append(Event(t, BATTERY_EMPTY))

    def _advance(self, t: float) -> None:
        t0 = self._t
        if t <= t0:
            return
        plugged = self._plugged(t0, t)
        active = self._active(t0, t)
        cuts = {t0, t}
        for a, b in plugged:
            cuts.update((a, b))
        for a, b in active:
            cuts.update((a, b))
        points = sorted(c for c in cuts if t0 <= c <= t)
        s = self.spec
        pi = ai = 0
        for a, b in zip(points, points[1:]):
            if b <= a:
                continue
            mid = (a + b) / 2
            while pi < len(plugged) and plugged[pi][1] <= mid:
                pi += 1
            while ai < len(active) and active[ai][1] <= mid:
                ai += 1
            on_power = pi < len(plugged) and plugged[pi][0] <= mid
            in_use = ai < len(active) and active[ai][0] <= mid
            if on_power:
                rate = s.charge_ma
            elif self._mah <= 0:
                continue  # switched off
            else:
                rate = -(s.active_ma if in_use else s.idle_ma)
            new = self._mah + rate * (b - a) / 3600.0
            if self.events is not None and new <= 0 < self._mah:
                self.events.append(Event(a + self._mah / -rate * 3600.0, BATTERY_EMPTY))
            self._mah = min(max(new, 0.0), s.capacity_mah)
        self._t = t
