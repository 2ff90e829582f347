"""How much one device's update may weigh: no more than the aggregator can justify.

FedAvg weighs an update by the example count in its header, which the device writes. A
device claiming 10,000,000 examples owns the weighted mean, and clipping does not help:
`clip:C` bounds an update's norm, not its weight, so the clipped attacker still sets the
direction. The weight is therefore bounded by what devices said at check-in, before anyone
knew who would be selected (aggregator/PRIVACY.md, "Weight bound"):

- its own declaration: a device declares its training windows at check-in, and local training
  counts each window once per epoch, so an update weighs at most windows x local_epochs (and
  max_steps x batch_size when the plan caps the steps). Above that it is capped, not refused:
  the text store of an honest device may grow a little between check-in and training;
- the cohort: at most K x the median of the cohort's allowances (`weight_cap` = K). The median
  moves only if half of the cohort lies, so one device that also declared 10,000,000 at
  check-in weighs like an honest device of K x the median, no more.

DP-FedAvg then gives every device a weight of at most 1 (McMahan et al. 2018), on top of this.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


def allowance(declared_windows: int, *, local_epochs: int, max_steps: int = 0, batch_size: int = 1) -> int:
    """Most examples local training can count from `declared_windows` windows under the plan."""
    examples = max(0, int(declared_windows)) * max(1, int(local_epochs))
    if max_steps > 0:
        examples = min(examples, int(max_steps) * max(1, int(batch_size)))
    return examples


@dataclass(frozen=True)
class WeightBound:
    """The weight limits of one round's cohort, fixed when the cohort is chosen."""

    allowances: Mapping[str, int]     # device -> its own declaration's allowance
    cap: float                        # K x the median allowance of the cohort (inf: no cohort cap)

    @classmethod
    def for_cohort(cls, declared: Mapping[str, int], *, factor: float, local_epochs: int, max_steps: int = 0,
                   batch_size: int = 1) -> "WeightBound":
        """`declared`: cohort device -> training windows its check-in declared; `factor`: K (0 = no cap)."""
        allow = {d: allowance(n, local_epochs=local_epochs, max_steps=max_steps, batch_size=batch_size)
                 for d, n in declared.items()}
        cap = factor * statistics.median(allow.values()) if factor > 0 and allow else math.inf
        return cls(allow, cap)

    def exceeds_declaration(self, device: str, claimed: int) -> bool:
        """True when `claimed` is more than the device's own check-in allows (an honest device
        exceeds it only if its text grew between check-in and training)."""
        return claimed > self.allowances.get(device, 0)

    def weight(self, device: str, claimed: int) -> tuple[float, str]:
        """The weight of `device`'s update claiming `claimed` examples, and '' or why it was cut."""
        own = self.allowances.get(device, 0)
        weight = float(min(claimed, own, self.cap))
        if claimed > own:
            return weight, f"claimed {claimed} examples, its check-in allows {own}"
        if claimed > self.cap:
            return weight, f"claimed {claimed} examples, the cohort cap is {self.cap:g} (weight_cap x median)"
        return weight, ""
