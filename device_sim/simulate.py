"""`fedboard simulate`: a fleet, an aggregator and a broker in one process, over real MQTT.

Every simulated device is a real `edge_client.DeviceClient` with its own MQTT connection, all
driven by one `MqttHub` thread; they share a bounded pool of TFLite interpreters (one per
core), so memory follows the pool, not the fleet. The global model is evaluated on the pooled
test windows after each round.

Without a scenario every device is always eligible (the quick demo). With `scenario=` each
device gets a `SimulatedPlatform` (battery, charger, link, user, failures on a virtual clock)
plugged in through a `ClientAdapter`: the client's own eligibility policy decides check-ins
and stops training, the simulated radio times (or loses) the upload, and a `FleetRecorder`
turns it all into the report's "fleet" section and PNGs.

`shard=(i, n)` runs only the devices with index % n == i against one external broker; the
aggregator runs in the process of shard 0 unless `aggregator` says otherwise ("none": devices
only, "only": the aggregator alone). Device-only processes stop when the aggregator process
announces the end of the run on `fedboard/<fleet>/sim/done`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from aggregator.config import report_floor
from aggregator.server import Aggregator, AggregatorConfig
from device_sim.broker import BrokerAddress, EmbeddedBroker, parse_broker
from device_sim.byzantine import ByzantineFleet, parse_byzantine
from device_sim.report import machine, peak_rss_mb, plot_accuracy, write_report
from device_sim.round_profile import idle_by_phase
from edge_client.device import DeviceClient, DeviceConfig
from edge_client.mqtt_hub import MqttHub, raise_fd_limit
from edge_client.residuals import ResidualStore
from edge_client.trainer import ArrayWindows, InterpreterPool
from models.bundle_cache import get_or_export_bundle, last_export_peak_rss_mb
from models.config import ModelConfig
from models.corpus import read_corpus
from models.evaluate import evaluate
from models.runtime import LiteRTModel
from models.task import Task, build_task
from protocol.cli_entry import RunInterrupted, check_out_dir
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.signing import ModelTrust, generate_keypair
from protocol.topics import slugify
from protocol.transport import MqttSettings

log = logging.getLogger(__name__)


_AGGREGATOR = AggregatorConfig()


@dataclass(frozen=True)
class SimConfig:
    corpus: str | None = None           # None = the built-in synthetic keyboard corpus
    format: str | None = None
    devices: int = 0                     # 0 = one device per user of the corpus
    rounds: int = 30
    # what the aggregator also runs: its defaults are the one place for these (aggregator/config.py)
    clients_per_round: int = _AGGREGATOR.clients_per_round
    local_epochs: int = _AGGREGATOR.local_epochs
    batch_size: int = _AGGREGATOR.batch_size
    client_lr: float = _AGGREGATOR.client_lr
    codec: str = _AGGREGATOR.codec
    downlink: str = _AGGREGATOR.downlink
    server_optimizer: str = _AGGREGATOR.server_optimizer
    server_lr: float = _AGGREGATOR.server_lr
    aggregation: str = _AGGREGATOR.aggregation
    dp_delta: float = 0.0                # delta of DP-FedAvg's epsilon; 0 = 1 / (10 x devices)
    over_selection: float = _AGGREGATOR.over_selection   # cohort = ceil(clients_per_round * over_selection)
    mu: float = _AGGREGATOR.mu           # FedProx proximal term
    client_clip: float = _AGGREGATOR.client_clip
    downlink_delta: str = ""             # codec of the delta downlink ("" = off)
    seed: int = 0
    vocab_size: int = 5000
    seq_len: int = 20
    embed_dim: int = 96
    units: int = 256
    broker: str | None = None            # HOST:PORT of an external broker; None = embedded amqtt
    mqtt_version: int = 0                # 0 = 3.1.1 for the embedded broker, 5 otherwise
    fleet: str = "sim"
    pool_size: int = 0                   # interpreters; 0 = one per core
    eval_every: int = 1
    report_deadline_s: float = 0.0      # wall seconds; 0 = 600 s, or the scenario's deadline at its speedup
    out: str = "runs/latest"
    progress: bool = True
    # -- realistic fleets (all opt-in) ----------------------------------------------------------
    scenario: str | None = None          # built-in scenario name or TOML path; None = always-eligible devices
    speedup: float = 0.0                 # sim seconds per wall second; 0 = the scenario's clock
    min_reports: int = 0                 # the report floor (0 = the goal at the deadline, never below half of it)
    weight_cap: float = 10.0             # an update weighs at most K x the cohort's median declared examples (0 = off)
    checkin_window_s: float = 0.0        # wall seconds; 0 = 30 s, or the scenario's window at its speedup
    shard: tuple[int, int] | None = None  # (i, n): run only devices with index % n == i
    aggregator: str = "auto"             # "auto" (shard 0 or unsharded), "none", "only"
    timelines: int = 8                   # devices whose full event timelines go into the report
    secure_aggregation: bool = False     # the aggregator learns only the cohort's sum (aggregator/secure_round.py)
    secagg_bits: int = 32                # ring of the secure sum: 32, or 16 for half the bytes
    update_clip: float = 0.0             # under secure aggregation: devices clip their update to this L2 norm
    byzantine: str = ""                  # e.g. "0.1:mixed": that share of devices corrupt their updates (device_sim/byzantine.py)

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.devices < 0:
            raise ValueError("--devices must be >= 0")
        parse_codec(self.codec)
        parse_codec(self.downlink)
        parse_byzantine(self.byzantine)
        if self.aggregator not in ("auto", "none", "only"):
            raise ValueError(f"aggregator must be auto, none or only, got {self.aggregator!r}")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise ValueError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")
            if self.broker is None:
                raise ValueError("--shard needs --broker HOST:PORT: all shards must reach one broker")
        if self.speedup < 0 or self.checkin_window_s < 0 or self.report_deadline_s < 0:
            raise ValueError("--speedup, --checkin-window-s and --deadline-s must be >= 0 (0 = default)")
        if not 0 <= self.min_reports <= self.clients_per_round:
            raise ValueError(f"--min-reports must be in 0..clients_per_round, got {self.min_reports}")

    @property
    def runs_aggregator(self) -> bool:
        if self.aggregator != "auto":
            return self.aggregator == "only"
        return self.shard is None or self.shard[0] == 0

    @property
    def runs_devices(self) -> bool:
        return self.aggregator != "only"


def parse_shard(text: str) -> tuple[int, int]:
    """"1/4" -> (1, 4): this process is shard 1 of 4."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def config_from_scenario(scenario: str, **overrides: Any) -> SimConfig:
    """A SimConfig whose rounds, cohort and training settings are the scenario's, then `overrides`."""
    from device_sim.scenario import load_scenario

    sc = load_scenario(scenario)
    base: dict[str, Any] = dict(
        scenario=scenario, seed=sc.seed, rounds=sc.rounds.rounds, clients_per_round=sc.rounds.clients_per_round,
        over_selection=sc.rounds.over_selection, min_reports=sc.rounds.min_reports,
        local_epochs=sc.training.local_epochs, client_lr=sc.training.client_lr, batch_size=sc.training.batch_size,
        codec=sc.training.codec, vocab_size=sc.corpus.vocab_size, seq_len=sc.corpus.seq_len, fleet=slug_fleet(sc.name),
    )
    base.update(overrides)
    goal = base["clients_per_round"]
    if "min_reports" not in overrides and goal != sc.rounds.clients_per_round and sc.rounds.min_reports:
        # a resized cohort keeps the scenario's share of reports needed to commit at the deadline
        base["min_reports"] = max(1, min(goal, round(sc.rounds.min_reports * goal / sc.rounds.clients_per_round)))
    return SimConfig(**base)


