"""Simulated time: a fleet lives through days while the simulator runs for minutes.

Sim time is seconds on the Unix-epoch scale (so a sim instant is also a calendar instant and
device models can ask "what hour is it for this user?"). `VirtualClock` runs `speedup` times
faster than the wall (monotonic) clock; `ManualClock` moves only when told, so tests are
deterministic and instant. Both satisfy the `Clock` protocol, which is all device models and
the simulator depend on.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

DAY_S = 86400.0
HOUR_S = 3600.0
DEFAULT_START_S = 1704067200.0  # Monday 2024-01-01 00:00 UTC
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@runtime_checkable
class Clock(Protocol):
    """What the simulator and device models need from a clock."""

    start_s: float
    speedup: float

    def now(self) -> float:
        """Sim seconds (epoch scale), never decreasing."""
        ...

    def wall_seconds(self, sim_s: float) -> float:
        """How long `sim_s` simulated seconds last on the wall."""
        ...

    def sim_seconds(self, wall_s: float) -> float:
        """How many simulated seconds pass during `wall_s` wall seconds."""
        ...

    def sleep(self, sim_s: float) -> None:
        """Block until `sim_s` simulated seconds have passed (instant on a ManualClock)."""
        ...


def _check_speedup(speedup: float) -> float:
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 0:
        raise ValueError(f"speedup must be a finite number > 0 (sim seconds per wall second), got {speedup!r}")
    return float(speedup)


def _check_start(start_s: float) -> float:
    if isinstance(start_s, bool) or not isinstance(start_s, (int, float)) or not math.isfinite(start_s) or start_s < 0:
        raise ValueError(f"start_s must be a finite number >= 0 (epoch seconds), got {start_s!r}")
    return float(start_s)


class VirtualClock:
    """Sim time = start_s + speedup x (wall time since creation), minus any time spent frozen.

    `freeze()` stops sim time (e.g. while the simulator evaluates the model between rounds,
    so that work does not eat into the fleet's day); `resume()` continues from where it stopped.
    """

    def __init__(self, speedup: float = 1.0, start_s: float = DEFAULT_START_S, *,
                 wall: Callable[[], float] = time.monotonic, sleeper: Callable[[float], None] = time.sleep) -> None:
        self.speedup = _check_speedup(speedup)
        self.start_s = _check_start(start_s)
        self._wall = wall
        self._sleeper = sleeper
        self._lock = threading.Lock()
        self._wall0 = wall()
        self._base = self.start_s          # sim time at _wall0
        self._frozen_at: float | None = None

    def now(self) -> float:
        frozen = self._frozen_at
        if frozen is not None:
            return frozen
        return self._base + (self._wall() - self._wall0) * self.speedup

    def wall_seconds(self, sim_s: float) -> float:
        return sim_s / self.speedup

    def sim_seconds(self, wall_s: float) -> float:
        return wall_s * self.speedup

    def sleep(self, sim_s: float) -> None:
        if sim_s > 0:
            self._sleeper(sim_s / self.speedup)

    @property
    def frozen(self) -> bool:
        return self._frozen_at is not None

    def freeze(self) -> None:
        with self._lock:
            if self._frozen_at is None:
                self._frozen_at = self.now()

    def resume(self) -> None:
        with self._lock:
            if self._frozen_at is not None:
                self._base, self._wall0 = self._frozen_at, self._wall()
                self._frozen_at = None

    def __repr__(self) -> str:
        return f"VirtualClock(speedup={self.speedup}, now={describe(self.now())})"


class ManualClock:
    """A clock that moves only through `advance`/`set` (and `sleep`, which advances at once).

    `speedup` is only used to convert durations, so code that asks for wall seconds still
    gets consistent answers in tests.
    """

    def __init__(self, start_s: float = DEFAULT_START_S, *, speedup: float = 1.0) -> None:
        self.start_s = _check_start(start_s)
        self.speedup = _check_speedup(speedup)
        self._now = self.start_s
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, sim_s: float) -> float:
        if not sim_s >= 0:
            raise ValueError(f"a clock only moves forward; advance({sim_s!r})")
        with self._lock:
            self._now += sim_s
            return self._now

    def set(self, t: float) -> float:
        """Jump to sim time `t` (>= now)."""
        with self._lock:
            if t < self._now:
                raise ValueError(f"a clock only moves forward: {describe(t)} is before {describe(self._now)}")
            self._now = float(t)
            return self._now

    def wall_seconds(self, sim_s: float) -> float:
        return sim_s / self.speedup

    def sim_seconds(self, wall_s: float) -> float:
        return wall_s * self.speedup

    def sleep(self, sim_s: float) -> None:
        if sim_s > 0:
            self.advance(sim_s)

    def __repr__(self) -> str:
        return f"ManualClock(now={describe(self._now)})"


# ---- calendar helpers --------------------------------------------------------------------
def local_day(t: float, utc_offset_s: float) -> int:
    """The index (days since 1970-01-01) of the local calendar day that contains `t`."""
    return int(math.floor((t + utc_offset_s) / DAY_S))


def local_hour(t: float, utc_offset_s: float) -> float:
    """Hour of the local day, in [0, 24)."""
    return ((t + utc_offset_s) % DAY_S) / HOUR_S


def weekday(day_index: int) -> int:
    """0 = Monday ... 6 = Sunday, for a day index from `local_day` (1970-01-01 was a Thursday)."""
    return (day_index + 3) % 7


def local_to_sim(day_index: int, hour: float, utc_offset_s: float) -> float:
    """Sim time of `hour` (may exceed 24: the next day) on local day `day_index`."""
    return day_index * DAY_S + hour * HOUR_S - utc_offset_s


def describe(t: float) -> str:
    """`Mon 2024-01-01 08:00:00 UTC`, for logs and reports."""
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%a %Y-%m-%d %H:%M:%S UTC")


_WEEKDAY_TIME = re.compile(r"^\s*([a-z]+)\s+(\d{1,2}):(\d{2})\s*$", re.IGNORECASE)


def parse_start(text: str) -> float:
    """A start instant from `"monday 08:00"` (first such day from 2024-01-01, UTC) or ISO 8601.

    ISO forms: `2024-01-03T08:00Z`, `2024-01-03T08:00:00+01:00`, `2024-01-03 08:00` (UTC).
    """
    if not isinstance(text, str):
        raise ValueError(f"start must be a string like 'monday 08:00' or '2024-01-01T08:00Z', got {text!r}")
    m = _WEEKDAY_TIME.match(text)
    if m:
        name, hh, mm = m.group(1).lower(), int(m.group(2)), int(m.group(3))
        matches = [i for i, day in enumerate(WEEKDAYS) if day.startswith(name) and len(name) >= 3]
        if len(matches) != 1:
            raise ValueError(f"start {text!r}: unknown weekday {m.group(1)!r}; use monday ... sunday")
        if hh > 23 or mm > 59:
            raise ValueError(f"start {text!r}: time must be HH:MM between 00:00 and 23:59")
        return DEFAULT_START_S + matches[0] * DAY_S + hh * HOUR_S + mm * 60.0
    iso = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = _dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"start {text!r} is neither 'weekday HH:MM' nor an ISO 8601 date-time "
                         "(e.g. 'monday 08:00' or '2024-01-01T08:00Z')") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    t = moment.timestamp()
    if t < 0:
        raise ValueError(f"start {text!r} is before 1970")
    return t
