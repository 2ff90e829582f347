"""What a device knows about itself: power, network, load, memory, heat.

Every device implementation (a Linux box reading sysfs, a simulated phone, a test) plugs in
through the one-method `Platform` protocol, so the eligibility policy and the client never
care where the readings come from.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


class NetworkType(str, enum.Enum):
    """The kind of link the device would use to reach the broker right now."""

    WIRED = "wired"
    WIFI = "wifi"
    CELLULAR = "cellular"
    NONE = "none"  # no usable link at all
    UNKNOWN = "unknown"  # could not tell (e.g. no /sys/class/net)


@dataclass(frozen=True)
class PlatformState:
    """One snapshot of the device.

    `battery_percent` is None when the device has no battery: it then runs on external power
    and counts as always powered. `charging` means "on external power" (plugged in), which is
    what a keyboard's training policy cares about, even when the battery is full and the
    charger is idle. `at` is a monotonic timestamp in seconds, to tell how fresh a reading is.
    """

    battery_percent: float | None
    charging: bool
    network: NetworkType
    metered: bool
    link_up: bool
    idle: bool
    free_memory_mb: float
    cpu_temp_c: float | None
    at: float

    def __post_init__(self) -> None:
        if self.battery_percent is not None and not (0.0 <= self.battery_percent <= 100.0):
            raise ValueError(f"battery_percent must be in [0, 100] or None, got {self.battery_percent!r}")
        if not isinstance(self.network, NetworkType):
            object.__setattr__(self, "network", NetworkType(self.network))
        if not (isinstance(self.free_memory_mb, (int, float)) and self.free_memory_mb >= 0):
            raise ValueError(f"free_memory_mb must be a number >= 0, got {self.free_memory_mb!r}")
        if self.cpu_temp_c is not None and not math.isfinite(self.cpu_temp_c):
            raise ValueError(f"cpu_temp_c must be finite or None, got {self.cpu_temp_c!r}")


@runtime_checkable
class Platform(Protocol):
    """Anything that can report the device's current state; reads should be cheap (< 10 ms)."""

    def read(self) -> PlatformState: ...


_SETTABLE = tuple(f.name for f in dataclasses.fields(PlatformState) if f.name != "at")


class StaticPlatform:
    """A platform whose readings are whatever was last `set`; for tests and the simulator.

    Thread-safe: a simulator thread may change the state while a training thread reads it.
    The default is the ideal device (mains-powered, wired, idle, cool, plenty of memory).
    `at` is stamped from `clock` at each read, so a simulator can pass its virtual clock.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, **fields: Any) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {
            "battery_percent": None,
            "charging": True,
            "network": NetworkType.WIRED,
            "metered": False,
            "link_up": True,
            "idle": True,
            "free_memory_mb": 1024.0,
            "cpu_temp_c": None,
        }
        self.reads = 0
        self.set(**fields)

    def set(self, **fields: Any) -> None:
        """Change some readings, e.g. `set(charging=False, battery_percent=40)`."""
        unknown = set(fields) - set(_SETTABLE)
        if unknown:
            raise ValueError(f"unknown platform field(s) {sorted(unknown)}; settable: {', '.join(_SETTABLE)}")
        with self._lock:
            merged = {**self._fields, **fields}
            PlatformState(**merged, at=0.0)  # validate before committing
            self._fields = merged

    def read(self) -> PlatformState:
        with self._lock:
            self.reads += 1
            return PlatformState(**self._fields, at=self._clock())