def slug_fleet(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower()) or "sim"


class TimedPool(InterpreterPool):
    """An InterpreterPool that records every lease (wall start, end): the training time.

    A lease covers set_weights, the training steps and get_weights of one device's run, so
    the pool's busy time inside a round is the training work; the rest of the round's wall
    time times the pool size is the simulator's non-training overhead.
    """

    def __init__(self, bundle, size: int = 1, num_threads: int = 1) -> None:
        super().__init__(bundle, size=size, num_threads=num_threads)
        self._intervals: list[tuple[float, float]] = []
        self._busy_lock = threading.Lock()
        self._open: dict[int, float] = {}

    @contextlib.contextmanager
    def lease(self, timeout_s: float | None = None):
        with super().lease(timeout_s) as model:
            start = time.monotonic()
            key = id(model)
            with self._busy_lock:
                self._open[key] = start
            try:
                yield model
            finally:
                end = time.monotonic()
                with self._busy_lock:
                    self._open.pop(key, None)
                    self._intervals.append((start, end))

    def busy_s(self, t0: float, t1: float) -> float:
        """Interpreter-seconds of training inside the wall interval [t0, t1] (monotonic)."""
        with self._busy_lock:
            spans = list(self._intervals) + [(s, t1) for s in self._open.values()]
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)

    def first_lease_after(self, t: float) -> float | None:
        """When the first lease that began at or after `t` began (None: none yet)."""
        with self._busy_lock:
            starts = [a for a, _ in self._intervals if a >= t] + [a for a in self._open.values() if a >= t]
        return min(starts, default=None)


@dataclass
class SimDevice:
    """One simulated device as the simulator holds it (platform and adapter only with a scenario)."""

    device_id: str
    client: DeviceClient
    index: int
    platform: Any = None   # device_sim.sim_platform.SimulatedPlatform
    adapter: Any = None    # device_sim.sim_platform.ClientAdapter


