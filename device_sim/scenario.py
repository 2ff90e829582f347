"""Scenarios: a whole simulated deployment in one TOML file (read with stdlib `tomllib`).

A scenario says what fleet to simulate (how many devices, which kinds in which shares, any
profile numbers changed), what they type (corpus and how users map to devices), how rounds
run, how fast simulated time goes and which failures to inject. Loading is strict: an
unknown key, a wrong type or shares that do not sum to 1 is a `ScenarioError` that names the
file and the dotted key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from device_sim.clock import Clock, ManualClock, VirtualClock, parse_start
from device_sim.profiles import (ALIASES, BUILTIN_PROFILES, DeviceProfile, FleetMember, ProfileError, apply_overrides,
                                 make_fleet, normalize_composition, shard)
from device_sim.timeline import check_seed
from edge_client.eligibility import EligibilityPolicy

log = logging.getLogger(__name__)

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
CORPUS_FORMATS = ("speakers", "tsv", "jsonl", "dir", "builtin")


class ScenarioError(ValueError):
    """A scenario that cannot be used; says which file and which key, and what to do."""

    def __init__(self, problem: str, *, path: str | Path | None = None, key: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.key = key
        where = " ".join(filter(None, [self.path and f"{self.path}:", key and f"{key}:"]))
        super().__init__(f"{where} {problem}" if where else problem)


@dataclass(frozen=True)
class FleetSpec:
    """`devices` in total; `composition` = ((profile name, share), ...) summing to 1."""

    devices: int = 100
    composition: tuple[tuple[str, float], ...] = (("phone", 1.0),)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")


@dataclass(frozen=True)
class CorpusSpec:
    """What the devices type and how users map to devices.

    `path` = None (or format "builtin") uses the synthetic keyboard corpus with `n_users`
    users. Each device holds `users_per_device` users' text; with more devices than user
    groups and `reuse_users`, groups are dealt out again (two devices then type alike).
    """

    path: str | None = None
    format: str | None = None
    n_users: int = 300
    users_per_device: int = 1
    reuse_users: bool = True
    vocab_size: int = 5000
    seq_len: int = 20

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in CORPUS_FORMATS:
            raise ValueError(f"format must be one of {', '.join(CORPUS_FORMATS)}, got {self.format!r}")
        if self.format == "builtin" and self.path is not None:
            raise ValueError("the builtin corpus takes no path; drop `path` or set another format")
        for name in ("n_users", "users_per_device", "vocab_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def builtin(self) -> bool:
        return self.path is None

    def read(self, seed: int = 0):  # -> models.corpus.Corpus (imported lazily: no TF here)
        """Read the corpus this spec names."""
        from models.corpus import read_corpus
        from models.synthetic import synthetic_corpus

        if self.builtin:
            return synthetic_corpus(n_users=self.n_users, seed=seed)
        return read_corpus(self.path, None if self.format == "builtin" else self.format, seed=seed)

    def assign_users(self, users: Sequence[str], n_devices: int, seed: int = 0) -> list[tuple[str, ...]]:
        """The users whose text device i holds, for i in range(n_devices); deterministic.

        Users are cut into groups of `users_per_device` in their given order; the groups are
        dealt to devices in a seeded random order, cycling when devices outnumber groups
        (only with `reuse_users`).
        """
        if not users:
            raise ValueError("the corpus has no user to give a device")
        k = self.users_per_device
        groups = [tuple(users[i:i + k]) for i in range(0, len(users), k)]
        if n_devices > len(groups) and not self.reuse_users:
            raise ValueError(f"{n_devices} devices but only {len(groups)} groups of {k} user(s); "
                             "set corpus.reuse_users = true, lower users_per_device, or use a larger corpus")
        order = np.random.default_rng([check_seed(seed), 0xC0AB05]).permutation(len(groups))
        return [groups[int(order[i % len(groups)])] for i in range(n_devices)]


@dataclass(frozen=True)
class RoundsSpec:
    """How rounds run; durations are SIMULATED seconds (the simulator divides by the speedup).

    The aggregator and the real training run on the wall clock, so the windows must also be
    long enough in wall seconds: at speedup 600 the default check-in window (1800 s) is 3 wall
    seconds and the deadline (9000 s) 15. `Scenario.timing_warnings()` says when they are not.
    """

    rounds: int = 10
    clients_per_round: int = 20
    over_selection: float = 1.3
    deadline_s: float = 9000.0
    checkin_window_s: float = 1800.0
    min_reports: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ValueError("rounds and clients_per_round must be >= 1")
        if not 1.0 <= self.over_selection <= 10.0:
            raise ValueError(f"over_selection must be in [1, 10] (1.3 = select 30 % more), got {self.over_selection}")
        if not (self.deadline_s > 0 and self.checkin_window_s > 0):
            raise ValueError("deadline_s and checkin_window_s must be > 0")
        if not 0 <= self.min_reports <= self.clients_per_round:
            raise ValueError(f"min_reports must be in 0..clients_per_round, got {self.min_reports}")


@dataclass(frozen=True)
class ClockSpec:
    """`speedup` sim seconds per wall second; `start` as "monday 22:00" (UTC) or ISO 8601."""

    speedup: float = 600.0
    start: str = "monday 00:00"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        parse_start(self.start)

    @property
    def start_s(self) -> float:
        return parse_start(self.start)


@dataclass(frozen=True)
class TrainingSpec:
    """What a selected device does; `base_step_s` is one training step of a speed-1 device
    in simulated seconds (each device multiplies it by its own speed factor)."""

    local_epochs: int = 1
    client_lr: float = 1.0
    batch_size: int = 16
    codec: str = "q8"
    base_step_s: float = 1.0
    max_steps: int = 0

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("local_epochs and batch_size must be >= 1, max_steps >= 0")
        if not (math.isfinite(self.client_lr) and self.client_lr > 0 and self.base_step_s > 0):
            raise ValueError("client_lr and base_step_s must be > 0")
        from protocol.codec import parse_codec

        try:
            parse_codec(self.codec)
        except ValueError as exc:
            raise ValueError(f"codec {self.codec!r} is not valid: {exc}") from None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    fleet: FleetSpec
    profiles: Mapping[str, DeviceProfile]
    corpus: CorpusSpec = CorpusSpec()
    rounds: RoundsSpec = RoundsSpec()
    clock: ClockSpec = ClockSpec()
    training: TrainingSpec = TrainingSpec()
    eligibility: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    path: Path | None = None

    def composition(self) -> list[tuple[DeviceProfile, float]]:
        return normalize_composition(self.fleet.composition, self.profiles)

    def make_fleet(self) -> list[FleetMember]:
        """Every device of the fleet: (index, profile), deterministic from the seed."""
        return make_fleet(self.fleet.composition, self.fleet.devices, self.seed, profiles=self.profiles)

    def make_clock(self, *, manual: bool = False) -> Clock:
        """A VirtualClock at the scenario's speed and start (a ManualClock for tests)."""
        if manual:
            return ManualClock(self.clock.start_s, speedup=self.clock.speedup)
        return VirtualClock(self.clock.speedup, self.clock.start_s)

    def make_platforms(self, clock: Clock, *, shard_of: tuple[int, int] | None = None) -> list:
        """A SimulatedPlatform per device (of this shard `(i, n)` only, when given)."""
        from device_sim.sim_platform import SimulatedPlatform

        members = self.make_fleet()
        if shard_of is not None:
            members = shard(members, *shard_of)
        return [SimulatedPlatform(m.profile, clock, self.seed, m.index, base_step_s=self.training.base_step_s)
                for m in members]

    def wall_seconds(self, sim_s: float) -> float:
        """Wall seconds of `sim_s` simulated seconds at this scenario's speedup."""
        return sim_s / self.clock.speedup

    def timing_warnings(self, *, min_checkin_wall_s: float = 1.0, min_deadline_wall_s: float = 5.0) -> list[str]:
        """Round windows too short in WALL time for real MQTT and real training to fit."""
        out = []
        checkin, deadline = self.wall_seconds(self.rounds.checkin_window_s), self.wall_seconds(self.rounds.deadline_s)
        if checkin < min_checkin_wall_s:
            out.append(f"rounds.checkin_window_s = {self.rounds.checkin_window_s:g} sim s is only {checkin:.2f} wall s "
                       f"at speedup {self.clock.speedup:g}; devices may not manage to check in")
        if deadline < min_deadline_wall_s:
            out.append(f"rounds.deadline_s = {self.rounds.deadline_s:g} sim s is only {deadline:.2f} wall s at speedup "
                       f"{self.clock.speedup:g}; the shared interpreter pool may not train the cohort in time")
        return out

    def summary(self) -> dict[str, Any]:
        """The scenario as plain data, for the run report."""
        return {
            "name": self.name, "description": self.description, "seed": self.seed,
            "path": None if self.path is None else str(self.path),
            "fleet": {"devices": self.fleet.devices, "composition": dict(self.fleet.composition)},
            "profiles": {name: dataclasses.asdict(p) for name, p in self.profiles.items()
                         if name in dict(self.fleet.composition)},
            "corpus": dataclasses.asdict(self.corpus), "rounds": dataclasses.asdict(self.rounds),
            "clock": {**dataclasses.asdict(self.clock), "start_s": self.clock.start_s},
            "training": dataclasses.asdict(self.training), "eligibility": self.eligibility.to_dict(),
        }


