"""When a device may train: the user must never notice federated learning.

Like Gboard, a device trains only when it is plugged in, on an unmetered network, idle, cool
and not short of memory, so training costs the user neither battery, nor data plan, nor a
sluggish phone. The policy is a small frozen dataclass a fleet can tune from a config dict;
`EligibilityMonitor` re-checks it cheaply while training runs and says when to stop.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_client.platform import NetworkType, Platform, PlatformState

log = logging.getLogger(__name__)


class Reason(str, enum.Enum):
    """Why a device is not eligible; reported in check-ins and logs."""

    NOT_CHARGING = "not_charging"
    METERED_NETWORK = "metered_network"
    NO_NETWORK = "no_network"
    NOT_IDLE = "not_idle"
    BATTERY_LOW = "battery_low"
    TOO_HOT = "too_hot"
    LOW_MEMORY = "low_memory"
    STATE_NOT_WRITABLE = "state_not_writable"  # the update could not be kept until the broker has it


@dataclass(frozen=True)
class Decision:
    eligible: bool
    reasons: tuple[Reason, ...]

    def __bool__(self) -> bool:
        return self.eligible

    def describe(self) -> str:
        return "eligible" if self.eligible else "not eligible: " + ", ".join(r.value for r in self.reasons)


@dataclass(frozen=True)
class EligibilityPolicy:
    """The rules; every rule is checked on its own and all failures are reported.

    - `require_charging`: on external power (a device without battery always is).
    - `min_battery_percent`: applies whenever the device has a battery, charging or not, as
      in Gboard (plugged in AND above a floor): a phone plugged in at 5 % should charge
      first. With `require_charging=False` it is the only battery guard. 0 disables it.
    - `require_unmetered`: not on cellular or an interface marked metered. A network whose
      type is UNKNOWN is reported metered by the platform, so it blocks too (cautious).
    - `require_idle`: the device is idle. While training (`check(..., training=True)`) this
      rule is skipped: training itself loads the CPU, so the load-based idle signal would
      stop every run it started. The other rules (power, network, heat, memory) stay on.
    - `max_cpu_temp_c`: hottest sensor strictly above this blocks; unknown temperature passes.
    - `min_free_memory_mb`: memory left for the user's apps; the same floor holds during
      training because that is exactly when the rest of the system needs it.
    - A link that is down (or network NONE) always blocks: `no_network`.
    """

    require_charging: bool = True
    require_unmetered: bool = True
    require_idle: bool = True
    min_battery_percent: float = 20.0
    max_cpu_temp_c: float = 70.0
    min_free_memory_mb: float = 200.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"eligibility policy: {f.name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"eligibility policy: {f.name} must be a finite number, got {value!r}")
            else:
                object.__setattr__(self, f.name, float(value))
        if not 0.0 <= self.min_battery_percent <= 100.0:
            raise ValueError(
                f"eligibility policy: min_battery_percent must be in [0, 100], got {self.min_battery_percent}"
            )
        if self.min_free_memory_mb < 0:
            raise ValueError(f"eligibility policy: min_free_memory_mb must be >= 0, got {self.min_free_memory_mb}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EligibilityPolicy:
        """Build from a config dict; unknown keys and wrong types are a ValueError naming the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"eligibility policy must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"eligibility policy: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, state: PlatformState, *, training: bool = False) -> Decision:
        reasons: list[Reason] = []
        if self.require_charging and not state.charging:
            reasons.append(Reason.NOT_CHARGING)
        if state.battery_percent is not None and state.battery_percent < self.min_battery_percent:
            reasons.append(Reason.BATTERY_LOW)
        if not state.link_up or state.network is NetworkType.NONE:
            reasons.append(Reason.NO_NETWORK)
        elif self.require_unmetered and state.metered:
            reasons.append(Reason.METERED_NETWORK)
        if self.require_idle and not training and not state.idle:
            reasons.append(Reason.NOT_IDLE)
        if state.cpu_temp_c is not None and state.cpu_temp_c > self.max_cpu_temp_c:
            reasons.append(Reason.TOO_HOT)
        if state.free_memory_mb < self.min_free_memory_mb:
            reasons.append(Reason.LOW_MEMORY)
        return Decision(eligible=not reasons, reasons=tuple(reasons))

    def allows_download(self, state: PlatformState) -> bool:
        """Whether the device may fetch what only serves it (the int8 suggestion model): the
        network rule alone, since a download costs the data plan but neither battery nor CPU."""
        if not state.link_up or state.network is NetworkType.NONE:
            return False
        return not (self.require_unmetered and state.metered)


class EligibilityMonitor:
    """Watches the policy during training; `should_stop` is meant as a per-step callback.

    The platform is read at most once per `check_interval_s` (reads touch a dozen files),
    so calling `should_stop` after every training step costs nothing. Once it has said
    stop it keeps saying stop (a run never resumes half-way) and `stop_reasons` tells why,
    until `reset()` before the next run.
    """

    def __init__(
        self,
        platform: Platform,
        policy: EligibilityPolicy | None = None,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_interval_s < 0:
            raise ValueError(f"check_interval_s must be >= 0, got {check_interval_s}")
        self.platform = platform
        self.policy = policy or EligibilityPolicy()
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._last: Decision | None = None
        self._stop_reasons: tuple[Reason, ...] = ()

    def check_now(self, *, training: bool = True) -> Decision:
        """Read the platform now and judge it (bypasses the cache, updates it)."""
        decision = self.policy.check(self.platform.read(), training=training)
        with self._lock:
            self._checked_at = self._clock()
            self._last = decision
            if training and not decision.eligible and not self._stop_reasons:
                self._stop_reasons = decision.reasons
                log.info("stopping training: %s", decision.describe())
        return decision

    def should_stop(self) -> bool:
        """True once the device stopped being eligible during this run."""
        with self._lock:
            if self._stop_reasons:
                return True
            fresh = self._checked_at is not None and self._clock() - self._checked_at < self.check_interval_s
        if not fresh:
            self.check_now(training=True)
        with self._lock:
            return bool(self._stop_reasons)

    @property
    def stop_reasons(self) -> tuple[Reason, ...]:
        """Why training was stopped; () if it was not."""
        with self._lock:
            return self._stop_reasons

    @property
    def last_decision(self) -> Decision | None:
        with self._lock:
            return self._last

    def reset(self) -> None:
        """Forget the cached reading and the stop; call before a new training run."""
        with self._lock:
            self._checked_at = None
            self._last = None
            self._stop_reasons = ()