class RoundClock:
    """The scenario's VirtualClock, whose reading can be pinned while a round's fleet checks in.

    `pin()` makes `now()` answer the instant it was pinned at while the underlying clock runs
    on; `unpin()` returns to the running time. `freeze()`/`resume()` stop and restart sim time.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._pinned: float | None = None

    @property
    def start_s(self) -> float:
        return self.inner.start_s

    @property
    def speedup(self) -> float:
        return self.inner.speedup

    @property
    def frozen(self) -> bool:
        return self.inner.frozen

    def now(self) -> float:
        pinned = self._pinned
        return self.inner.now() if pinned is None else pinned

    def wall_seconds(self, sim_s: float) -> float:
        return self.inner.wall_seconds(sim_s)

    def sim_seconds(self, wall_s: float) -> float:
        return self.inner.sim_seconds(wall_s)

    def sleep(self, sim_s: float) -> None:
        self.inner.sleep(sim_s)

    def freeze(self) -> None:
        self.inner.freeze()

    def resume(self) -> None:
        self.inner.resume()

    def pin(self) -> None:
        self._pinned = self.inner.now()

    def unpin(self) -> None:
        self._pinned = None


class _ClockGate:
    """Unpins the round clock when the first device of the current round is selected."""

    def __init__(self, clock: RoundClock) -> None:
        self.clock = clock
        self.round_id = -1

    def on_event(self, name: str, fields: dict) -> None:
        if name == "selected" and fields.get("round") == self.round_id:
            self.clock.unpin()


@dataclass
class _Fleet:
    """What a scenario adds to a run (None members without one)."""

    scenario: Any = None
    clock: Any = None
    recorder: Any = None
    gate: Any = None


def run_simulation(cfg: SimConfig, *, on_start: Callable[[list[SimDevice]], None] | None = None,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the whole simulation and return the report (also written to `cfg.out`).

    `on_start(devices)` is called once every device is connected (tests use it to unplug a
    device mid-run); `on_round(row)` after every round with its report row (benchmarks sample
    memory there).
    """
    wall_start = time.monotonic()
    out_dir = check_out_dir(cfg.out)  # a bad --out fails now, not after the whole run
    fleet = _Fleet()
    if cfg.scenario:
        fleet = _load_fleet(cfg)
        corpus = fleet.scenario.corpus.read(seed=cfg.seed)
    else:
        corpus = read_corpus(cfg.corpus, cfg.format, seed=cfg.seed)
    task = build_task(corpus, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    users = _pick_users(task, cfg)
    requested = cfg
    cfg = fit_cohort(cfg, fleet.scenario.fleet.devices if fleet.scenario else len(users))
    model_config = ModelConfig(vocab_size=task.vocab.size, embed_dim=cfg.embed_dim, units=cfg.units,
                               seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    # exported in a child process on a cache miss: TensorFlow never enters the simulator's memory
    bundle = get_or_export_bundle(model_config, task.vocab.to_json(), seed=cfg.seed, target_counts=task.target_counts(),
                                  in_subprocess=True)
    test_x, test_y = task.pooled_test()
    log.info("task %s: %d users, vocabulary %d, %d test windows, model %s (%d parameters)", corpus.name,
             len(users), task.vocab.size, len(test_x), bundle.model_id, bundle.param_count)

    private_key, public_key = _signing_keys(cfg)
    pool = TimedPool(bundle, size=cfg.pool_size or (os.cpu_count() or 1))
    evaluator = LiteRTModel(bundle, num_threads=os.cpu_count() or 1) if cfg.runs_aggregator else None

    devices: list[SimDevice] = []
    per_round: list[dict[str, Any]] = []
    initial = None  # the initial model's evaluation (round 0)
    byzantine = ByzantineFleet.from_spec(cfg.byzantine, fleet.scenario.fleet.devices if fleet.scenario else len(users),
                                         cfg.seed)
    last = None
    interrupt = _Interrupt()
    with contextlib.ExitStack() as stack:
        stack.push(interrupt)  # the first in, the last out: Ctrl-C lands here once everything has stopped
        n_conn = (fleet.scenario.fleet.devices if fleet.scenario else len(users)) if cfg.runs_devices else 0
        raise_fd_limit(4 * n_conn + 1024)  # before an embedded broker starts: it shares our limit
        address = _broker(cfg, stack)
        mqtt_version = cfg.mqtt_version or (5 if cfg.broker else 3)
        settings = MqttSettings(host=address.host, port=address.port, mqtt_version=mqtt_version, keepalive_s=60)
        state_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedboard-sim-")))
        # twice as many workers as interpreters: while one worker encodes and sends an update (no
        # interpreter needed), another trains, so the interpreters never wait for the codec
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=2 * pool.size, thread_name_prefix="train"))
        hub = stack.enter_context(MqttHub("sim-devices"))
        agg = None
        if cfg.runs_aggregator:
            agg = Aggregator(_aggregator_config(cfg, fleet, len(users)), bundle, settings, private_key,
                             client_id=f"aggregator-{cfg.fleet}")
            agg.start()
            stack.callback(agg.stop)
        if cfg.runs_devices:
            if fleet.scenario is not None:
                devices = _start_fleet(cfg, fleet, task, users, pool, public_key, settings, state_root, executor, hub,
                                       byzantine=byzantine)
            else:
                devices = _start_devices(cfg, task, users, pool, public_key, settings, state_root, executor, hub,
                                         byzantine=byzantine)
            stack.callback(_stop_all, [d.client for d in devices])
            _wait_connected([d.client for d in devices], timeout_s=max(120.0, 0.05 * len(devices)))
            log.info("%d simulated devices connected", len(devices))
        if on_start is not None:
            on_start(devices)

        if agg is None:
            if fleet.clock is not None:
                fleet.clock.resume()  # no aggregator here to pace it: sim time just runs
            _wait_for_done(cfg, settings, hub)
        else:
            assert evaluator is not None
            progress = _progress(cfg)
            stack.callback(progress.close)
            last = _evaluate(evaluator, agg.weights, test_x, test_y)
            log.info("round 0: top-1 %.4f top-3 %.4f", last.top1, last.top3)
            initial = last
            for _ in range(cfg.rounds):
                down_before = sum(d.client.stats.downlink_bytes for d in devices)
                round_id = agg.round_id + 1
                t0 = time.monotonic()
                if fleet.recorder is not None:
                    # Until the cohort is chosen every device reads its sensors at the round's start
                    # instant (sim time itself runs on): the simulator knows exactly how many will
                    # check in, so the window closes on the last one, and the same seed gives the same
                    # check-ins whatever the threads did. The first assignment unpins the readings.
                    fleet.clock.resume()
                    fleet.clock.pin()
                    fleet.gate.round_id = round_id
                    fleet.recorder.round_started(round_id, fleet.clock.now())
                _update_expected_checkins(agg, cfg, fleet, devices)
                result = agg.run_round()
                if byzantine is not None:  # the round's aggregate is kept until the next round starts
                    byzantine.note_aggregate(result.round, getattr(agg, "_aggregate", None))
                t1 = time.monotonic()
                if fleet.clock is not None:
                    fleet.clock.unpin()
                    fleet.clock.freeze()  # evaluation and reporting take no device time
                    fleet.recorder.round_ended(result.round, fleet.clock.now(), result.committed)
                row = result.to_dict()
                row["downlink_bytes"] = sum(d.client.stats.downlink_bytes for d in devices) - down_before
                row["pool_busy_s"] = pool.busy_s(t0, t1)
                row["round_wall_s"] = t1 - t0
                row["pool_size"] = pool.size
                marks = result.phase_marks
                row["idle_by_phase"] = idle_by_phase(pool.busy_s, pool.size, t0, t1, marks, pool.first_lease_after(
                    marks.get("assigned", marks.get("window_closed", t1))))
                if fleet.clock is not None:
                    row["sim_end_s"] = fleet.clock.now()
                if result.round % cfg.eval_every == 0 or result.round == cfg.rounds:
                    last = _evaluate(evaluator, agg.weights, test_x, test_y)
                    row.update(top1=last.top1, top3=last.top3)
                else:
                    row.update(top1=None, top3=None)
                per_round.append(row)
                if on_round is not None:
                    on_round(row)
                progress.update(1)
                progress.set_postfix(top3=f"{last.top3:.4f}", up=f"{result.uplink_bytes / 1e6:.1f}MB",
                                     ok=f"{result.participants}/{result.cohort}")
                _round_line(progress, cfg, row)
            progress.close()
            if cfg.shard is not None or cfg.aggregator == "only":
                _announce_done(cfg, settings, hub)
        if fleet.clock is not None:
            fleet.clock.freeze()

    if interrupt.stopped_by and not per_round:
        raise RunInterrupted(f"no round had finished: no results written to {out_dir}")
    if agg is not None:
        report = _report(cfg, corpus.name, task, bundle, per_round, last, devices, wall_start)
        report["clients_per_round_requested"] = requested.clients_per_round
        if initial is not None:  # what "nothing learned yet" scores: `fedboard tune` checks its baseline beat it
            report["initial_top1"], report["initial_top3"] = initial.top1, initial.top3
    else:
        report = {"task": corpus.name, "devices": len(devices), "shard": list(cfg.shard or (0, 1)),
                  "aggregator": False, "wall_s": time.monotonic() - wall_start, "peak_rss_mb": peak_rss_mb(),
                  **machine()}
    report["config"] = asdict(requested)  # what was asked; the top level says what ran
    report["partial"] = interrupt.stopped_by is not None
    if interrupt.stopped_by:
        report.update(stopped_by=interrupt.stopped_by, rounds=len(per_round), rounds_requested=cfg.rounds)
    if byzantine is not None and agg is not None:
        report["byzantine"] = byzantine.summary()
    if fleet.recorder is not None:
        _add_fleet_section(report, cfg, fleet, devices, out_dir)
    write_report(report, out_dir)
    if agg is not None:
        plot_accuracy(report, out_dir / "accuracy.png")
    log.info("report written to %s", out_dir / "report.json")
    if interrupt.stopped_by:
        plot = ", accuracy.png" if agg is not None else ""
        raise RunInterrupted(f"kept the partial report of {len(per_round)} of {cfg.rounds} rounds: "
                             f"{out_dir / 'report.json'}{plot}")
    return report


