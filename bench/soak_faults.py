"""Fault soak: real Mosquitto, the real `fedboard aggregator` process, real device clients.

    python bench/soak_faults.py all --out runs/soak_faults.json
    python bench/soak_faults.py sigkill --kills 20 --rounds 30
    python bench/soak_faults.py broker-restart mid-upload skewed-clock full-disk

Every scenario runs one small federated task (a tiny CIFG model, so a round takes about a
second) with devices that are `edge_client.DeviceClient`s on one `MqttHub`, each with its
own outbox, and does to it what production does:
- sigkill: `kill -9` of the aggregator at random points of a round (check-in, reporting,
  commit/publish), restarted each time (a supervisor's job);
- broker-restart: Mosquitto (persistence on, its default 30-minute autosave, so the SIGKILL
  loses every retained message and session since start) stopped mid-round with SIGKILL once,
  then SIGTERM, started again on the same port; two device apps restart after the SIGKILL;
- mid-upload: 30 % of each cohort lose their TCP connection in the middle of the update's
  PUBLISH (a proxy forwards half of it, then closes both sides) and reconnect;
- skewed-clock: devices whose wall clock is hours ahead, a day behind, or jumps back and
  forth by hours (in a child process whose `time.time` is shifted), one of them also cut
  mid-upload every round so its outbox has to decide whether the update is still useful;
- full-disk: the aggregator's checkpoint directory is a small tmpfs filled to the last byte
  mid-run (or, without `mount`, the ENOSPC hook of aggregator/checkpoint.py); space is given
  back and the aggregator restarted.

Then the invariants, from the aggregator's own records (ledger.jsonl and model.npz in its
checkpoint directory) and from an observer with a persistent MQTT session: every update the
aggregator acknowledged as accepted is in exactly one committed round (ledger count per round
= the round's participants, no (round, device) twice), committed versions are 1..N with no
gap and no duplicate, the retained model never carries two different payloads for one version,
and the run reaches the target round.

Table columns: faults injected; survived (faults of runs that reached the target round with
every invariant holding); accepted (updates in committed rounds, per the ledger); acked (what
the observer saw acknowledged as accepted: fewer when a broker SIGKILL dropped its session);
lost (acknowledged as accepted but in no committed round); dup ((round, device) or round end
recorded twice); gaps (missing or repeated committed versions); abandoned rounds.
A full disk makes `fedboard aggregator` exit with code 3 after logging what to do; the bench
then restarts it once space is back, as systemd's Restart=on-failure would.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.client import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from aggregator.checkpoint import FAULT_ENV, LEDGER_FILE, load_npz, read_ledger  # noqa: E402
from protocol.envelope import Kind, decode_envelope  # noqa: E402
from protocol.messages import Ack, Assignment, RoundPlan  # noqa: E402
from protocol.model_message import ModelMessage  # noqa: E402
from protocol.topics import FleetTopics  # noqa: E402

log = logging.getLogger("soak_faults")

SCENARIOS = ("sigkill", "broker-restart", "mid-upload", "skewed-clock", "full-disk")
CUT_MIN_BYTES = 1500          # a client->broker chunk this large is an update PUBLISH (check-ins are ~200 B)
SKEWS = {"ahead-2h": ("const", 7200.0), "behind-1d": ("const", -86400.0), "jumping-3h": ("jump", 3 * 3600.0)}


# -- the task ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """The small task every scenario trains: synthetic keyboard users, a tiny CIFG model."""

    devices: int = 10
    seed: int = 0
    vocab_size: int = 96
    embed_dim: int = 8
    units: int = 16
    seq_len: int = 20
    batch_size: int = 16


@functools.lru_cache(maxsize=4)
def build_task_windows(spec: TaskSpec) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """The synthetic task (no TensorFlow): vocabulary and each device's training windows."""
    from models.synthetic import synthetic_corpus
    from models.task import build_task

    task = build_task(synthetic_corpus(n_users=spec.devices, seed=spec.seed, messages_per_user=(20, 40)),
                      vocab_size=spec.vocab_size, seq_len=spec.seq_len)
    windows = {f"dev-{i:02d}": (data.train_x, data.train_y) for i, data in enumerate(task.devices.values())}
    return task, windows


def export_bundle(spec: TaskSpec, path: Path) -> Path:
    """Write the task's training bundle (TensorFlow on a cache miss; cached in FEDBOARD_CACHE)."""
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig

    task, _ = build_task_windows(spec)
    config = ModelConfig(vocab_size=task.vocab.size, embed_dim=spec.embed_dim, units=spec.units,
                         seq_len=spec.seq_len, batch_size=spec.batch_size)
    bundle = get_or_export_bundle(config, task.vocab.to_json(), seed=spec.seed, target_counts=task.target_counts())
    return bundle.write(path)


# -- the broker, the aggregator process ----------------------------------------------------------
def start_broker(workdir: Path, port: int | None = None, autosave_s: int = 1) -> Any:
    """Mosquitto with persistence on. `autosave_s` 1: the database is saved every second (a SIGKILL
    loses <= 1 s); 0: Mosquitto's default (30 min), so a SIGKILL loses every retained message,
    session and queued update since the last clean shutdown, as a production broker would."""
    from device_sim.mosquitto import MosquittoBroker

    extra = f"autosave_interval {autosave_s}\n" if autosave_s else ""
    broker = MosquittoBroker(extra, port=port, persistence=True, workdir=workdir)
    broker.start()
    return broker


