"""Kinds of devices and the make-up of a fleet.

A `DeviceProfile` bundles the specs of every device model (battery, charging, network,
usage, compute, failures, time zones). Three built-ins (phone, Raspberry Pi, low-end phone)
carry defaults picked to look like the field; scenarios override any of their numbers with
`apply_overrides`, which refuses unknown keys and wrong types by name. `make_fleet` turns
shares into exactly-counted, seeded assignments of profiles to device indices.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np

from device_sim.availability import UsageSpec
from device_sim.battery import BatterySpec
from device_sim.charging import ChargingSpec
from device_sim.compute import ComputeSpec
from device_sim.connectivity import NetworkSpec, PerLink
from device_sim.failures import FailureSpec
from device_sim.timeline import check_seed


class ProfileError(ValueError):
    """A bad profile setting; `key` is the dotted path of the offending setting."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True, repr=False)
class DeviceProfile:
    """Everything that makes a kind of device behave the way it does.

    `kind` is what reports group by ("phone", "pi", "lowend" or any custom word);
    `utc_offsets` is ((offset hours, share), ...): each device draws its time zone from it.
    """

    name: str
    kind: str
    battery: BatterySpec = BatterySpec()
    charging: ChargingSpec = ChargingSpec()
    network: NetworkSpec = NetworkSpec()
    usage: UsageSpec = UsageSpec()
    compute: ComputeSpec = ComputeSpec()
    failures: FailureSpec = FailureSpec()
    utc_offsets: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind must be a non-empty string, got {self.kind!r}")
        if not self.utc_offsets:
            raise ValueError("utc_offsets must list at least one (offset, share)")
        for offset, share in self.utc_offsets:
            if not -12.0 <= offset <= 14.0:
                raise ValueError(f"utc_offsets: offset {offset:g} h is outside [-12, +14]")
            if not share >= 0:
                raise ValueError(f"utc_offsets: share of {offset:+g} h must be >= 0, got {share}")
        total = sum(share for _, share in self.utc_offsets)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"utc_offsets shares must sum to 1, got {total:.6g}")
        if not self.battery.present and not self.charging.mains_powered:
            raise ValueError("a device without battery must be mains powered (charging.mains_powered = true)")

    @property
    def has_battery(self) -> bool:
        return self.battery.present

    def __repr__(self) -> str:  # the full spec is long; dataclasses.asdict(profile) shows it
        return f"DeviceProfile({self.name!r}, kind={self.kind!r})"


PHONE = DeviceProfile(
    name="phone", kind="phone",
    battery=BatterySpec(capacity_mah=4000.0, idle_ma=25.0, active_ma=300.0, charge_ma=1500.0, train_ma=600.0,
                        mah_per_mb_wifi=0.07, mah_per_mb_cellular=0.35, initial_percent=(40.0, 95.0)),
    charging=ChargingSpec(overnight_prob=0.85, plug_h=22.5, plug_jitter_h=1.0, unplug_h=7.0, unplug_jitter_h=0.5,
                          desk_prob=0.25, desk_h=13.0, desk_jitter_h=2.0, desk_len_h=1.5),
    network=NetworkSpec(day=PerLink(wifi=0.5, cellular=0.45, offline=0.05),
                        night=PerLink(wifi=0.85, cellular=0.12, offline=0.03),
                        dwell_min=PerLink(wired=720.0, wifi=60.0, cellular=45.0, offline=10.0),
                        bandwidth_mbps=PerLink(wired=100.0, wifi=30.0, cellular=10.0),
                        latency_ms=PerLink(wired=5.0, wifi=20.0, cellular=60.0), bandwidth_sigma=0.5),
    usage=UsageSpec(wake_h=7.0, sleep_h=23.0, active_mean_min=4.0, idle_mean_min=20.0),
    compute=ComputeSpec(factor_median=1.0, factor_sigma=0.3, free_memory_mb=1500.0, active_memory_mb=600.0,
                        temp_idle_c=32.0, temp_training_rise_c=14.0, heat_tau_s=300.0),
    failures=FailureSpec(kill_per_train_min=0.005, crash_per_round=0.01, upload_loss=0.01),
    utc_offsets=((-8.0, 0.12), (-5.0, 0.18), (0.0, 0.12), (1.0, 0.20), (3.0, 0.05), (5.5, 0.13), (8.0, 0.15),
                 (9.0, 0.05)),
)