class _Interrupt:
    """An ExitStack exit callback that lets Ctrl-C end the rounds but not the run: pushed first, it
    runs after the fleet, the aggregator and the broker have stopped, notes the interrupt and
    swallows it, so the report of the rounds done is still written (marked partial)."""

    def __init__(self) -> None:
        self.stopped_by: str | None = None

    def __call__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.stopped_by = "SIGINT"
            return True
        return False


def fit_cohort(cfg: SimConfig, fleet_size: int) -> SimConfig:
    """`cfg` with at most `fleet_size` clients per round (and reports to commit): a round cannot wait
    for more devices than the fleet has. Says so once, as a warning; the report keeps both numbers."""
    if cfg.clients_per_round <= fleet_size or fleet_size < 1:
        return cfg
    log.warning("--clients-per-round %d is more than the %d device(s) of the fleet: running %d per round",
                cfg.clients_per_round, fleet_size, fleet_size)
    return dataclasses.replace(cfg, clients_per_round=fleet_size, min_reports=min(cfg.min_reports, fleet_size))


def _signing_keys(cfg: SimConfig) -> tuple[object, object]:
    """A fresh Ed25519 key pair; a split fleet (shards, or a separate aggregator process) derives
    it from (fleet, seed) instead, so every process trusts the same aggregator. Simulation only:
    the key is as public as the seed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    if cfg.shard is None and cfg.aggregator == "auto":
        private_pem, public_pem = generate_keypair()
        return load_pem_private_key(private_pem, password=None), load_pem_public_key(public_pem)
    import hashlib

    private = Ed25519PrivateKey.from_private_bytes(
        hashlib.blake2b(f"fedboard-sim/{cfg.fleet}/{cfg.seed}".encode(), digest_size=32).digest())
    return private, private.public_key()


def _load_fleet(cfg: SimConfig) -> _Fleet:
    from device_sim.fleet_report import FleetRecorder
    from device_sim.scenario import load_scenario

    scenario = load_scenario(cfg.scenario)  # type: ignore[arg-type]
    changes: dict[str, Any] = {"seed": cfg.seed} if cfg.seed != scenario.seed else {}
    if cfg.speedup:
        changes["clock"] = dataclasses.replace(scenario.clock, speedup=cfg.speedup)
    if cfg.devices:
        changes["fleet"] = dataclasses.replace(scenario.fleet, devices=cfg.devices)
    if changes:
        scenario = dataclasses.replace(scenario, **changes)
    clock = RoundClock(scenario.make_clock())
    clock.freeze()  # sim time starts with the first round (connecting the fleet takes none)
    return _Fleet(scenario, clock, FleetRecorder(scenario.name), _ClockGate(clock))


def _default_dp_delta(population: int) -> float:
    """DP-FedAvg's delta must be well below 1 / population (a mechanism that publishes one
    device's data outright with probability delta is (0, delta)-DP): 1 / (10 x population)."""
    return 1.0 / (10.0 * max(population, 1))


