"""How fast a device trains, how much memory it leaves, and how hot training makes it.

Devices differ in speed by a lifelong factor (lognormal around the profile's median): one
training step lasts `base_step_s * factor` simulated seconds, so a slow phone needs
proportionally longer and meets the round deadline less often. Heat builds up while training
and decays afterwards (first-order, time constant `heat_tau_s`), which is what makes cheap
phones hit the `too_hot` rule on long runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ComputeSpec:
    """Speed, memory and heat of one kind of device.

    - `factor_median`, `factor_sigma`: the step-time factor is median x exp(sigma x N(0, 1)).
    - `free_memory_mb`: memory free for training when the user does nothing; `active_memory_mb`
      of it is taken by the user's apps while the device is in use.
    - `temp_idle_c`: CPU temperature at rest; training heats it towards
      `temp_idle_c + temp_training_rise_c` with time constant `heat_tau_s` (and cools the same way).
    """

    factor_median: float = 1.0
    factor_sigma: float = 0.3
    free_memory_mb: float = 1500.0
    active_memory_mb: float = 600.0
    temp_idle_c: float = 32.0
    temp_training_rise_c: float = 14.0
    heat_tau_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.factor_median > 0:
            raise ValueError(f"factor_median must be > 0, got {self.factor_median}")
        for name in ("factor_sigma", "free_memory_mb", "active_memory_mb", "temp_training_rise_c"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.heat_tau_s > 0:
            raise ValueError(f"heat_tau_s must be > 0, got {self.heat_tau_s}")
        if not -40.0 <= self.temp_idle_c <= 120.0:
            raise ValueError(f"temp_idle_c must be in [-40, 120], got {self.temp_idle_c}")

    def factor_from(self, z: float) -> float:
        """The speed factor of a device whose standard-normal draw is `z`."""
        return float(self.factor_median * math.exp(self.factor_sigma * z))

    def draw_factor(self, rng: np.random.Generator) -> float:
        return self.factor_from(rng.standard_normal())


class Thermal:
    """CPU heat in [0, 1] (0 = at rest, 1 = hottest training) at the last update time."""

    __slots__ = ("spec", "_heat", "_t")

    def __init__(self, spec: ComputeSpec, start_s: float) -> None:
        self.spec = spec
        self._heat = 0.0
        self._t = start_s

    def temp_at(self, t: float) -> float:
        dt = max(t - self._t, 0.0)
        heat = self._heat * math.exp(-dt / self.spec.heat_tau_s)
        return self.spec.temp_idle_c + heat * self.spec.temp_training_rise_c

    def trained(self, end_s: float, seconds: float) -> None:
        """Record `seconds` of training that ended at `end_s`."""
        start = end_s - seconds
        cooled = self._heat * math.exp(-max(start - self._t, 0.0) / self.spec.heat_tau_s)
        self._heat = 1.0 - (1.0 - cooled) * math.exp(-seconds / self.spec.heat_tau_s)
        self._t = max(end_s, self._t)
