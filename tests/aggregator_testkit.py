"""Helpers for the aggregator tests: a stand-in bundle and a scripted fleet over real MQTT.

The scripted fleet plays many devices over one MQTT connection and sends deterministic
synthetic updates, so a test controls exactly what the aggregator receives (values chosen
dyadic, so sums are exact and two runs can be compared bit for bit).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from models.bundle import Bundle
from models.config import ModelConfig
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan
from protocol.model_message import ModelMessage
from protocol.signing import generate_keypair
from protocol.topics import FleetTopics

FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4 + bytes(4096)
SMALL = ModelConfig(vocab_size=12, embed_dim=4, units=4, seq_len=4, batch_size=2)


def fake_bundle(config: ModelConfig = SMALL, seed: int = 0) -> Bundle:
    """A bundle with a stand-in graph: enough for the aggregator, which never runs it."""
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(config.vocab_size - 4)]
    rng = np.random.default_rng(seed)
    weights = (rng.integers(-64, 65, config.param_count) / 64.0).astype(np.float32)  # dyadic: exact sums
    return Bundle.create(config, {"format": "fedboard-vocab/1", "words": words}, FAKE_TFLITE, weights)


def keypair():
    private_pem, public_pem = generate_keypair()
    return load_pem_private_key(private_pem, None), load_pem_public_key(public_pem)


def dyadic_update(seed: int, dim: int, scale: int = 256) -> np.ndarray:
    """A deterministic update whose values are k/scale with |k| <= 32: float sums stay exact."""
    return (np.random.default_rng(seed).integers(-32, 33, dim) / scale).astype(np.float32)


def update_bytes(fleet: str, device: str, round_id: int, base: int, vec: np.ndarray, examples: int = 4,
                 codec: str = "f32", meta: dict | None = None) -> bytes:
    payload = parse_codec(codec).encode(vec, rng=np.random.default_rng(0)).payload
    return Envelope(Kind.UPDATE, fleet, device, round_id, base, examples, parse_codec(codec).spec,
                    meta if meta is not None else {"train_loss": 1.0}, payload).encode()


def expected_fedavg(weights: np.ndarray, updates: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """What WeightedMean + FedAvg(lr=1) must produce, computed independently."""
    total = np.zeros(weights.size, np.float64)
    for vec, w in updates:
        total += (vec * np.float32(w)).astype(np.float64)
    mean = (total / float(sum(w for _, w in updates))).astype(np.float32)
    return (weights + mean).astype(np.float32)


class ScriptedFleet:
    """Plays `devices` over one MQTT connection: checks each of them in on every new plan."""

    def __init__(self, port: int, fleet: str, devices: list[str], *, checkin: bool = True,
                 client_id: str = "scripted-fleet") -> None:
        self.fleet, self.devices, self.checkin = fleet, list(devices), checkin
        self.topics = FleetTopics(fleet)
        self.plans: dict[int, RoundPlan] = {}
        self.assignments: dict[int, dict[str, Assignment]] = defaultdict(dict)
        self.acks: list[tuple[str, Ack]] = []
        self.models: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self._ready = threading.Event()
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        root = self.topics.root
        self.client.subscribe([(self.topics.round, 1), (f"{root}/assign/+", 1), (f"{root}/ack/+", 1),
                               (f"{root}/model/+", 1)])
        assert self._ready.wait(10), "scripted fleet could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.topics.round:
            plan = RoundPlan.from_envelope(decode_envelope(msg.payload, expect=Kind.PLAN))
            with self._lock:
                new = plan.round_id not in self.plans
                self.plans[plan.round_id] = plan
            if new and self.checkin:
                for device in self.devices:
                    self.check_in(device, plan)
        elif "/assign/" in msg.topic:
            a = Assignment.from_envelope(decode_envelope(msg.payload, expect=Kind.ASSIGN))
            with self._lock:
                self.assignments[a.round_id][msg.topic.rsplit("/", 1)[1]] = a
        elif "/ack/" in msg.topic:
            ack = Ack.from_envelope(decode_envelope(msg.payload, expect=Kind.ACK))
            with self._lock:
                self.acks.append((msg.topic.rsplit("/", 1)[1], ack))
        elif "/model/" in msg.topic:
            with self._lock:
                self.models[msg.topic.rsplit("/", 1)[1]] = msg.payload

    def check_in(self, device: str, plan: RoundPlan) -> None:
        env = CheckIn(plan.round_id, plan.base_version, 10, "scripted").to_envelope(self.fleet, device)
        self.client.publish(self.topics.checkin(device), env.encode(), qos=1)

    def selected(self, round_id: int) -> list[str]:
        with self._lock:
            return sorted(d for d, a in self.assignments[round_id].items() if a.selected)

    def send(self, device: str, data: bytes) -> None:
        self.client.publish(self.topics.update(device), data, qos=1).wait_for_publish(10)

    def acks_for(self, device: str | None = None) -> list[Ack]:
        with self._lock:
            return [a for d, a in self.acks if device is None or d == device]

    def model_version(self, name: str = "current") -> int:
        with self._lock:
            data = self.models.get(name)
        return -1 if data is None else ModelMessage.from_envelope(decode_envelope(data)).version

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# The aggregator's defaults are the measured FedAdam ones; tests that check the weighted mean
# itself run plain FedAvg (server learning rate 1: the new model is the old one plus the mean).
PLAIN_FEDAVG = {"server_optimizer": "fedavg", "server_lr": 1.0}