def _aggregator_config(cfg: SimConfig, fleet: _Fleet, n_users: int) -> AggregatorConfig:
    """Round timing: 30 s / every device without a scenario; the scenario's windows (sim s) on the
    wall clock with one. Ineligible devices never check in, so with a scenario the window closes
    once the devices eligible at the round's start checked in (counted per round by
    `_update_expected_checkins`), or when it ends; never waiting for the whole fleet."""
    if fleet.scenario is None:
        checkin_s, deadline_s, expected = cfg.checkin_window_s or 30.0, cfg.report_deadline_s or 600.0, n_users
    else:
        sc = fleet.scenario
        checkin_s = cfg.checkin_window_s or sc.wall_seconds(sc.rounds.checkin_window_s)
        deadline_s = cfg.report_deadline_s or sc.wall_seconds(sc.rounds.deadline_s)
        expected = 0
    return AggregatorConfig(
        fleet=cfg.fleet, clients_per_round=cfg.clients_per_round, checkin_window_s=checkin_s,
        expected_checkins=expected, report_deadline_s=deadline_s, codec=cfg.codec, min_reports=cfg.min_reports,
        weight_cap=cfg.weight_cap, checkin_patience_s=_checkin_patience(cfg, fleet, n_users),
        downlink=cfg.downlink, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        client_lr=cfg.client_lr, aggregation=cfg.aggregation, server_optimizer=cfg.server_optimizer,
        server_lr=cfg.server_lr, seed=cfg.seed, over_selection=cfg.over_selection, mu=cfg.mu,
        client_clip=cfg.client_clip, downlink_delta=cfg.downlink_delta,
        dp_delta=cfg.dp_delta or _default_dp_delta(n_users if fleet.scenario is None else fleet.scenario.fleet.devices),
        max_steps=fleet.scenario.training.max_steps if fleet.scenario is not None else 0,
        secure_aggregation=cfg.secure_aggregation, secagg_bits=cfg.secagg_bits, update_clip=cfg.update_clip,
    )


