"""`fedboard simulate`: a fleet, an aggregator and a broker in one process, over real MQTT.

Every simulated device is a real `edge_client.DeviceClient` with its own MQTT connection;
they share a bounded pool of TFLite interpreters (one per core), so memory follows the pool,
not the fleet. The global model is evaluated on the pooled test windows after each round.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.server import Aggregator, AggregatorConfig
from device_sim.broker import BrokerAddress, EmbeddedBroker, parse_broker
from device_sim.report import machine, peak_rss_mb, plot_accuracy, write_report
from edge_client.device import DeviceClient, DeviceConfig
from edge_client.mqtt_hub import MqttHub, raise_fd_limit
from edge_client.residuals import ResidualStore
from edge_client.trainer import ArrayWindows, InterpreterPool
from models.bundle_cache import get_or_export_bundle
from models.config import ModelConfig
from models.corpus import read_corpus
from models.evaluate import evaluate
from models.runtime import LiteRTModel
from models.task import Task, build_task
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.signing import ModelTrust, generate_keypair
from protocol.topics import slugify
from protocol.transport import MqttSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    corpus: str | None = None           # None = the built-in synthetic keyboard corpus
    format: str | None = None
    devices: int = 0                     # 0 = one device per user of the corpus
    rounds: int = 20
    clients_per_round: int = 20
    local_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 5.0
    codec: str = "q8"
    downlink: str = "f32"
    server_optimizer: str = "fedadam"
    server_lr: float = 0.05
    aggregation: str = "mean"
    over_selection: float = 1.3          # cohort = ceil(clients_per_round * over_selection)
    mu: float = 0.0                      # FedProx proximal term
    client_clip: float = 5.0
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
    report_deadline_s: float = 600.0
    out: str = "runs/latest"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.devices < 0:
            raise ValueError("--devices must be >= 0")
        parse_codec(self.codec)
        parse_codec(self.downlink)


def run_simulation(cfg: SimConfig) -> dict[str, Any]:
    """Run the whole simulation and return the report (also written to `cfg.out`)."""
    wall_start = time.monotonic()
    out_dir = Path(cfg.out)
    corpus = read_corpus(cfg.corpus, cfg.format, seed=cfg.seed)
    task = build_task(corpus, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    users = _pick_users(task, cfg)
    model_config = ModelConfig(vocab_size=task.vocab.size, embed_dim=cfg.embed_dim, units=cfg.units,
                               seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    bundle = get_or_export_bundle(model_config, task.vocab.to_json(), seed=cfg.seed, target_counts=task.target_counts())
    test_x, test_y = task.pooled_test()
    log.info("task %s: %d devices, vocabulary %d, %d test windows, model %s (%d parameters)", corpus.name,
             len(users), task.vocab.size, len(test_x), bundle.model_id, bundle.param_count)

    private_pem, public_pem = generate_keypair()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    private_key = load_pem_private_key(private_pem, password=None)
    public_key = load_pem_public_key(public_pem)
    pool = InterpreterPool(bundle, size=cfg.pool_size or (os.cpu_count() or 1))
    evaluator = LiteRTModel(bundle, num_threads=os.cpu_count() or 1)

    with contextlib.ExitStack() as stack:
        address = _broker(cfg, stack)
        mqtt_version = cfg.mqtt_version or (5 if cfg.broker else 3)
        settings = MqttSettings(host=address.host, port=address.port, mqtt_version=mqtt_version, keepalive_s=60)
        state_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedboard-sim-")))
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=pool.size, thread_name_prefix="train"))
        raise_fd_limit(4 * len(users) + 1024)
        hub = stack.enter_context(MqttHub("sim-devices"))
        agg = Aggregator(
            AggregatorConfig(
                fleet=cfg.fleet, clients_per_round=cfg.clients_per_round, checkin_window_s=30.0,
                expected_checkins=len(users), report_deadline_s=cfg.report_deadline_s, codec=cfg.codec,
                downlink=cfg.downlink, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                client_lr=cfg.client_lr, aggregation=cfg.aggregation, server_optimizer=cfg.server_optimizer,
                server_lr=cfg.server_lr, seed=cfg.seed, over_selection=cfg.over_selection, mu=cfg.mu,
                client_clip=cfg.client_clip, downlink_delta=cfg.downlink_delta,
            ),
            bundle, settings, private_key, client_id=f"aggregator-{cfg.fleet}",
        )
        agg.start()
        stack.callback(agg.stop)
        devices = _start_devices(cfg, task, users, pool, public_key, settings, state_root, executor, hub)
        stack.callback(_stop_all, devices)
        _wait_connected(devices)

        per_round: list[dict[str, Any]] = []
        progress = _progress(cfg)
        last = _evaluate(evaluator, agg.weights, test_x, test_y)
        log.info("round 0: top-1 %.4f top-3 %.4f", last.top1, last.top3)
        for _ in range(cfg.rounds):
            down_before = sum(d.stats.downlink_bytes for d in devices)
            result = agg.run_round()
            row = result.to_dict()
            row["downlink_bytes"] = sum(d.stats.downlink_bytes for d in devices) - down_before
            if result.round % cfg.eval_every == 0 or result.round == cfg.rounds:
                last = _evaluate(evaluator, agg.weights, test_x, test_y)
                row.update(top1=last.top1, top3=last.top3)
            else:
                row.update(top1=None, top3=None)
            per_round.append(row)
            progress.update(1)
            progress.set_postfix(top3=f"{last.top3:.4f}", up=f"{result.uplink_bytes / 1e6:.1f}MB",
                                 ok=f"{result.participants}/{result.cohort}")
        progress.close()

    report = _report(cfg, corpus.name, task, bundle, per_round, last, devices, wall_start)
    write_report(report, out_dir)
    plot_accuracy(report, out_dir / "accuracy.png")
    log.info("report written to %s", out_dir / "report.json")
    return report


def _pick_users(task: Task, cfg: SimConfig) -> list[str]:
    users = sorted(u for u, d in task.devices.items() if d.n_train > 0)
    if cfg.devices:
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
                   hub: MqttHub) -> list[DeviceClient]:
    taken: set[str] = set()
    devices = []
    for user in users:
        data = task.devices[user]
        device_id = slugify(user, taken)
        device = DeviceClient(
            DeviceConfig(fleet=cfg.fleet, device_id=device_id, mqtt=settings, seed=cfg.seed, platform_name="sim"),
            pool, ArrayWindows(data.train_x, data.train_y), ModelTrust(public_key, cfg.fleet, pool.bundle.model_id),
            residuals=ResidualStore(state_root / device_id), executor=executor, hub=hub,
        )
        device.start()
        devices.append(device)
    return devices


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


def _evaluate(model: LiteRTModel, weights: np.ndarray, x: np.ndarray, y: np.ndarray):
    model.set_weights(weights)
    return evaluate(model, x, y)


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
                               "dropped", "checkins", "train_loss", "rejected", "committed")}
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
        "config": asdict(cfg),
        **machine(),
    }
