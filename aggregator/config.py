"""How the aggregator runs rounds: one frozen dataclass, checked when it is built.

Every option has a default that works for the simulator; a deployment sets the durable and
observable parts (checkpoint_dir, metrics_port, metrics_jsonl) and usually the round sizes.
`aggregator.commands` reads the same options from a TOML file and flags.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from aggregator.dp import make_any_aggregator
from aggregator.server_optimizers import make_server_optimizer
from protocol.codec import parse_codec
from protocol.envelope import DEFAULT_MAX_PAYLOAD
from protocol.errors import CodecError
from protocol.topics import check_id


def check_field_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """ValueError naming the key when a value has a type the dataclass field does not take.

    A TOML file can put any type under any key; without this check a string where a number
    belongs would surface as a TypeError from deep inside a range check, naming nothing.
    Keys that are not fields of `cls` are left to the caller's unknown-key check.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is not None and not _has_type(value, hint):
            raise ValueError(f"{where} {key}: expected {_type_name(hint)}, got {_short(value)}")


def _has_type(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numbers.Integral: numpy integers are fine too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        try:
            float(value)
        except OverflowError:
            return False
        return True
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return isinstance(value, (str, PurePath))
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path (string)"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _short(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return reprlib.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def _named_codec(key: str, spec: str) -> Any:
    """parse_codec, with the setting's name in front of what is wrong."""
    try:
        return parse_codec(spec)
    except CodecError as exc:
        raise CodecError(exc.reason, f"{key}: {exc.detail}") from None


def report_floor(clients_per_round: int, min_reports: int) -> int:
    """min_reports, else half the goal: at least 2 (a sum of one is that device's update), at most the goal."""
    if min_reports:
        return min_reports
    return min(clients_per_round, max(2, math.ceil(clients_per_round / 2)))


# Grid range of secure aggregation when devices do not clip: wide enough that local SGD deltas
# (lr 5, per-step clip 5) are not cut, while 32 bits and 20 devices still give a step of 1.5e-7.
DEFAULT_SECAGG_RANGE = 16.0


@dataclass(frozen=True)
class AggregatorConfig:
    """How rounds are run. Durations are wall-clock seconds."""

    fleet: str = "demo"
    # -- rounds (Bonawitz et al. 2019) ------------------------------------------------------
    clients_per_round: int = 20          # the goal count: the round commits when this many reported
    over_selection: float = 1.3          # cohort = ceil(goal * over_selection) of the checked-in devices
    min_reports: int = 0                 # the floor: fewest reports a round commits with (0 = the goal at the
                                         # deadline, never fewer than report_floor(): half the goal, >= 2)
    checkin_window_s: float = 10.0
    checkin_patience_s: float = 0.0      # a window below the floor is extended up to this long (0 = not: the
                                         # round is abandoned; inf = wait for the fleet, `fedboard aggregator`)
    expected_checkins: int = 0           # close the window early once the devices we expect checked in
    report_deadline_s: float = 300.0
    pace_steering: bool = True           # tell unselected devices when to come back
    pace_checkins_per_slot: float = 2.0  # aim for this many check-ins per cohort seat in a window
    pace_max_skip_rounds: int = 8        # never send a device away for longer than this many rounds
    # -- what devices do ---------------------------------------------------------------------
    codec: str = "q8"                    # uplink codec the round asks for
    local_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 5.0               # measured on the benchmark and the built-in corpus (README)
    mu: float = 0.0                      # FedProx proximal term (0 = FedAvg's plain local SGD)
    client_clip: float = 5.0             # devices clip each step's gradient to this global L2 norm (0 = off)
    max_steps: int = 0
    # -- intake and aggregation -----------------------------------------------------------------
    aggregation: str = "mean"            # clip:C|mean, normclip:median*K|krum:f=F,cosine|mean, trimmed:F, median, dp:clip=C,noise=Z,expected=N (DP-FedAvg)
    dp_delta: float = 1e-5               # delta at which DP-FedAvg's epsilon is reported
    server_optimizer: str = "fedadam"    # FedAdam at 0.01: the measured default (README, "Training defaults")
    server_lr: float = 0.01
    server_options: str = ""             # more optimizer settings, e.g. "momentum=0.9" or "tau=1e-3,beta2=0.99"
    max_update_norm: float = 1e3         # intake refuses an update with a larger L2 norm
    weight_cap: float = 10.0             # an update weighs at most K x the cohort's median declared example
                                         # count (0 = no cohort cap); never more than its own check-in declared
    max_payload: int = DEFAULT_MAX_PAYLOAD
    intake_buffer_mb: int = 32           # received, not yet processed messages held in memory
    seed: int = 0
    # -- secure aggregation (aggregator/PRIVACY.md, aggregator/secure_round.py) ---------------
    secure_aggregation: bool = False     # the aggregator learns only the sum of the cohort's updates
    secagg_bits: int = 32                # ring 2^bits: 32 = finer grid, 16 = half the bytes
    secagg_value_range: float = 0.0      # per-coordinate bound of the grid; 0 = update_clip, else 16
    secagg_phase_s: float = 30.0         # deadline of each key / unmask phase (masking has report_deadline_s)
    update_clip: float = 0.0             # devices clip their whole update to this L2 norm; 0 = none (DP: its clip)
    secagg_weighted: bool = True         # weigh by example count inside the secure sum (mean only; DP weighs 1)
    # -- publishing ------------------------------------------------------------------------------
    downlink: str = "f32"                # codec of the full global model
    downlink_delta: str = ""             # codec of the delta downlink ("" = off), e.g. "q8" or "f16|zstd"
    int8_every: int = 0                  # publish the int8 inference model every N versions (0 = off; needs TF)
    # -- durability --------------------------------------------------------------------------------
    checkpoint_dir: str | None = None    # None = no checkpoints (the simulator)
    checkpoint_batch: int = 16           # most updates acknowledged per checkpoint write
    session_expiry_s: int = 86400        # broker keeps our session (and unacked updates) this long
    lease_interval_s: float = 5.0        # fleet lease heartbeat (aggregator/fleet_lease.py; 0 = no lease)
    # -- evaluation and metrics ------------------------------------------------------------------
    eval_every: int = 0                  # run the held-out evaluation hook every N rounds (0 = never)
    metrics_port: int = 0                # Prometheus endpoint (0 = off)
    metrics_host: str = "0.0.0.0"
    metrics_jsonl: str | None = None     # one JSON line per round
    # -- scale-out ---------------------------------------------------------------------------------
    workers: int = 0                     # > 0: coordinator of that many intake workers ($share)
    share_group: str = "fedboard-agg"
    worker_timeout_s: float = 30.0       # how long the coordinator waits for partial sums

    def __post_init__(self) -> None:
        check_field_types(AggregatorConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                          "aggregator setting")
        check_id("fleet", self.fleet)
        check_id("share group", self.share_group)
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if not 0 <= self.min_reports <= self.clients_per_round:
            raise ValueError("min_reports must be in 0..clients_per_round (0 = all of the goal)")
        if not (math.isfinite(self.over_selection) and 1.0 <= self.over_selection <= 10.0):
            raise ValueError(f"over_selection must be in [1, 10] (1.3 = select 30 % more), got {self.over_selection}")
        if not self.checkin_patience_s >= 0:
            raise ValueError(f"checkin_patience_s must be >= 0 (0 = no extension, inf = wait for devices), "
                             f"got {self.checkin_patience_s}")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 0) or 0 < self.weight_cap < 1:
            raise ValueError(f"weight_cap must be 0 (off) or >= 1 (K x the cohort's median example count), "
                             f"got {self.weight_cap}")
        if not (math.isfinite(self.lease_interval_s) and self.lease_interval_s >= 0):
            raise ValueError(f"lease_interval_s must be >= 0 (0 = no fleet lease), got {self.lease_interval_s}")
        for name in ("checkin_window_s", "report_deadline_s", "worker_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.pace_checkins_per_slot >= 1.0:
            raise ValueError("pace_checkins_per_slot must be >= 1")
        if self.pace_max_skip_rounds < 1:
            raise ValueError("pace_max_skip_rounds must be >= 1")
        for name in ("expected_checkins", "int8_every", "eval_every", "workers", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.intake_buffer_mb < 1:
            raise ValueError("intake_buffer_mb must be >= 1")
        if self.checkpoint_batch < 1:
            raise ValueError("checkpoint_batch must be >= 1")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port {self.metrics_port} is not in 0..65535 (0 = off)")
        if not self.mu >= 0:
            raise ValueError(f"mu (FedProx) must be >= 0, got {self.mu}")
        _named_codec("codec", self.codec)
        full = _named_codec("downlink", self.downlink)
        if self.downlink_delta:
            _named_codec("downlink_delta", self.downlink_delta)
            if not full.is_lossless:
                raise ValueError(
                    f"downlink {self.downlink!r} is lossy, and a delta downlink needs a lossless full model "
                    "(devices on either path must end up with the same weights): use downlink 'f32' or "
                    "'f32|zstd' and put the compression in downlink_delta")
        make_any_aggregator(self.aggregation)
        try:
            self.make_server_optimizer()
        except ValueError as exc:  # say which settings, not only what the optimizer refused
            raise ValueError(f"server_optimizer {self.server_optimizer!r} with server_lr {self.server_lr} and "
                             f"server_options {self.server_options!r}: {exc}") from None
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.workers and (not self.aggregation.split("|")[-1].strip().startswith("mean")
                             or make_any_aggregator(self.aggregation).capacity is not None):
            # buffering stages (normclip, krum, trimmed, median) need every update in one place
            raise ValueError(f"scale-out (workers > 0) combines partial sums, so it needs a mean-type "
                             f"aggregation ('mean', 'clip:C|mean'), not {self.aggregation!r}")

    def _check_secure_aggregation(self) -> None:
        from aggregator.dp import DPFedAvgAggregator, is_dp_spec

        if not 2 <= self.secagg_bits <= 32:
            raise ValueError(f"secagg_bits must be in 2..32 (32 or 16 are sensible), got {self.secagg_bits}")
        if not (math.isfinite(self.secagg_value_range) and self.secagg_value_range >= 0):
            raise ValueError(f"secagg_value_range must be >= 0 (0 = update_clip), got {self.secagg_value_range}")
        if not (math.isfinite(self.update_clip) and self.update_clip >= 0):
            raise ValueError(f"update_clip must be >= 0 (0 = none), got {self.update_clip}")
        if not self.secagg_phase_s > 0:
            raise ValueError(f"secagg_phase_s must be > 0, got {self.secagg_phase_s}")
        if self.workers:
            raise ValueError("secure aggregation keeps one masked sum in one process: it cannot run with "
                             "scale-out workers (workers = 0)")
        if is_dp_spec(self.aggregation):
            agg = make_any_aggregator(self.aggregation)
            assert isinstance(agg, DPFedAvgAggregator)
            if agg.config.adaptive:
                raise ValueError("adaptive DP clipping under secure aggregation needs the clipped-count bit in "
                                 "the secure sum, which is not wired: use a fixed clip")
        elif self.aggregation.strip() != "mean":
            raise ValueError(f"secure aggregation yields only the sum of the updates, so aggregation must be "
                             f"'mean' or a DP-FedAvg spec ('dp:...'), not {self.aggregation!r} (no server-side "
                             "clipping, trimming or median without individual updates)")

    # -- derived -------------------------------------------------------------------------------
    def secure_clip(self) -> float:
        """The L2 bound devices clip to under secure aggregation: update_clip, else the DP clip."""
        if self.update_clip:
            return self.update_clip
        from aggregator.dp import DPFedAvgAggregator, is_dp_spec

        if is_dp_spec(self.aggregation):
            agg = make_any_aggregator(self.aggregation)
            if isinstance(agg, DPFedAvgAggregator):
                return float(agg.clip)
        return 0.0

    def secure_weighted(self) -> bool:
        """Example-weighted secure mean: devices add (n x update, n); DP-FedAvg needs weights of 1."""
        from aggregator.dp import is_dp_spec

        return self.secure_aggregation and self.secagg_weighted and not is_dp_spec(self.aggregation)

    def secure_value_range(self) -> float:
        """Per-coordinate range of the secure-sum grid: a clipped update has no coordinate beyond its clip."""
        return self.secagg_value_range or self.secure_clip() or DEFAULT_SECAGG_RANGE

    def cohort_size(self, available: int) -> int:
        """How many of `available` checked-in devices are selected (over-selection included)."""
        want = math.ceil(self.clients_per_round * self.over_selection - 1e-9)
        return max(0, min(available, want))

    def goal(self, cohort: int) -> int:
        """Reports that complete the round early: the target, or all of a smaller cohort."""
        return min(self.clients_per_round, cohort)

    def needed_reports(self, cohort: int) -> int:
        """Fewest reports to commit at the deadline."""
        goal = self.goal(cohort)
        return max(1, min(self.min_reports or goal, goal)) if cohort else 1

    def report_floor(self) -> int:
        """Fewest reports ANY round commits with, however few devices checked in: min_reports, else
        half the goal (at least 2, at most the goal). A round of one device would publish that
        device's update to the whole fleet (aggregator/PRIVACY.md, "Round floor")."""
        return report_floor(self.clients_per_round, self.min_reports)

    def cohort_target(self) -> int:
        """The cohort a round selects when enough devices check in: ceil(goal x over_selection)."""
        return math.ceil(self.clients_per_round * self.over_selection - 1e-9)

    def server_optimizer_kwargs(self) -> dict[str, float]:
        kwargs: dict[str, float] = {"lr": self.server_lr}
        for item in filter(None, (part.strip() for part in self.server_options.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"server_options item {item!r} is not key=value (e.g. 'momentum=0.9')")
            try:
                kwargs[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"server_options {key.strip()}={value!r} is not a number") from None
        return kwargs

    def make_server_optimizer(self):
        return make_server_optimizer(self.server_optimizer, **self.server_optimizer_kwargs())