RASPBERRY_PI = DeviceProfile(
    name="pi", kind="pi",
    battery=BatterySpec(present=False),
    charging=ChargingSpec(mains_powered=True),
    network=NetworkSpec(day=PerLink(wired=0.85, wifi=0.13, offline=0.02), night=None,
                        dwell_min=PerLink(wired=720.0, wifi=360.0, cellular=60.0, offline=20.0),
                        bandwidth_mbps=PerLink(wired=100.0, wifi=20.0, cellular=10.0),
                        latency_ms=PerLink(wired=5.0, wifi=15.0, cellular=60.0), bandwidth_sigma=0.3),
    usage=UsageSpec(wake_h=8.0, wake_jitter_h=0.5, sleep_h=18.0, sleep_jitter_h=0.5, weekend_shift_h=0.0,
                    active_mean_min=3.0, idle_mean_min=45.0),
    compute=ComputeSpec(factor_median=2.0, factor_sigma=0.2, free_memory_mb=900.0, active_memory_mb=200.0,
                        temp_idle_c=45.0, temp_training_rise_c=20.0, heat_tau_s=400.0),
    failures=FailureSpec(kill_per_train_min=0.0, crash_per_round=0.005, upload_loss=0.005),
    utc_offsets=((-5.0, 0.3), (0.0, 0.3), (1.0, 0.4)),
)

LOW_END_PHONE = DeviceProfile(
    name="lowend", kind="lowend",
    battery=BatterySpec(capacity_mah=2500.0, idle_ma=25.0, active_ma=300.0, charge_ma=800.0, train_ma=800.0,
                        mah_per_mb_wifi=0.09, mah_per_mb_cellular=0.45, initial_percent=(20.0, 90.0)),
    charging=ChargingSpec(overnight_prob=0.8, plug_h=23.0, plug_jitter_h=1.5, unplug_h=6.5, unplug_jitter_h=0.75,
                          desk_prob=0.1, desk_h=13.0, desk_jitter_h=2.0, desk_len_h=1.0),
    network=NetworkSpec(day=PerLink(wifi=0.3, cellular=0.6, offline=0.1),
                        night=PerLink(wifi=0.6, cellular=0.3, offline=0.1),
                        dwell_min=PerLink(wired=720.0, wifi=45.0, cellular=60.0, offline=20.0),
                        bandwidth_mbps=PerLink(wired=50.0, wifi=10.0, cellular=3.0),
                        latency_ms=PerLink(wired=10.0, wifi=40.0, cellular=120.0), bandwidth_sigma=0.6),
    usage=UsageSpec(wake_h=6.5, sleep_h=22.5, active_mean_min=6.0, idle_mean_min=25.0),
    compute=ComputeSpec(factor_median=3.5, factor_sigma=0.35, free_memory_mb=450.0, active_memory_mb=300.0,
                        temp_idle_c=36.0, temp_training_rise_c=36.0, heat_tau_s=240.0),
    failures=FailureSpec(kill_per_train_min=0.02, crash_per_round=0.03, upload_loss=0.02),
    utc_offsets=((-3.0, 0.15), (1.0, 0.15), (3.0, 0.10), (5.5, 0.30), (7.0, 0.15), (8.0, 0.15)),
)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (PHONE, RASPBERRY_PI, LOW_END_PHONE)}
ALIASES = {"raspberry-pi": "pi", "rpi": "pi", "raspberrypi": "pi", "low-end": "lowend", "low-end-phone": "lowend"}


def get_profile(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    """A profile by name (built-ins and their aliases, or those in `profiles`)."""
    table = {**BUILTIN_PROFILES, **(profiles or {})}
    key = name if name in table else ALIASES.get(name, name)
    if key not in table:
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(sorted(table))}")
    return table[key]


# ---- strict overrides ------------------------------------------------------------------------
_SHARE_FIELDS = ("day", "night")  # a share table replaces the whole mix; other PerLink tables merge


