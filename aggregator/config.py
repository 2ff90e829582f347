"""How the aggregator runs rounds: one frozen dataclass, checked when it is built.

Every option has a default that works for the simulator; a deployment sets the durable and
observable parts (checkpoint_dir, metrics_port, metrics_jsonl) and usually the round sizes.
`aggregator.commands` reads the same options from a TOML file and flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from aggregator.dp import make_any_aggregator
from aggregator.server_optimizers import make_server_optimizer
from protocol.codec import parse_codec
from protocol.envelope import DEFAULT_MAX_PAYLOAD
from protocol.topics import check_id


@dataclass(frozen=True)
class AggregatorConfig:
    """How rounds are run. Durations are wall-clock seconds."""

    fleet: str = "demo"
    # -- rounds (Bonawitz et al. 2019) ------------------------------------------------------
    clients_per_round: int = 20          # the goal count: the round commits when this many reported
    over_selection: float = 1.3          # cohort = ceil(goal * over_selection) of the checked-in devices
    min_reports: int = 0                 # fewest reports to commit at the deadline; 0 = the goal
    checkin_window_s: float = 10.0
    expected_checkins: int = 0           # close the window early once the devices we expect checked in
    report_deadline_s: float = 300.0
    pace_steering: bool = True           # tell unselected devices when to come back
    pace_checkins_per_slot: float = 2.0  # aim for this many check-ins per cohort seat in a window
    pace_max_skip_rounds: int = 8        # never send a device away for longer than this many rounds
    # -- what devices do ---------------------------------------------------------------------
    codec: str = "q8"                    # uplink codec the round asks for
    local_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 1.0
    mu: float = 0.0                      # FedProx proximal term (0 = FedAvg's plain local SGD)
    client_clip: float = 5.0             # devices clip each step's gradient to this global L2 norm (0 = off)
    max_steps: int = 0
    # -- intake and aggregation -----------------------------------------------------------------
    aggregation: str = "mean"            # clip:C|mean, trimmed:F, median, dp:clip=C,noise=Z,expected=N (DP-FedAvg)
    dp_delta: float = 1e-5               # delta at which DP-FedAvg's epsilon is reported
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    server_options: str = ""             # more optimizer settings, e.g. "momentum=0.9" or "tau=1e-3,beta2=0.99"
    max_update_norm: float = 1e3         # intake refuses an update with a larger L2 norm
    max_payload: int = DEFAULT_MAX_PAYLOAD
    intake_buffer_mb: int = 32           # received, not yet processed messages held in memory
    seed: int = 0
    # -- publishing ------------------------------------------------------------------------------
    downlink: str = "f32"                # codec of the full global model
    downlink_delta: str = ""             # codec of the delta downlink ("" = off), e.g. "q8" or "f16|zstd"
    int8_every: int = 0                  # publish the int8 inference model every N versions (0 = off; needs TF)
    # -- durability --------------------------------------------------------------------------------
    checkpoint_dir: str | None = None    # None = no checkpoints (the simulator)
    checkpoint_batch: int = 16           # most updates acknowledged per checkpoint write
    session_expiry_s: int = 86400        # broker keeps our session (and unacked updates) this long
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
        check_id("fleet", self.fleet)
        check_id("share group", self.share_group)
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if not 0 <= self.min_reports <= self.clients_per_round:
            raise ValueError("min_reports must be in 0..clients_per_round (0 = all of the goal)")
        if not (math.isfinite(self.over_selection) and 1.0 <= self.over_selection <= 10.0):
            raise ValueError(f"over_selection must be in [1, 10] (1.3 = select 30 % more), got {self.over_selection}")
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
        parse_codec(self.codec)
        full = parse_codec(self.downlink)
        if self.downlink_delta:
            parse_codec(self.downlink_delta)
            if not full.is_lossless:
                raise ValueError(
                    f"downlink {self.downlink!r} is lossy, and a delta downlink needs a lossless full model "
                    "(devices on either path must end up with the same weights): use downlink 'f32' or "
                    "'f32|zstd' and put the compression in downlink_delta")
        make_any_aggregator(self.aggregation)
        self.make_server_optimizer()
        if self.workers and not self.aggregation.split("|")[-1].strip().startswith("mean"):
            raise ValueError(f"scale-out (workers > 0) combines partial sums, so it needs a mean-type "
                             f"aggregation ('mean', 'clip:C|mean'), not {self.aggregation!r}")

    # -- derived -------------------------------------------------------------------------------
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
