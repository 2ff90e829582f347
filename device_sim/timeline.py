"""What every device model shares: the event record and the deterministic random streams.

Each model draws from its own numpy Generator seeded from (seed, device index, stream, key),
where the key is a local day or a round id. A model can therefore rebuild any day or any round
on demand from nothing but those numbers: the same seed gives the same timeline whatever the
simulator did in between, and no device has to keep its past in memory.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Event(NamedTuple):
    """One state change of one device at sim time `t` (epoch seconds)."""

    t: float
    kind: str
    detail: str = ""


# Event kinds, so reports and tests agree on the spelling.
PLUGGED, UNPLUGGED = "plugged", "unplugged"
WIRED, WIFI, CELLULAR, OFFLINE = "wired", "wifi", "cellular", "offline"
USER_ACTIVE, USER_IDLE = "user_active", "user_idle"
BATTERY_EMPTY = "battery_empty"
TRAINING, UPLOAD, UPLOAD_LOST, APP_KILLED, CRASH = "training", "upload", "upload_lost", "app_killed", "crash"
OVERRIDE = "override"


class Stream(enum.IntEnum):
    """One independent random stream per model, so adding draws to one never shifts another."""

    TRAITS = 0
    CHARGING = 1
    USAGE = 2
    NETWORK = 3
    KILL = 4
    CRASH = 5
    UPLOAD = 6


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def device_rng(seed: int, index: int, stream: Stream, *key: int) -> np.random.Generator:
    """The Generator for one (seed, device, stream, key...) cell; keys must be integers >= 0.

    Day indices can be 0 for 1970; a negative key (never used by the models) is folded to stay
    valid for numpy's SeedSequence.
    """
    words = [int(seed), int(index), int(stream)] + [int(k) * 2 if k >= 0 else -int(k) * 2 - 1 for k in key]
    return np.random.default_rng(words)