def apply_overrides(obj: Any, data: Any, where: str) -> Any:
    """A copy of the frozen dataclass `obj` with the settings of `data` (a TOML table) applied.

    Unknown keys, wrong types and values the spec refuses raise `ProfileError(key, problem)`
    with the dotted key under `where`.
    """
    if not isinstance(data, Mapping):
        raise ProfileError(where, f"must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ProfileError(f"{where}.{key}", f"unknown key; known keys: {', '.join(names)}")
        changes[key] = _coerce(key, getattr(obj, key), hints[key], value, f"{where}.{key}")
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as exc:
        # a spec's own check starts its message with the field's name: point at that key
        first = re.match(r"[A-Za-z_]+", str(exc))
        key = f"{where}.{first.group(0)}" if first and first.group(0) in changes else where
        raise ProfileError(key, str(exc)) from None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(where, f"must be a number, got {value!r}")
    try:
        number = float(value)  # an integer beyond float range is an OverflowError
    except OverflowError:
        raise ProfileError(where, f"must be a number, got an integer of {value.bit_length()} bits") from None
    if not math.isfinite(number):
        raise ProfileError(where, f"must be a finite number, got {value!r}")
    return number


def _coerce(name: str, current: Any, hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union or str(origin) == "types.UnionType" or type(hint).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if hint is bool:
        if not isinstance(value, bool):
            raise ProfileError(where, f"must be true or false, got {value!r}")
        return value
    if hint is float:
        return _number(value, where)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(where, f"must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ProfileError(where, f"must be a string, got {value!r}")
        return value
    if hint is PerLink:
        if not isinstance(value, Mapping):
            raise ProfileError(where, "must be a table like { wifi = 0.5, cellular = 0.5 }")
        base = PerLink() if (name in _SHARE_FIELDS or current is None) else current
        return apply_overrides(base, value, where)
    if name == "utc_offsets":
        return _utc_offsets(value, where)
    if origin is tuple and args and all(a is float for a in args):
        if not isinstance(value, list) or len(value) != len(args):
            raise ProfileError(where, f"must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return apply_overrides(current, value, where)
    raise ProfileError(where, f"cannot be set from a scenario (type {hint})")  # pragma: no cover


def _utc_offsets(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    """`{ "-5" = 0.3, "+1" = 0.7 }` or `[[-5, 0.3], [1, 0.7]]` -> ((-5.0, 0.3), (1.0, 0.7))."""
    pairs: list[tuple[float, float]] = []
    if isinstance(value, Mapping):
        for key, share in value.items():
            try:
                offset = float(str(key).replace("UTC", "").replace("utc", "") or 0)
            except ValueError:
                raise ProfileError(f"{where}.{key}", "a time-zone key must be an offset in hours like \"-5\" or \"+5.5\"") from None
            pairs.append((offset, _number(share, f"{where}.{key}")))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, list) or len(item) != 2:
                raise ProfileError(f"{where}[{i}]", f"must be [offset_hours, share], got {item!r}")
            pairs.append((_number(item[0], f"{where}[{i}]"), _number(item[1], f"{where}[{i}]")))
    else:
        raise ProfileError(where, "must be a table { \"-5\" = 0.3, \"+1\" = 0.7 } or a list [[-5, 0.3], [1, 0.7]]")
    return tuple(pairs)


# ---- fleets ------------------------------------------------------------------------------------
class FleetMember(NamedTuple):
    index: int
    profile: DeviceProfile


Composition = Union[Mapping[str, float], Sequence[tuple[Union[str, DeviceProfile], float]]]


def allocate(shares: Sequence[float], n: int) -> list[int]:
    """Whole counts summing to `n`, as close to `shares x n` as possible (largest remainder)."""
    if n < 0:
        raise ValueError(f"a fleet cannot have {n} devices")
    exact = [s * n for s in shares]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def normalize_composition(composition: Composition,
                          profiles: Mapping[str, DeviceProfile] | None = None) -> list[tuple[DeviceProfile, float]]:
    """[(profile, share)] from a name->share mapping or a list of (name or profile, share)."""
    items = list(composition.items()) if isinstance(composition, Mapping) else list(composition)
    if not items:
        raise ValueError("a fleet composition needs at least one profile")
    out = []
    for entry, share in items:
        profile = entry if isinstance(entry, DeviceProfile) else get_profile(entry, profiles)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0:
            raise ValueError(f"share of {profile.name!r} must be a number >= 0, got {share!r}")
        out.append((profile, float(share)))
    total = sum(s for _, s in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"composition shares must sum to 1, got {total:.6g} "
                         f"({', '.join(f'{p.name}={s:g}' for p, s in out)})")
    return out


def make_fleet(composition: Composition, n: int, seed: int,
               *, profiles: Mapping[str, DeviceProfile] | None = None) -> list[FleetMember]:
    """`n` devices whose profiles follow `composition` exactly (largest remainder), shuffled
    with `seed` so that kinds are interleaved (any contiguous slice or `shard` is a mix)."""
    seed = check_seed(seed)
    items = normalize_composition(composition, profiles)
    counts = allocate([s for _, s in items], n)
    kinds = np.repeat(np.arange(len(items)), counts)
    order = np.random.default_rng([seed, 0xF1EE7]).permutation(kinds)
    return [FleetMember(i, items[int(k)][0]) for i, k in enumerate(order.tolist())]


def shard(fleet: Sequence[FleetMember], i: int, n: int) -> list[FleetMember]:
    """The members that machine `i` of `n` hosts (`--shard i/n`): every n-th device from i."""
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    return [m for m in fleet if m.index % n == i]