@dataclass
class AggregatorProcess:
    """`fedboard aggregator` (python -m aggregator.commands) as a child: SIGKILL is real."""

    argv: list[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log_path = self.log_dir / f"aggregator-{self.starts:03d}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "aggregator.commands", *self.argv], cwd=ROOT, env=env,
                                     stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def wait(self, timeout_s: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def last_log(self) -> str:
        return (self.log_dir / f"aggregator-{self.starts:03d}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("aggregator-*.log")))


# -- the observer: what the fleet was told ------------------------------------------------------
class FleetObserver:
    """Plans, assignments, acks and retained models, over a persistent MQTT 5 session (so it
    misses nothing while the broker restarts, as long as the broker kept the session)."""

    def __init__(self, port: int, fleet: str) -> None:
        self.topics = FleetTopics(fleet)
        self._lock = threading.Lock()
        self.plans: dict[int, RoundPlan] = {}
        self.assignments: dict[int, dict[str, bool]] = defaultdict(dict)
        self.acks: list[tuple[str, Ack]] = []
        self.models: dict[int, set[str]] = defaultdict(set)   # version -> sha256 of the payloads seen
        self.model_order: list[int] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-observer-{fleet}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(15):
            raise TimeoutError("observer could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        root = self.topics.root
        client.subscribe([(self.topics.round, 1), (f"{root}/assign/+", 1), (f"{root}/ack/+", 1),
                          (self.topics.model, 1)])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.round and msg.payload:
                plan = RoundPlan.from_envelope(decode_envelope(msg.payload, expect=Kind.PLAN))
                with self._lock:
                    self.plans[plan.round_id] = plan
            elif "/assign/" in msg.topic:
                a = Assignment.from_envelope(decode_envelope(msg.payload, expect=Kind.ASSIGN))
                with self._lock:
                    self.assignments[a.round_id][msg.topic.rsplit("/", 1)[1]] = a.selected
            elif "/ack/" in msg.topic:
                ack = Ack.from_envelope(decode_envelope(msg.payload, expect=Kind.ACK))
                with self._lock:
                    self.acks.append((msg.topic.rsplit("/", 1)[1], ack))
            elif msg.topic == self.topics.model and msg.payload:
                m = ModelMessage.from_envelope(decode_envelope(msg.payload))
                with self._lock:
                    self.models[m.version].add(hashlib.sha256(m.weights_payload).hexdigest())
                    self.model_order.append(m.version)
        except Exception:  # the observer must never stop observing
            log.exception("observer: cannot read %s", msg.topic)

    # -- queries ---------------------------------------------------------------------------
    def current_round(self) -> int:
        with self._lock:
            return max(self.plans, default=0)

    def cohort(self, round_id: int) -> set[str]:
        with self._lock:
            return {d for d, s in self.assignments.get(round_id, {}).items() if s}

    def accepted(self, round_id: int | None = None) -> set[tuple[int, str]]:
        """(round, device) the aggregator acknowledged as accepted (duplicate acks included)."""
        with self._lock:
            return {(a.round_id, d) for d, a in self.acks if a.accepted and (round_id is None or a.round_id == round_id)}

    def refusals(self) -> list[tuple[str, int, str]]:
        """(device, round, reason) of every update the aggregator refused."""
        with self._lock:
            return [(d, a.round_id, a.reason) for d, a in self.acks if not a.accepted]

    def versions_seen(self) -> dict[int, set[str]]:
        """Model version -> sha256 of every payload published for it (one, unless a bug)."""
        with self._lock:
            return {v: set(s) for v, s in self.models.items()}

    def latest_version(self) -> int:
        with self._lock:
            return max(self.models, default=-1)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the cutting proxy: a connection lost in the middle of the upload ------------------------------
class CuttingProxy:
    """A TCP proxy in front of the broker for ONE device. When `decide(device)` says so, the
    next large client->broker chunk (the update's PUBLISH) is forwarded only half, and both
    sides are closed: the broker sees a torn packet, the device a lost connection, no PUBACK."""

    def __init__(self, device: str, target_port: int, decide: Callable[[str], bool]) -> None:
        self.device, self.target_port, self.decide = device, target_port, decide
        self.cuts = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept_loop, name=f"proxy-{device}", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:  # broker down: the device sees a refused connection and backs off
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upward and len(data) >= CUT_MIN_BYTES and self.decide(self.device):
                    dst.sendall(data[: len(data) // 2])
                    self.cuts += 1
                    log.info("proxy: cut %s mid-upload after %d of %d bytes", self.device, len(data) // 2, len(data))
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()


# -- devices -------------------------------------------------------------------------------------
@dataclass
class DeviceFleet:
    """Real DeviceClients on one hub, each with an outbox; some behind cutting proxies."""

    clients: dict[str, Any]
    hub: Any
    executor: ThreadPoolExecutor
    proxies: dict[str, CuttingProxy]
    make: Callable[[str], Any]

    def restart(self, device: str) -> None:
        """The device's app restarts: a fresh client (no model in memory), the same outbox on disk."""
        self.clients[device].stop()
        self.clients[device] = self.make(device)
        self.clients[device].start()

    def stop(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.stop()
        self.hub.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for proxy in self.proxies.values():
            proxy.close()


def start_devices(spec: TaskSpec, bundle_path: Path, public_key_path: Path, fleet: str, broker_port: int,
                  state_dir: Path, device_ids: list[str] | None = None,
                  cut: Callable[[str], bool] | None = None, cut_devices: set[str] | None = None) -> DeviceFleet:
    """Start the task's devices (or `device_ids` of them); `cut_devices` connect through proxies."""
    from edge_client.device import DeviceClient, DeviceConfig
    from edge_client.mqtt_hub import MqttHub
    from edge_client.outbox import Outbox
    from edge_client.residuals import ResidualStore
    from edge_client.trainer import ArrayWindows, InterpreterPool
    from models.bundle import read_bundle
    from protocol.signing import ModelTrust, load_public_key
    from protocol.transport import MqttSettings

    bundle = read_bundle(bundle_path)
    _, windows = build_task_windows(spec)
    pool = InterpreterPool(bundle, size=1, num_threads=1)
    hub = MqttHub(f"soak-{fleet}").start()
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="soak-train")
    public_key = load_public_key(public_key_path)
    clients: dict[str, Any] = {}
    proxies: dict[str, CuttingProxy] = {}

    def make(device: str) -> Any:
        port = proxies[device].port if device in proxies else broker_port
        settings = MqttSettings(port=port, keepalive_s=10, reconnect_min_s=0.5, reconnect_max_s=4.0)
        x, y = windows[device]
        return DeviceClient(
            DeviceConfig(fleet=fleet, device_id=device, mqtt=settings, seed=spec.seed, keep_model=True,
                         platform_name="soak"),
            pool, ArrayWindows(x, y), ModelTrust(public_key, fleet, bundle.model_id),
            residuals=ResidualStore(state_dir / device), outbox=Outbox(state_dir / device / "outbox"),
            executor=executor, hub=hub)

    for device in device_ids or sorted(windows):
        if cut is not None and cut_devices and device in cut_devices:
            proxies[device] = CuttingProxy(device, broker_port, cut)
        clients[device] = make(device)
        clients[device].start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(c.ready.is_set() for c in clients.values()):
        time.sleep(0.02)
    return DeviceFleet(clients, hub, executor, proxies, make)


# -- invariants ----------------------------------------------------------------------------------
@dataclass
class Invariants:
    """What the aggregator's records and the observer say after a run."""

    target_round: int
    last_round: int = 0
    final_version: int = 0
    committed_rounds: int = 0
    abandoned_rounds: int = 0
    updates_accepted: int = 0            # (round, device) in committed rounds of the ledger
    acked_accepted: int = 0              # (round, device) acknowledged as accepted to devices
    updates_lost: int = 0                # acknowledged as accepted, yet in no committed round
    duplicates: int = 0                  # a (round, device) or a round end written twice
    count_mismatches: int = 0            # rounds whose ledger count differs from their participants
    version_gaps: int = 0                # missing or repeated versions among committed rounds
    conflicting_versions: int = 0        # one version published with two different payloads
    observer_missed_versions: int = 0    # versions the observer never saw (informational)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_invariants(checkpoint_dir: Path, observer: FleetObserver, target_round: int) -> Invariants:
    inv = Invariants(target_round)
    ledger = read_ledger(checkpoint_dir / LEDGER_FILE)
    ends = sorted(ledger.ends, key=lambda e: e.round)
    inv.duplicates = len(ledger.repeated)
    if ledger.repeated:
        inv.problems.append(f"ledger keys written twice: {ledger.repeated[:5]}")
    committed = [e for e in ends if e.committed]
    inv.committed_rounds, inv.abandoned_rounds = len(committed), len(ends) - len(committed)
    inv.last_round = ends[-1].round if ends else 0
    versions = [e.version for e in committed]
    expected = list(range(1, len(committed) + 1))
    if versions != expected:
        inv.version_gaps = len(set(expected) ^ set(versions)) + (len(versions) - len(set(versions)))
        inv.problems.append(f"committed versions {versions} are not 1..{len(committed)}")
    rounds = [e.round for e in ends]
    if rounds != list(range(1, len(rounds) + 1)):
        inv.problems.append(f"round ends {rounds} are not 1..{len(rounds)}")
    per_round: dict[int, set[str]] = defaultdict(set)
    for (r, d) in ledger.accepted:
        per_round[r].add(d)
    committed_rounds = {e.round for e in committed}
    for e in committed:
        if len(per_round[e.round]) != e.participants:
            inv.count_mismatches += 1
            inv.problems.append(f"round {e.round}: ledger holds {len(per_round[e.round])} accepted updates, "
                                f"the round committed {e.participants}")
    inv.updates_accepted = sum(len(per_round[r]) for r in committed_rounds)
    acked = observer.accepted()
    inv.acked_accepted = len(acked)
    lost = sorted(k for k in acked if k not in ledger.accepted or k[0] not in committed_rounds)
    inv.updates_lost = len(lost)
    if lost:
        inv.problems.append(f"acknowledged as accepted but in no committed round: {lost[:10]}")
    try:
        model = load_npz(checkpoint_dir / "model.npz")
        inv.final_version = int(model["version"].item())
    except Exception as exc:  # noqa: BLE001 - reported as a problem
        inv.problems.append(f"model checkpoint unreadable: {exc}")
    if committed and inv.final_version != committed[-1].version:
        inv.problems.append(f"model.npz is v{inv.final_version}, the ledger's last commit v{committed[-1].version}")
    seen = observer.versions_seen()
    inv.conflicting_versions = sum(1 for s in seen.values() if len(s) > 1)
    if inv.conflicting_versions:
        inv.problems.append(f"{inv.conflicting_versions} version(s) published with different payloads")
    inv.observer_missed_versions = len(set(range(0, inv.final_version + 1)) - set(seen))
    if observer.latest_version() != inv.final_version:
        inv.problems.append(f"the retained model is v{observer.latest_version()}, the checkpoint v{inv.final_version}")
    if inv.last_round < target_round:
        inv.problems.append(f"the run stopped at round {inv.last_round}, target {target_round}")
    return inv


# -- a scenario run ----------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    round: int            # the round open (per the observer) when the fault hit
    detail: str = ""


@dataclass
class ScenarioResult:
    scenario: str
    command: str
    runs: int = 0
    faults_injected: int = 0
    faults_survived: int = 0
    updates_accepted: int = 0
    acked_accepted: int = 0
    updates_lost: int = 0
    duplicates: int = 0
    version_gaps: int = 0
    rounds: int = 0
    abandoned_rounds: int = 0
    wall_s: float = 0.0
    ok: bool = True
    faults: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add_run(self, inv: Invariants, faults: list[Fault], wall_s: float) -> None:
        self.runs += 1
        self.faults_injected += len(faults)
        # a fault is survived when a later round committed and the run's invariants hold
        survived = [f for f in faults if inv.committed_rounds and inv.last_round >= f.round] if inv.ok else []
        self.faults_survived += len(survived)
        self.updates_accepted += inv.updates_accepted
        self.acked_accepted += inv.acked_accepted
        self.updates_lost += inv.updates_lost
        self.duplicates += inv.duplicates
        self.version_gaps += inv.version_gaps
        self.rounds += inv.last_round
        self.abandoned_rounds += inv.abandoned_rounds
        self.wall_s += wall_s
        self.ok = self.ok and inv.ok
        self.faults.extend(dataclasses.asdict(f) for f in faults)
        self.problems.extend(inv.problems)


@dataclass
class SoakSettings:
    rounds: int = 12
    kills: int = 20
    broker_restarts: int = 3
    disk_fulls: int = 3
    devices: int = 10
    clients_per_round: int = 6
    over_selection: float = 1.5
    min_reports: int = 3
    report_deadline_s: float = 20.0
    cut_fraction: float = 0.3
    broker_autosave_s: int = 0           # 0 = Mosquitto's default (30 min): a SIGKILL loses its state
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False


class SoakRun(contextlib.AbstractContextManager):
    """One run: broker, bundle, keys, observer, devices and the aggregator process."""

    def __init__(self, name: str, settings: SoakSettings, *, spec: TaskSpec | None = None,
                 checkpoint_dir: Path | None = None, aggregator_env: dict[str, str] | None = None) -> None:
        self.name, self.settings = name, settings
        self.spec = spec or TaskSpec(devices=settings.devices, seed=settings.seed)
        self.fleet = f"soak-{name}"
        self._tmp = None
        if settings.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"fedboard-soak-{name}-")
            self.dir = Path(self._tmp.name)
        else:
            self.dir = Path(settings.workdir) / f"{name}-seed{settings.seed}"  # a fresh broker and state per run
            if self.dir.exists():
                raise FileExistsError(f"{self.dir} exists: remove it or pick another --workdir (a run must not "
                                      "resume another run's checkpoint or broker database)")
            self.dir.mkdir(parents=True)
        self.checkpoint_dir = checkpoint_dir or self.dir / "state"
        self.aggregator_env = aggregator_env or {}
        self.rng = random.Random(settings.seed)
        self.faults: list[Fault] = []
        self.devices: DeviceFleet | None = None
        self.extra_devices: list[subprocess.Popen] = []
        self.started = time.monotonic()

    def __enter__(self) -> "SoakRun":
        from protocol.signing import write_keypair

        self.broker = start_broker(self.dir / "mosquitto", autosave_s=self.settings.broker_autosave_s)
        self.bundle_path = export_bundle(self.spec, self.dir / "model.fbz")
        self.key_path, self.pub_path = write_keypair(self.dir / "keys", overwrite=True)
        self.observer = FleetObserver(self.broker.port, self.fleet)
        s = self.settings
        argv = ["aggregator", "--broker", f"127.0.0.1:{self.broker.port}", "--bundle", str(self.bundle_path),
                "--key", str(self.key_path), "--checkpoint-dir", str(self.checkpoint_dir), "--fleet", self.fleet,
                "--until-round", str(s.rounds), "--clients-per-round", str(s.clients_per_round),
                "--over-selection", str(s.over_selection), "--min-reports", str(s.min_reports),
                "--checkin-window-s", "10", "--expected-checkins", str(len(build_task_windows(self.spec)[1])),
                "--report-deadline-s", str(s.report_deadline_s), "--codec", "f32", "--max-steps", "3",
                "--no-pace-steering", "--client-lr", "0.5", "--server-optimizer", "fedavg",
                "--metrics-jsonl", str(self.dir / "rounds.jsonl")]
        (self.dir / "logs").mkdir(exist_ok=True)
        self.aggregator = AggregatorProcess(argv, self.dir / "logs", env=self.aggregator_env)
        return self

    def start_devices(self, **kwargs: Any) -> DeviceFleet:
        self.devices = start_devices(self.spec, self.bundle_path, self.pub_path, self.fleet, self.broker.port,
                                     self.dir / "devices", **kwargs)
        return self.devices

    def fault(self, kind: str, detail: str = "") -> Fault:
        f = Fault(kind, self.observer.current_round(), detail)
        self.faults.append(f)
        log.info("%s: fault %d: %s in round %d %s", self.name, len(self.faults), kind, f.round, detail)
        return f

    def finish(self, timeout_s: float = 120.0) -> int | None:
        """Let the aggregator run to the target round (restarting it if it is not running)."""
        if not self.aggregator.alive() and self.aggregator.proc is not None and self.aggregator.proc.returncode != 0:
            self.aggregator.start()
        return self.aggregator.wait(timeout_s)

    def invariants(self) -> Invariants:
        # the observer's persistent session receives the last acks and the retained model shortly after
        self.observer.wait_for(lambda: self.observer.latest_version() >= self._ledger_version(), 30)
        time.sleep(0.5)
        return check_invariants(self.checkpoint_dir, self.observer, self.settings.rounds)

    def _ledger_version(self) -> int:
        ends = [e for e in read_ledger(self.checkpoint_dir / LEDGER_FILE).ends if e.committed]
        return ends[-1].version if ends else 0

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.aggregator.kill(signal.SIGTERM)
        for proc in self.extra_devices:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(10)
        if self.devices is not None:
            self.devices.stop()
        with contextlib.suppress(Exception):
            self.observer.stop()
        self.broker.stop()
        if self._tmp is not None and not self.settings.keep:
            self._tmp.cleanup()


# -- scenario a: SIGKILL of the aggregator ---------------------------------------------------------
def _kill_point(run: SoakRun, phase: str, goal: int, timeout_s: float = 30.0) -> str:
    """Wait for a point of the current (or next) round in `phase`; returns what was waited for."""
    obs, rng = run.observer, run.rng
    start_round = obs.current_round()
    if phase == "checkin":  # just after a new plan: the check-in window is open
        obs.wait_for(lambda: obs.current_round() > start_round, timeout_s)
        time.sleep(rng.uniform(0.0, 0.05))  # ten devices answer a plan within ~0.1 s
        return f"0-50 ms after plan {obs.current_round()} was published"
    round_id = max(start_round, 1)
    if phase == "reporting":  # some, not all, reports of the round accepted
        k = rng.randint(1, max(1, goal - 1))
        obs.wait_for(lambda: len(obs.accepted(obs.current_round())) >= k, timeout_s)
        return f"after {k} accepted report(s) of round {obs.current_round()}"
    # commit: the goal reached (the aggregator is committing) or the new model just published
    before = obs.latest_version()
    if rng.random() < 0.5:
        obs.wait_for(lambda: len(obs.accepted(obs.current_round())) >= goal, timeout_s)
        time.sleep(rng.uniform(0.0, 0.08))
        return f"0-80 ms after the goal of round {round_id} was reached"
    obs.wait_for(lambda: obs.latest_version() > before, timeout_s)
    return f"right after v{obs.latest_version()} was published"


def _round_phase_on_disk(checkpoint_dir: Path) -> str:
    """Where the killed aggregator was, per its checkpoints: check-in, reporting or between rounds."""
    try:
        model = load_npz(checkpoint_dir / "model.npz")
        last = int(model["last_round"].item())
        rnd = load_npz(checkpoint_dir / "round.npz")
        meta = json.loads(str(rnd["meta"].item()))
        if int(rnd["round_id"].item()) > last:
            return (f"round {int(rnd['round_id'].item())} {meta['phase']} ({len(meta['checkins'])} check-ins, "
                    f"{len(meta['accepted'])} accepted)")
        return f"after round {last} ended (v{int(model['version'].item())})"
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({exc})"


def scenario_sigkill(settings: SoakSettings) -> tuple[Invariants, list[Fault], float, list[str]]:
    notes = []
    with SoakRun("sigkill", settings) as run:
        run.aggregator.start()
        run.start_devices()
        goal = settings.clients_per_round
        phases = ["checkin", "reporting", "commit"]
        while len(run.faults) < settings.kills:
            if not run.aggregator.alive():
                if run.aggregator.proc.returncode == 0:
                    notes.append(f"target round reached after {len(run.faults)} kills; starting over is not "
                                 "possible, raise --rounds for more kills")
                    break
                raise RuntimeError(f"aggregator exited with {run.aggregator.proc.returncode}:\n"
                                   f"{run.aggregator.last_log()[-3000:]}")
            phase = phases[len(run.faults) % 3] if run.rng.random() < 0.7 else run.rng.choice(phases)
            what = _kill_point(run, phase, goal)
            if not run.aggregator.alive():
                continue
            run.aggregator.kill(signal.SIGKILL)
            run.fault("sigkill", f"{phase}: {what}; on disk: {_round_phase_on_disk(run.checkpoint_dir)}")
            time.sleep(run.rng.uniform(0.0, 1.0))
            run.aggregator.start()
        code = run.finish(timeout_s=180)
        if code != 0:
            notes.append(f"aggregator exit code {code}")
        inv = run.invariants()
        if code != 0:
            inv.problems.append(f"aggregator did not finish (exit {code}): {run.aggregator.last_log()[-2000:]}")
        if inv.abandoned_rounds:  # the broker kept everything: a kill alone must not cost a round
            inv.problems.append(f"{inv.abandoned_rounds} round(s) abandoned after a kill")
        return inv, run.faults, time.monotonic() - run.started, notes


# -- scenario b: broker restarts mid-round ---------------------------------------------------------
def retained_topics(port: int, topics: list[str], timeout_s: float) -> set[str]:
    """Which of ``topics`` a fresh subscriber receives a retained (non-empty) message on in time."""
    got: set[str] = set()
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-newcomer-{os.getpid()}", protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic in topics and msg.payload:
            got.add(msg.topic)
            if got >= set(topics):
                done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(timeout_s)
    client.loop_stop()
    client.disconnect()
    return got


def retained_state(port: int, fleet: str, timeout_s: float) -> dict[str, bool]:
    """Which of the retained bundle, model and round plan a fresh subscriber receives in time."""
    topics = FleetTopics(fleet)
    wanted = [topics.bundle, topics.model, topics.round]
    got = retained_topics(port, wanted, timeout_s)
    return {t.rsplit("/", 2)[-2] + "/" + t.rsplit("/", 1)[-1]: t in got for t in wanted}


def scenario_broker_restart(settings: SoakSettings) -> tuple[Invariants, list[Fault], float, list[str]]:
    notes: list[str] = [f"mosquitto persistence on, autosave "
                        f"{f'every {settings.broker_autosave_s} s' if settings.broker_autosave_s else 'default (30 min)'}"]
    with SoakRun("broker-restart", settings) as run:
        run.aggregator.start()
        run.start_devices()
        obs = run.observer
        restarted = sorted(run.devices.clients)[:2]
        restarted_at: dict[str, int] = {}
        retained_missing: list[str] = []
        signals = [signal.SIGKILL if i == 0 else signal.SIGTERM  # SIGKILL first: nothing saved yet
                   for i in range(settings.broker_restarts)]
        for sig in signals:
            # mid-round: the cohort is chosen and one or two reports are in
            base = obs.current_round()
            obs.wait_for(lambda: obs.current_round() > base, 60)
            k = run.rng.randint(1, 2)
            obs.wait_for(lambda: len(obs.accepted(obs.current_round())) >= k, 30)
            if sig == signal.SIGKILL:
                run.broker.kill()
            else:
                run.broker.proc.terminate()
                run.broker.proc.wait(10)
                run.broker.proc = None
            run.fault("broker-" + signal.Signals(sig).name.lower(), f"after {k} accepted report(s)")
            time.sleep(run.rng.uniform(0.5, 2.0))
            run.broker.start()
            if sig == signal.SIGKILL:  # two device apps restart too: they hold no model and need the retained one
                for device in restarted:
                    run.devices.restart(device)
                    restarted_at[device] = obs.current_round()
                # a device installed now bootstraps from the retained bundle, model and plan: are they there?
                missing = [t for t, ok in retained_state(run.broker.port, run.fleet, 10.0).items() if not ok]
                if missing:
                    retained_missing.append(f"after the broker SIGKILL in round {obs.current_round()}: no retained "
                                            f"{', '.join(missing)} within 10 s")
        code = run.finish(timeout_s=240)
        inv = run.invariants()
        for device in restarted:
            after = restarted_at.get(device, 0)
            mine = sorted(r for r, d in obs.accepted() if d == device and r > after)
            with obs._lock:  # an assignment (selected or not) answers a check-in: the device is back
                answered = sorted(r for r, devices in obs.assignments.items() if r > after and device in devices)
            notes.append(f"{device} restarted after the broker SIGKILL in round {restarted_at.get(device)}: "
                         f"checked in again in rounds {answered}, accepted in rounds {mine}")
            # whether it is SELECTED again is chance (cohort 9 of 10); that it checks in again is not
            if restarted_at and not answered:
                inv.problems.append(f"{device}, restarted after the broker lost its state, never checked in again")
        inv.problems.extend(retained_missing)
        if code != 0:
            inv.problems.append(f"aggregator did not finish (exit {code}): {run.aggregator.last_log()[-2000:]}")
        return inv, run.faults, time.monotonic() - run.started, notes


# -- scenario c: 30 % of the cohort lose the connection mid-upload ------------------------------------
class CutBudget:
    """Decides which uploads to cut: the first ceil(fraction x cohort) of each round's cohort."""

    def __init__(self, observer: FleetObserver, fraction: float, only: set[str] | None = None) -> None:
        self.observer, self.fraction, self.only = observer, fraction, only
        self._lock = threading.Lock()
        self.cut: dict[int, set[str]] = defaultdict(set)

    def __call__(self, device: str) -> bool:
        round_id = self.observer.current_round()
        cohort = self.observer.cohort(round_id)
        with self._lock:
            done = self.cut[round_id]
            budget = math.ceil(self.fraction * len(cohort)) if self.only is None else len(cohort)
            if device in done or len(done) >= budget or (self.only is not None and device not in self.only):
                return False
            done.add(device)
            return True


def scenario_mid_upload(settings: SoakSettings) -> tuple[Invariants, list[Fault], float, list[str]]:
    # goal 8 of a cohort of 10 with 3 cut: the uncut 7 cannot complete a round alone, so every round
    # needs at least one re-sent update (outbox/QoS 1 after the reconnect); over-selection covers the rest
    settings = dataclasses.replace(settings, clients_per_round=8, over_selection=1.25)
    with SoakRun("mid-upload", settings) as run:
        budget = CutBudget(run.observer, settings.cut_fraction)
        run.aggregator.start()
        fleet = run.start_devices(cut=budget, cut_devices=set(build_task_windows(run.spec)[1]))
        code = run.finish(timeout_s=60 + 10 * settings.rounds)
        inv = run.invariants()
        for round_id, devices in sorted(budget.cut.items()):
            for device in sorted(devices):
                run.faults.append(Fault("cut-mid-upload", round_id, device))
        cuts = sum(p.cuts for p in fleet.proxies.values())
        cohorts = [len(run.observer.cohort(r)) for r in range(1, settings.rounds + 1)]
        resent = {(r, d) for r, ds in budget.cut.items() for d in ds} & run.observer.accepted()
        notes = [f"{cuts} uploads cut over {len(cohorts)} rounds (cohorts {cohorts}); "
                 f"{len(resent)} of the cut updates were accepted after the reconnect (the others came after "
                 "their round reached its goal and were refused as round_closed)"]
        if code != 0:
            inv.problems.append(f"aggregator did not finish (exit {code})")
        return inv, run.faults, time.monotonic() - run.started, notes


# -- scenario d: skewed device clocks ------------------------------------------------------------
def _skewed_device_main(argv: list[str]) -> int:
    """Child process: devices whose `time.time()` is shifted (the rest of the clock is untouched)."""
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("const", "jump"))
    p.add_argument("--skew-s", type=float)
    p.add_argument("--spec", required=True)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--pub", type=Path)
    p.add_argument("--fleet")
    p.add_argument("--port", type=int)
    p.add_argument("--state", type=Path)
    p.add_argument("--devices", required=True)
    p.add_argument("--cut", action="store_true", help="cut every upload once, so the outbox must re-send")
    args = p.parse_args(argv)
    real_time = time.time
    t0 = real_time()
    if args.mode == "const":
        time.time = lambda: real_time() + args.skew_s  # type: ignore[assignment]
    else:  # every 0.7 s the wall clock jumps: +skew, back to true, -skew (backwards), true ...
        pattern = (args.skew_s, 0.0, -args.skew_s, 0.0)
        time.time = lambda: real_time() + pattern[int((real_time() - t0) / 0.7) % 4]  # type: ignore[assignment]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = TaskSpec(**json.loads(args.spec))
    devices = args.devices.split(",")
    cut_at: dict[str, int] = {}
    clients: dict[str, Any] = {}

    def first_send_only(device: str) -> bool:
        """Cut each update's first send, never its re-send (`updates_sent` counts after the send)."""
        sent = clients[device].stats.updates_sent if device in clients else 0
        if cut_at.get(device) == sent:
            return False
        cut_at[device] = sent
        return True

    fleet = start_devices(spec, args.bundle, args.pub, args.fleet, args.port, args.state, device_ids=devices,
                          cut=first_send_only if args.cut else None, cut_devices=set(devices) if args.cut else None)
    clients.update(fleet.clients)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    while not stop.wait(0.5):
        pass
    stats = {d: dataclasses.asdict(c.stats) for d, c in fleet.clients.items()}
    cuts = {d: p.cuts for d, p in fleet.proxies.items()}
    fleet.stop()
    print("SKEW-STATS " + json.dumps({"stats": stats, "cuts": cuts}), flush=True)
    return 0


def scenario_skewed_clock(settings: SoakSettings) -> tuple[Invariants, list[Fault], float, list[str]]:
    notes = []
    spec = TaskSpec(devices=settings.devices, seed=settings.seed)
    # every device is needed in every round (goal = fleet, no over-selection): a skewed device
    # that were refused, or whose outbox dropped its update, would stall the round to its deadline
    settings = dataclasses.replace(settings, clients_per_round=len(build_task_windows(spec)[1]), over_selection=1.0)
    with SoakRun("skewed-clock", settings, spec=spec) as run:
        all_ids = sorted(build_task_windows(spec)[1])
        skewed = {name: all_ids[-(i + 1)] for i, name in enumerate(SKEWS)}
        run.aggregator.start()
        run.start_devices(device_ids=[d for d in all_ids if d not in skewed.values()])
        logs = {}
        for name, device in skewed.items():
            mode, skew = SKEWS[name]
            logs[name] = run.dir / f"skewed-{name}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_skewed-devices", "--mode", mode, "--skew-s",
                   str(skew), "--spec", json.dumps(dataclasses.asdict(spec)), "--bundle", str(run.bundle_path),
                   "--pub", str(run.pub_path), "--fleet", run.fleet, "--port", str(run.broker.port),
                   "--state", str(run.dir / f"skewed-{name}"), "--devices", device]
            if mode == "jump":
                cmd.append("--cut")
            run.extra_devices.append(subprocess.Popen(cmd, cwd=ROOT, stdout=open(logs[name], "w"),
                                                      stderr=subprocess.STDOUT))
            run.faults.append(Fault(f"clock-{name}", 0, device))
        code = run.finish(timeout_s=60 + 10 * settings.rounds)
        inv = run.invariants()
        for proc in run.extra_devices:
            proc.terminate()
            proc.wait(20)
        acked = run.observer.accepted()
        refusals = run.observer.refusals()
        for name, device in skewed.items():
            text = logs[name].read_text(errors="replace")
            stats_line = next((line for line in text.splitlines() if line.startswith("SKEW-STATS ")), "")
            cuts = json.loads(stats_line[11:])["cuts"].get(device, 0) if stats_line else 0
            mine = sorted(r for r, d in acked if d == device)
            refused = sorted({reason for d, _, reason in refusals if d == device})
            dropped = text.count("deadline passed before it could be sent")
            selected = sum(1 for r in range(1, settings.rounds + 1) if device in run.observer.cohort(r))
            notes.append(f"{name} ({device}): selected in {selected} round(s), accepted in rounds {mine}, refused "
                         f"{refused or 'never'}, uploads cut {cuts}, outbox drops for a 'passed' deadline {dropped}")
            if selected and not mine:
                inv.problems.append(f"the device with a clock {name} was selected {selected} time(s) but never accepted")
            if dropped:
                inv.problems.append(f"{name}: the outbox dropped {dropped} update(s) as expired while the round was "
                                    "open (the device's wall clock jumped)")
        if code != 0:
            inv.problems.append(f"aggregator did not finish (exit {code})")
        return inv, run.faults, time.monotonic() - run.started, notes


# -- scenario e: the checkpoint disk fills up ---------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size_kb: int) -> Any:
    """A tmpfs of `size_kb` at `path` (root), else None: the caller falls back to the ENOSPC hook."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Write a ballast file until the filesystem says ENOSPC."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # unbuffered, down to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return ballast


def scenario_full_disk(settings: SoakSettings) -> tuple[Invariants, list[Fault], float, list[str]]:
    notes: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="fedboard-soak-disk-"))
    flag = base / "disk-full.flag"
    ckpt = base / "state"
    with small_disk(ckpt, 2048) as mounted:
        notes.append("checkpoint dir on a 2 MB tmpfs filled by a ballast file" if mounted else
                     f"no tmpfs (not root?): ENOSPC injected through {FAULT_ENV}")
        with SoakRun("full-disk", settings, checkpoint_dir=ckpt, aggregator_env={FAULT_ENV: str(flag)}) as run:
            run.aggregator.start()
            run.start_devices()
            obs = run.observer
            for i in range(settings.disk_fulls):
                start = obs.current_round()
                obs.wait_for(lambda: obs.current_round() > start, 60)
                k = run.rng.randint(0, 2)
                obs.wait_for(lambda: len(obs.accepted(obs.current_round())) >= k, 30)
                good = {name: (ckpt / name).read_bytes() for name in ("model.npz", "round.npz") if (ckpt / name).exists()}
                ballast = fill_disk(ckpt) if mounted else flag
                if not mounted:
                    flag.write_text("full")
                run.fault("disk-full", f"after {k} accepted report(s)")
                code = run.aggregator.wait(60)
                text = run.aggregator.last_log()
                clear = "checkpoint error" in text and ("No space left on device" in text)
                kept = all(_loads(ckpt / name) for name in good)
                notes.append(f"disk full {i + 1}: aggregator exit {code}, clear error logged: {clear}, "
                             f"last good checkpoints loadable: {kept}")
                if code != 3 or not clear or not kept:
                    run.faults[-1].detail += " NOT HANDLED"
                ballast.unlink()
                time.sleep(run.rng.uniform(0.2, 1.0))
                run.aggregator.start()  # what a supervisor (systemd Restart=on-failure) does
            code = run.finish(timeout_s=60 + 10 * settings.rounds)
            inv = run.invariants()
            for f in run.faults:
                if "NOT HANDLED" in f.detail:
                    inv.problems.append(f"full disk in round {f.round} not handled cleanly")
            if code != 0:
                inv.problems.append(f"aggregator did not finish (exit {code})")
            out = (inv, run.faults, time.monotonic() - run.started, notes)
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(base)
    return out


def _loads(path: Path) -> bool:
    try:
        load_npz(path)
        return True
    except Exception:  # noqa: BLE001
        return False


RUNNERS = {"sigkill": scenario_sigkill, "broker-restart": scenario_broker_restart, "mid-upload": scenario_mid_upload,
           "skewed-clock": scenario_skewed_clock, "full-disk": scenario_full_disk}


def run_scenario(name: str, settings: SoakSettings, repeat: int = 1, command: str = "") -> ScenarioResult:
    result = ScenarioResult(name, command or f"python bench/soak_faults.py {name}")
    for i in range(repeat):
        s = dataclasses.replace(settings, seed=settings.seed + i)
        inv, faults, wall_s, notes = RUNNERS[name](s)
        result.add_run(inv, faults, wall_s)
        result.notes.extend(notes)
    return result


def format_table(results: list[ScenarioResult]) -> str:
    head = ("scenario", "runs", "faults", "survived", "accepted", "acked", "lost", "dup", "gaps", "rounds", "abandoned",
            "wall s", "ok")
    rows = [head] + [(r.scenario, r.runs, r.faults_injected, r.faults_survived, r.updates_accepted, r.acked_accepted,
                      r.updates_lost, r.duplicates, r.version_gaps, r.rounds, r.abandoned_rounds, f"{r.wall_s:.0f}",
                      "yes" if r.ok else "NO") for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_skewed-devices"]:
        return _skewed_device_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="+", choices=SCENARIOS + ("all",))
    p.add_argument("--rounds", type=int, default=12, help="target rounds of each run")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of the aggregator in the sigkill scenario")
    p.add_argument("--broker-restarts", type=int, default=3)
    p.add_argument("--broker-autosave-s", type=int, default=0, help="mosquitto autosave_interval (0 = its default, "
                   "30 min: a SIGKILL then loses retained messages and sessions)")
    p.add_argument("--disk-fulls", type=int, default=3)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep every run's files here (default: temporary)")
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    settings = SoakSettings(rounds=args.rounds, kills=args.kills, broker_restarts=args.broker_restarts,
                            disk_fulls=args.disk_fulls, devices=args.devices, seed=args.seed, workdir=args.workdir,
                            broker_autosave_s=args.broker_autosave_s,
                            keep=args.workdir is not None)
    if "sigkill" in names and args.rounds < 25 and args.kills >= 20:
        settings_kill = dataclasses.replace(settings, rounds=max(args.rounds, 30))
    else:
        settings_kill = settings
    results = []
    for name in names:
        s = settings_kill if name == "sigkill" else settings
        cmd = (f"python bench/soak_faults.py {name} --rounds {s.rounds} --devices {s.devices} --seed {s.seed}"
               + (f" --kills {s.kills}" if name == "sigkill" else "")
               + (f" --broker-restarts {s.broker_restarts} --broker-autosave-s {s.broker_autosave_s}"
                  if name == "broker-restart" else "")
               + (f" --disk-fulls {s.disk_fulls}" if name == "full-disk" else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else ""))
        t0 = time.monotonic()
        result = run_scenario(name, s, args.repeat, cmd)
        print(f"{name}: {'ok' if result.ok else 'FAILED'} in {time.monotonic() - t0:.0f} s", flush=True)
        for note in result.notes:
            print(f"  {note}")
        for problem in result.problems:
            print(f"  PROBLEM: {problem}")
        results.append(result)
    print()
    print(format_table(results))
    for r in results:
        print(f"  {r.scenario}: {r.command}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import platform

        args.out.write_text(json.dumps({"bench": "soak_faults", "platform": platform.platform(),
                                        "cpu_count": os.cpu_count(),
                                        "scenarios": [dataclasses.asdict(r) for r in results]}, indent=2))
        print(f"report written to {args.out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