_TOP_KEYS = ("name", "description", "seed", "fleet", "profiles", "network", "corpus", "rounds", "clock",
             "training", "failures", "eligibility")


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file (a built-in name such as "iot-pis" works too)."""
    p = resolve_scenario(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioError("file not found; built-in scenarios: " + ", ".join(sorted(builtin_scenarios())),
                            path=p) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"not valid TOML: {exc}", path=p) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=p) from None
    except (ValueError, RecursionError) as exc:  # tomllib: a 4,300+ digit integer, arrays nested too deep
        raise ScenarioError(f"not valid TOML: {str(exc)[:200]}", path=p) from None
    return parse_scenario(data, path=p)


def parse_scenario(data: Mapping[str, Any], *, path: str | Path | None = None) -> Scenario:
    """Build a Scenario from already-parsed TOML data (errors name `path` and the key)."""
    def fail(key: str | None, problem: str) -> ScenarioError:
        return ScenarioError(problem, path=path, key=key)

    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown top-level key; known: {', '.join(_TOP_KEYS)}")
    name = data.get("name", Path(path).stem if path else "scenario")
    description = data.get("description", "")
    seed = data.get("seed", 0)
    for key, value, kind in (("name", name, str), ("description", description, str)):
        if not isinstance(value, kind):
            raise fail(key, f"must be a string, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise fail("seed", f"must be an integer >= 0, got {seed!r}")

    try:
        profiles = _profiles(data, path)
        fleet = _fleet(data.get("fleet", {}), profiles)
        corpus = apply_overrides(CorpusSpec(), data.get("corpus", {}), "corpus")
        rounds = apply_overrides(RoundsSpec(), data.get("rounds", {}), "rounds")
        clock = apply_overrides(ClockSpec(), data.get("clock", {}), "clock")
        training = apply_overrides(TrainingSpec(), data.get("training", {}), "training")
    except ProfileError as exc:
        raise fail(exc.key, exc.problem) from None
    try:
        eligibility = EligibilityPolicy.from_dict(data.get("eligibility", {}))
    except ValueError as exc:
        raise fail("eligibility", str(exc).removeprefix("eligibility policy: ")) from None
    if corpus.path is not None and path is not None:
        resolved = (Path(path).parent / Path(corpus.path).expanduser()).resolve()
        if not resolved.exists():
            raise fail("corpus.path", f"{resolved} does not exist (relative paths start at the scenario's folder)")
        corpus = dataclasses.replace(corpus, path=str(resolved))
    if fleet.devices < rounds.clients_per_round:
        # float(int) overflows for a TOML integer beyond float range: compute the goal in ints
        goal = -(-rounds.clients_per_round * round(rounds.over_selection * 1000) // 1000)
        raise fail("fleet.devices", f"{fleet.devices} devices cannot fill a round of rounds.clients_per_round = "
                   f"{rounds.clients_per_round} (cohort with over-selection: about {goal})")
    scenario = Scenario(name=name, description=description, seed=seed, fleet=fleet,
                        profiles=MappingProxyType(profiles), corpus=corpus, rounds=rounds, clock=clock,
                        training=training, eligibility=eligibility, path=None if path is None else Path(path))
    for warning in scenario.timing_warnings():
        log.warning("%s: %s", path or name, warning)
    return scenario


def _profiles(data: Mapping[str, Any], path: str | Path | None) -> dict[str, DeviceProfile]:
    """Built-ins, then [failures] for all, then [profiles.NAME] and [network.NAME] tables."""
    failures = data.get("failures", {})
    profiles: dict[str, DeviceProfile] = {}
    for name, profile in BUILTIN_PROFILES.items():
        if failures:
            profile = dataclasses.replace(profile, failures=apply_overrides(profile.failures, failures, "failures"))
        profiles[name] = profile
    tables = data.get("profiles", {})
    if not isinstance(tables, Mapping):
        raise ProfileError("profiles", "must be a table of [profiles.NAME] tables")
    for name, table in tables.items():
        where = f"profiles.{name}"
        if not isinstance(table, Mapping):
            raise ProfileError(where, "must be a table")
        table = dict(table)
        canonical = ALIASES.get(name, name)
        base_name = table.pop("base", canonical if canonical in BUILTIN_PROFILES else None)
        if base_name is None:
            raise ProfileError(f"{where}.base", f"a new profile needs base = one of {', '.join(BUILTIN_PROFILES)}")
        if not isinstance(base_name, str) or ALIASES.get(base_name, base_name) not in profiles:
            raise ProfileError(f"{where}.base", f"unknown profile {base_name!r}; known: {', '.join(profiles)}")
        if "name" in table:
            raise ProfileError(f"{where}.name", "the table's name is the profile's name; remove this key")
        base = profiles[ALIASES.get(base_name, base_name)]
        profiles[canonical] = apply_overrides(dataclasses.replace(base, name=canonical), table, where)
    networks = data.get("network", {})
    if not isinstance(networks, Mapping):
        raise ProfileError("network", "must be a table of [network.PROFILE] tables")
    for name, table in networks.items():
        canonical = ALIASES.get(name, name)
        if canonical not in profiles:
            raise ProfileError(f"network.{name}", f"no such profile; known: {', '.join(profiles)}")
        spec = apply_overrides(profiles[canonical].network, table, f"network.{name}")
        profiles[canonical] = dataclasses.replace(profiles[canonical], network=spec)
    return profiles


def _fleet(table: Any, profiles: Mapping[str, DeviceProfile]) -> FleetSpec:
    if not isinstance(table, Mapping):
        raise ProfileError("fleet", "must be a table")
    unknown = sorted(set(table) - {"devices", "composition"})
    if unknown:
        raise ProfileError(f"fleet.{unknown[0]}", "unknown key; known keys: devices, composition")
    devices = table.get("devices", FleetSpec.devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ProfileError("fleet.devices", f"must be an integer >= 1, got {devices!r}")
    composition = table.get("composition", dict(FleetSpec.composition))
    if not isinstance(composition, Mapping) or not composition:
        raise ProfileError("fleet.composition", "must be a table of shares, e.g. { phone = 0.6, pi = 0.3, lowend = 0.1 }")
    pairs = []
    for name, share in composition.items():
        canonical = ALIASES.get(name, name)
        if canonical not in profiles:
            raise ProfileError(f"fleet.composition.{name}", f"no such profile; known: {', '.join(profiles)}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0 \
                or (isinstance(share, int) and share > 1):  # an int beyond float range would overflow below
            raise ProfileError(f"fleet.composition.{name}", f"share must be a number in 0..1, got {share!r}")
        pairs.append((canonical, float(share)))
    total = sum(s for _, s in pairs)
    if abs(total - 1.0) > 1e-6:
        raise ProfileError("fleet.composition", f"shares must sum to 1, got {total:.6g}")
    return FleetSpec(devices=devices, composition=tuple(pairs))


def builtin_scenarios() -> dict[str, Path]:
    """The shipped example scenarios by name (file stem)."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A built-in scenario's file for its name, else the path as given."""
    text = str(name_or_path)
    builtins = builtin_scenarios()
    if text in builtins and not Path(text).exists():
        return builtins[text]
    return Path(name_or_path)