def _checkin_patience(cfg: SimConfig, fleet: _Fleet, n_users: int) -> float:
    """How long a window below the report floor waits for more devices. Always-eligible devices
    all come back, so the round waits for them (as `fedboard aggregator` does); a scenario pins
    its devices' readings until the cohort is chosen, so nobody new can become eligible: there
    the round is abandoned instead. A fleet smaller than the floor could never fill a round."""
    return math.inf if fleet.scenario is None and n_users >= report_floor(cfg.clients_per_round, cfg.min_reports) \
        else 0.0


def _update_expected_checkins(agg: Aggregator, cfg: SimConfig, fleet: _Fleet, devices: list[SimDevice]) -> None:
    """With a scenario and the whole fleet in this process: expect exactly the devices that will
    check in as soon as they get the plan, so the window closes on the last of them instead of
    running to its end.

    The readings are pinned at the round's start, so "eligible now" is what each client will
    decide. Devices pace steering keeps away do not hear plans (they subscribe again when their
    retry_after runs out) and sit out plans before the round they are expected back for
    (`DeviceClient.will_answer`); one whose retry runs out during the window is welcome, but
    the window does not wait for it (up to the whole window, the trainers idle). The aggregator subtracts the devices it
    steered away from `expected_checkins`, so they are added back as the aggregator counts them
    (not as the devices do: a device hears its retry_after later than it was decided, so its
    own retry runs out a little later). Without pace steering the check-ins are exactly the
    eligible devices; with it, a device whose retry runs out early in the window may take the
    place of a slow one among the last few. A sharded fleet's other devices are out of sight:
    it keeps expected_checkins = 0.
    """
    if fleet.scenario is None or cfg.shard is not None or not devices:
        return
    policy = fleet.scenario.eligibility
    next_round = agg.round_id + 1
    now_eligible = sum(1 for d in devices if d.client.will_answer(next_round)
                       and policy.check(d.platform.read(), training=False).eligible)
    agg.config = dataclasses.replace(agg.config, expected_checkins=max(now_eligible, 1) + agg.steered_away_now())


def _pick_users(task: Task, cfg: SimConfig) -> list[str]:
    users = sorted(u for u, d in task.devices.items() if d.n_train > 0)
    if cfg.devices and not cfg.scenario:
        rng = np.random.default_rng(cfg.seed)
        users = sorted(rng.choice(users, size=min(cfg.devices, len(users)), replace=False).tolist())
    if not users:
        raise ValueError("no user of the corpus has any training window")
    return users


def _broker(cfg: SimConfig, stack: contextlib.ExitStack) -> BrokerAddress:
    if cfg.broker:
        return parse_broker(cfg.broker)
    return stack.enter_context(EmbeddedBroker()).address  # type: ignore[union-attr]


def _start_devices(cfg: SimConfig, task: Task, users: list[str], pool: InterpreterPool, public_key: object,
                   settings: MqttSettings, state_root: Path, executor: ThreadPoolExecutor,
                   hub: MqttHub, byzantine: ByzantineFleet | None = None) -> list[DeviceClient]:
    taken: set[str] = set()
    devices = []
    for user in users:
        data = task.devices[user]
        device_id = slugify(user, taken)
        device = DeviceClient(
            DeviceConfig(fleet=cfg.fleet, device_id=device_id, mqtt=settings, seed=cfg.seed, platform_name="sim"),
            pool, ArrayWindows(data.train_x, data.train_y), ModelTrust(public_key, cfg.fleet, pool.bundle.model_id),
            residuals=ResidualStore(state_root / device_id), executor=executor, hub=hub,
            **(byzantine.client_kwargs(len(devices), device_id) if byzantine is not None else {}),
        )
        device.start()
        devices.append(SimDevice(device_id, device, len(devices)))
    return devices


