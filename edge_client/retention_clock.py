"""The text store's own clock: how long a text has really been kept, whatever the wall clock does.

Retention by wall-clock stamps fails both ways: texts typed while the clock was 10 years behind
are all deleted the moment NTP sets it right, and a text stamped 2076 is kept until 2076. So the
store measures age on a clock of its own, "store seconds", persisted beside the texts:

- within one boot it advances with CLOCK_BOOTTIME (monotonic, counts suspend): wall-clock
  jumps, either way, cost nothing;
- across a reboot (another kernel boot id) the time since the boot is on the boot clock, and
  the wall clock is the only witness of the time the device was off: the store credits
  (wall_now - since_boot) - wall_at_last_use, never less than 0 (a clock that went back makes
  nothing younger) and at most `max_offline_s` (a forward jump at boot, e.g. an RTC fixed while
  off, cannot age everything at once; it is logged);
- a row is born at the store time it was added, minus the age its stamp claims (an import of
  old texts), where a stamp in the future claims age 0.

A Raspberry Pi has no RTC (fake-hwclock restores the last shutdown time): the time it spends
switched off is not counted, so texts may be kept longer than max_age_days by that time.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_MAX_OFFLINE_S = 30 * 86_400.0
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class StoreClock(Protocol):
    """Wall-clock seconds, plus (boot id, seconds since that boot on a clock that never jumps)."""

    def wall(self) -> float: ...

    def boot(self) -> tuple[str, float]: ...


class SystemClock:
    """time.time and the kernel's boot id + CLOCK_BOOTTIME (a per-process id and time.monotonic
    where those are missing: then every restart counts as a reboot)."""

    def __init__(self) -> None:
        try:
            with open(_BOOT_ID_PATH, encoding="ascii") as fh:
                self._boot_id = fh.read().strip()
            self._since_boot: Callable[[], float] = lambda: time.clock_gettime(time.CLOCK_BOOTTIME)
        except (OSError, AttributeError):
            self._boot_id = f"process-{uuid.uuid4()}"
            self._since_boot = time.monotonic

    def wall(self) -> float:
        return time.time()

    def boot(self) -> tuple[str, float]:
        return self._boot_id, self._since_boot()


class WallOnlyClock:
    """A plain `() -> seconds` callable taken as true elapsed time (a test's simulated clock that
    never jumps): boot time follows it, so age is what it says."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def wall(self) -> float:
        return float(self._clock())

    def boot(self) -> tuple[str, float]:
        return "injected", float(self._clock())


def as_store_clock(clock: Callable[[], float] | StoreClock | None) -> StoreClock:
    if clock is None:
        return SystemClock()
    if hasattr(clock, "wall") and hasattr(clock, "boot"):
        return clock  # type: ignore[return-value]
    return WallOnlyClock(clock)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClockState:
    """What the store persists: its elapsed seconds and the last observation of the clocks."""

    elapsed: float
    boot_id: str
    since_boot: float
    wall: float


def advance(state: ClockState | None, clock: StoreClock, max_offline_s: float = DEFAULT_MAX_OFFLINE_S
            ) -> ClockState:
    """The store clock now: `state` moved forward by the time elapsed since it was observed."""
    wall = clock.wall()
    boot_id, since_boot = clock.boot()
    if state is None:
        return ClockState(0.0, boot_id, since_boot, wall)
    if boot_id == state.boot_id:
        step = max(0.0, since_boot - state.since_boot)
        jump = (wall - state.wall) - step
        if abs(jump) > 60.0:
            log.info("wall clock jumped by %+.0f s; text retention ignores it", jump)
    else:  # the time since this boot is on the boot clock; only the time off needs the wall clock
        off = (wall - since_boot) - state.wall
        credit = min(max(0.0, off), max_offline_s)
        if off < 0 or off > max_offline_s:
            log.warning("wall clock moved %+.0f s across a reboot; text retention counts %.0f s", off, credit)
        step = credit + max(0.0, since_boot)
    return ClockState(state.elapsed + step, boot_id, since_boot, wall)


def claimed_age(stamp: float, wall_now: float) -> float:
    """How old a text stamped `stamp` says it is; a stamp in the future says 0."""
    return max(0.0, wall_now - stamp)