def _start_fleet(cfg: SimConfig, fleet: _Fleet, task: Task, users: list[str], pool: InterpreterPool,
                 public_key: object, settings: MqttSettings, state_root: Path, executor: ThreadPoolExecutor,
                 hub: MqttHub, byzantine: ByzantineFleet | None = None) -> list[SimDevice]:
    """One DeviceClient per scenario device (of this shard), each with its simulated platform."""
    from device_sim.sim_platform import ClientAdapter

    sc, clock, recorder = fleet.scenario, fleet.clock, fleet.recorder
    assignment = sc.corpus.assign_users(users, sc.fleet.devices, seed=sc.seed)
    platforms = sc.make_platforms(clock, shard_of=cfg.shard)
    for platform in platforms:  # draw today's charging, usage and link timelines now, not in round 1
        platform.read()
    devices = []
    windows_of: dict[tuple[str, ...], ArrayWindows] = {}
    for platform in platforms:
        device_id = f"{slug_fleet(platform.profile.name)}-{platform.index:05d}"
        group = assignment[platform.index]
        windows = windows_of.get(group)
        if windows is None:  # devices typing alike share one copy of the windows
            parts = [task.devices[u] for u in group]
            windows = windows_of[group] = ArrayWindows(np.concatenate([p.train_x for p in parts]),
                                                       np.concatenate([p.train_y for p in parts]))
        adapter = ClientAdapter(platform, sc.eligibility, device_id=device_id)
        recorder.register(device_id, platform.kind, platform)
        device = DeviceClient(
            DeviceConfig(fleet=cfg.fleet, device_id=device_id, mqtt=settings, seed=cfg.seed,
                         platform_name=platform.kind),
            pool, windows, ModelTrust(public_key, cfg.fleet, pool.bundle.model_id),
            residuals=ResidualStore(state_root / device_id), executor=executor, hub=hub,  # on disk: not per-device RAM
            eligibility=adapter.eligibility, before_send=_radio(adapter, clock),
            **_byzantine_or_honest(byzantine, platform.index, device_id,
                                   _chain(fleet.gate.on_event, adapter.on_event, recorder.on_event)),
        )
        device.start()
        devices.append(SimDevice(device_id, device, platform.index, platform, adapter))
    return devices


def _byzantine_or_honest(byzantine: ByzantineFleet | None, index: int, device_id: str,
                         on_event: Callable[[str, dict], None]) -> dict[str, Any]:
    """DeviceClient kwargs: `on_event`, plus the corrupting hook if the device is Byzantine."""
    if byzantine is None:
        return {"on_event": on_event}
    return byzantine.client_kwargs(index, device_id, on_event=on_event)


def _chain(*handlers: Callable[[str, dict], None]) -> Callable[[str, dict], None]:
    def on_event(name: str, fields: dict) -> None:
        for handler in handlers:
            handler(name, fields)

    return on_event


def _radio(adapter: Any, clock: Any) -> Callable[[int, int], tuple[bool, float, str]]:
    """DeviceClient's before_send: the simulated link times the upload from the end of training
    in device time; lost uploads are dropped, the rest published when they would be through."""
    def before_send(round_id: int, nbytes: int) -> tuple[bool, float, str]:
        outcome = adapter.upload(nbytes)
        if not outcome.ok:
            return False, 0.0, outcome.cause or "upload_lost"
        wait_sim = outcome.done_at - clock.now()
        return True, max(0.0, clock.wall_seconds(wait_sim)) if math.isfinite(wait_sim) else 0.0, ""

    return before_send


def _wait_connected(devices: list[DeviceClient], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = sum(1 for d in devices if not d.ready.is_set())
        if waiting == 0:
            return
        time.sleep(0.005)
    raise TimeoutError(f"{waiting} of {len(devices)} simulated devices did not connect within {timeout_s} s")


def _stop_all(devices: list[DeviceClient]) -> None:
    for device in devices:
        device.stop()


def _done_topic(cfg: SimConfig) -> str:
    return f"fedboard/{cfg.fleet}/sim/done"


def _announce_done(cfg: SimConfig, settings: MqttSettings, hub: MqttHub) -> None:
    """Tell device-only shard processes that the last round is over (a retained marker)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-done-{cfg.fleet}-{os.getpid()}",
                         protocol=settings.paho_protocol())
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    hub.add(client, settings.host, settings.port, keepalive=settings.keepalive_s)
    try:
        if connected.wait(10.0):
            info = client.publish(_done_topic(cfg), json.dumps({"rounds": cfg.rounds, "time": time.time()}), qos=1,
                                  retain=True)
            info.wait_for_publish(5.0)
    finally:
        hub.remove(client)


def _wait_for_done(cfg: SimConfig, settings: MqttSettings, hub: MqttHub) -> None:
    """A device-only shard runs until the aggregator's process announces the end of the run.

    Only a live (not retained) marker counts: a retained one is from an earlier run.
    """
    done = threading.Event()

    def on_connect(client: mqtt.Client, *args: object) -> None:
        client.subscribe(_done_topic(cfg), 1)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.retain:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-watch-{cfg.fleet}-{os.getpid()}",
                         protocol=settings.paho_protocol())
    client.on_connect = on_connect
    client.on_message = on_message
    hub.add(client, settings.host, settings.port, keepalive=settings.keepalive_s)
    log.info("shard %s: devices running; waiting for the aggregator's process to finish the run",
             "/".join(map(str, cfg.shard or (0, 1))))
    try:
        while not done.wait(1.0):
            pass
    finally:
        hub.remove(client)


def _add_fleet_section(report: dict[str, Any], cfg: SimConfig, fleet: _Fleet, devices: list[SimDevice],
                       out_dir: Path) -> None:
    from device_sim.fleet_report import plot_fleet, summarize

    stats = {d.device_id: d.client.stats for d in devices}
    picks = [d.device_id for d in devices[:: max(1, len(devices) // max(cfg.timelines, 1))]][: cfg.timelines]
    run = fleet.recorder.finish(device_stats=stats, timelines_for=picks, until_s=fleet.clock.now())
    report["scenario"] = fleet.scenario.summary()
    report["fleet"] = summarize(run)
    report["fleet_cohorts"] = [sorted(r.selected) for r in run.rounds]  # the devices selected, per round
    report["fleet_plots"] = [p.name for p in plot_fleet(run, out_dir)]


def _evaluate(model: LiteRTModel, weights: np.ndarray, x: np.ndarray, y: np.ndarray):
    model.set_weights(weights)
    return evaluate(model, x, y)


def _round_line(progress, cfg: SimConfig, row: dict) -> None:
    """One console line a round (the quiet run's whole story besides warnings), and the same in the log."""
    top = f"top-3 {row['top3']:.4f}" if row.get("top3") is not None else "not evaluated"
    line = (f"round {row['round']}/{cfg.rounds}: {'committed' if row.get('committed', True) else 'ABANDONED'} "
            f"{row.get('participants', 0)}/{row.get('cohort', 0)} reports, {top}, "
            f"up {row.get('uplink_bytes', 0) / 1e6:.2f} MB, down {row.get('downlink_bytes', 0) / 1e6:.1f} MB, "
            f"{row.get('round_wall_s', 0):.1f} s")
    log.info(line)
    if cfg.progress:
        progress.write(line, file=sys.stderr)


def _progress(cfg: SimConfig):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.rounds, desc="rounds", unit="round", disable=not cfg.progress, dynamic_ncols=True)


def float32_update_bytes(dim: int, fleet: str, device: str = "device-000") -> int:
    """What the same update would weigh as raw float32 in the same envelope."""
    payload = parse_codec("f32").encode(np.zeros(dim, np.float32)).payload
    return len(Envelope(Kind.UPDATE, fleet, device, 1, 1, 1, "f32", {"train_loss": 0.0}, payload).encode())


def _report(cfg: SimConfig, corpus_name: str, task: Task, bundle, per_round: list[dict], last, devices,
            wall_start: float) -> dict[str, Any]:
    updates = sum(r["participants"] for r in per_round)
    uplink = sum(r["uplink_bytes"] for r in per_round)
    downlink = sum(r["downlink_bytes"] for r in per_round)
    per_update = uplink / updates if updates else 0.0
    f32_bytes = float32_update_bytes(bundle.param_count, cfg.fleet)
    return {
        "task": f"{corpus_name}-speakers" if cfg.format == "speakers" else corpus_name,
        "model": f"cifg-lstm e{cfg.embed_dim} u{cfg.units} v{task.vocab.size}",
        "model_id": bundle.model_id,
        "params": bundle.param_count,
        "rounds": cfg.rounds,
        "clients_per_round": cfg.clients_per_round,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "client_lr": cfg.client_lr,
        "server_optimizer": cfg.server_optimizer,
        "server_lr": cfg.server_lr,
        "aggregation": cfg.aggregation,
        "codec": parse_codec(cfg.codec).spec,
        "downlink_codec": parse_codec(cfg.downlink).spec,
        "seed": cfg.seed,
        "devices": len(devices),
        "vocab_size": task.vocab.size,
        "top1": last.top1,
        "top3": last.top3,
        "scored_test_positions": last.scored,
        "per_round": [
            {k: r[k] for k in ("round", "top1", "top3", "uplink_bytes", "downlink_bytes", "wall_s", "participants",
                               "dropped", "checkins", "train_loss", "rejected", "committed", "cohort", "pool_busy_s",
                               "round_wall_s", "pool_size", "idle_by_phase", "sim_end_s", "privacy", "secagg")
                if k in r and r[k] != {}}
            for r in per_round
        ],
        "uplink_bytes_total": uplink,
        "downlink_bytes_total": downlink,
        "uplink_bytes_per_update": per_update,
        "float32_bytes_per_update": f32_bytes,
        "compression_ratio": f32_bytes / per_update if per_update else None,
        "bits_per_parameter": 8 * per_update / bundle.param_count if per_update else None,
        "wall_s": time.monotonic() - wall_start,
        "peak_rss_mb": peak_rss_mb(),
        "export_peak_rss_mb": last_export_peak_rss_mb(),  # None: the bundle came from the cache
        "config": asdict(cfg),
        **machine(),
    }
