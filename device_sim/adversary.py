"""A live fleet to attack (issue 14): the `fedboard broker-config` Mosquitto, real `fedboard aggregator`
processes, and devices that each log in with their own username and password.

Used by bench/adversary.py (the attack table of the README) and tests/test_fleet_integrity.py.
A `ScriptedDevice` speaks the wire protocol directly (check-in, update, re-send when no Ack
comes, as edge_client/device.py does), so an attack controls exactly what the aggregator gets.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from aggregator.broker_config import BrokerFiles, BrokerSetup, device_ids, worker_users, write_broker_config
from device_sim.mosquitto import MosquittoBroker, free_port
from models.bundle import Bundle
from models.config import ModelConfig
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan
from protocol.model_message import ModelMessage
from protocol.topics import FleetTopics

ROOT = Path(__file__).resolve().parents[1]
STAND_IN_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4 + bytes(4096)
SMALL = ModelConfig(vocab_size=12, embed_dim=4, units=4, seq_len=4, batch_size=2)


def stand_in_bundle(seed: int = 0) -> Bundle:
    """A bundle with a stand-in graph: the aggregator never runs it, and scripted devices send updates."""
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(SMALL.vocab_size - 4)]
    weights = (np.random.default_rng(seed).integers(-64, 65, SMALL.param_count) / 64.0).astype(np.float32)
    return Bundle.create(SMALL, {"format": "fedboard-vocab/1", "words": words}, STAND_IN_TFLITE, weights)


class LiveBroker:
    """Mosquitto started with exactly what `fedboard broker-config` wrote (passwords, ACL, conf)."""

    def __init__(self, workdir: Path, fleet: str, devices: int, *, workers: int = 0) -> None:
        self.workdir, self.fleet = Path(workdir), fleet
        self.port = free_port()
        setup = BrokerSetup(fleet=fleet, devices=device_ids(devices), port=self.port, bind="127.0.0.1",
                            workers=workers, run_as_user="root" if os.geteuid() == 0 else None)
        self.files: BrokerFiles = write_broker_config(self.workdir / "broker", setup)
        self.devices = setup.devices
        self.workers = worker_users(setup.aggregator_user, workers)
        text = self.files.conf.read_text()

        class Generated(MosquittoBroker):
            def config_text(self) -> str:
                return text

        self._broker = Generated(port=self.port, workdir=self.workdir / "mosquitto")
        self._broker.start()

    def password(self, user: str) -> str:
        return self.files.credentials[user].read_text().strip()

    def password_file(self, user: str) -> Path:
        return self.files.credentials[user]

    @property
    def share_group(self) -> str:
        return self.files.credentials["share-group"].read_text().strip()

    def stop(self) -> None:
        self._broker.stop()


class ScriptedDevice:
    """One device (or an attacker holding one device's password) on its own MQTT connection."""

    def __init__(self, broker: LiveBroker, user: str, *, client_id: str | None = None, examples: int = 10,
                 checkin: bool = True, resend_after_s: float = 0.0, max_resends: int = 3, clean_start: bool = True,
                 subscribe: bool = True) -> None:
        self.broker, self.user, self.examples, self.checkin = broker, user, examples, checkin
        self.topics = FleetTopics(broker.fleet)
        self.resend_after_s, self.max_resends = resend_after_s, max_resends
        self.plans: dict[int, RoundPlan] = {}
        self.assignments: dict[int, Assignment] = {}
        self.acks: list[Ack] = []
        self.model: bytes = b""
        self.confirmed = 0          # updates the broker acknowledged (PUBACK success)
        self.resends = 0
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, broker.password(user))
        self.client.on_connect = lambda c, u, f, rc, p=None: self._connected.set() if not rc.is_failure else None
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean_start else 3600
        self.client.connect("127.0.0.1", broker.port, clean_start=clean_start, properties=props)
        self.client.loop_start()
        if not self._connected.wait(20):
            raise ConnectionError(f"{user} could not connect")
        if subscribe:
            self.client.subscribe([(self.topics.round, 1), (self.topics.assign(user), 1), (self.topics.ack(user), 1),
                                   (self.topics.model, 1)])
            if not self._subscribed.wait(20):
                raise ConnectionError(f"{user} could not subscribe")

    def _on_disconnect(self, *args: object) -> None:
        with self._lock:
            self.disconnects += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.round:
                plan = RoundPlan.from_envelope(decode_envelope(msg.payload, expect=Kind.PLAN))
                with self._lock:
                    new = plan.round_id not in self.plans
                    self.plans[plan.round_id] = plan
                if new and self.checkin:
                    env = CheckIn(plan.round_id, plan.base_version, self.examples, "scripted").to_envelope(
                        self.broker.fleet, self.user)
                    client.publish(self.topics.checkin(self.user), env.encode(), qos=1)
            elif msg.topic == self.topics.assign(self.user):
                a = Assignment.from_envelope(decode_envelope(msg.payload, expect=Kind.ASSIGN))
                with self._lock:
                    self.assignments[a.round_id] = a
            elif msg.topic == self.topics.ack(self.user):
                with self._lock:
                    self.acks.append(Ack.from_envelope(decode_envelope(msg.payload, expect=Kind.ACK)))
            elif msg.topic == self.topics.model:
                with self._lock:
                    self.model = msg.payload
            else:
                with self._lock:
                    self.messages.append(msg)
        except ProtocolError:
            pass

    def selected(self, round_id: int) -> bool:
        with self._lock:
            a = self.assignments.get(round_id)
        return a is not None and a.selected

    def acked(self, round_id: int) -> Ack | None:
        with self._lock:
            return next((a for a in self.acks if a.round_id == round_id), None)

    def send_update(self, round_id: int, base: int, vec: np.ndarray, examples: int | None = None,
                    meta: dict | None = None) -> None:
        """Publish the update (QoS 1); re-send it while no Ack comes, as a real device does."""
        data = update_bytes(self.broker.fleet, self.user, round_id, base, vec, examples or self.examples, meta)
        self._publish(self.topics.update(self.user), data)
        if self.resend_after_s > 0:
            threading.Thread(target=self._resend, args=(round_id, data), daemon=True).start()

    def _publish(self, topic: str, data: bytes, retain: bool = False) -> bool:
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(30)
        ok = info.is_published()
        with self._lock:
            self.confirmed += int(ok and topic.startswith(f"{self.topics.root}/update/"))
        return ok

    def _resend(self, round_id: int, data: bytes) -> None:
        for _ in range(self.max_resends):
            deadline = time.monotonic() + self.resend_after_s
            while time.monotonic() < deadline:
                if self.acked(round_id) is not None:
                    return
                time.sleep(0.05)
            if self.acked(round_id) is not None:
                return
            with self._lock:
                self.resends += 1
            self._publish(self.topics.update(self.user), data)

    def weights(self, dim: int) -> tuple[int, np.ndarray] | None:
        """The retained global model this device holds (version, weights), if any."""
        with self._lock:
            data = self.model
        if not data:
            return None
        message = ModelMessage.from_envelope(decode_envelope(data))
        return message.version, parse_codec(message.codec).decode(message.weights_payload, dim)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def update_bytes(fleet: str, device: str, round_id: int, base: int, vec: np.ndarray, examples: int,
                 meta: dict | None = None) -> bytes:
    codec = parse_codec("f32")
    payload = codec.encode(vec.astype(np.float32), rng=np.random.default_rng(0)).payload
    return Envelope(Kind.UPDATE, fleet, device, round_id, base, examples, codec.spec,
                    {"train_loss": 1.0} if meta is None else meta, payload).encode()


@dataclass
class AggregatorProcess:
    """`fedboard aggregator` (or a worker) as a child process, its output in `log`."""

    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_aggregator(broker: LiveBroker, workdir: Path, name: str, bundle_path: Path, key_path: Path,
                     *flags: str, user: str = "aggregator") -> AggregatorProcess:
    """`fedboard aggregator` logged in as `user` (its password file from broker-config); output in NAME.log."""
    cmd = [sys.executable, "-m", "aggregator.commands", "aggregator", "--broker", f"127.0.0.1:{broker.port}",
           "--username", user, "--password-file", str(broker.password_file(user)), "--fleet", broker.fleet,
           "--bundle", str(bundle_path), *(["--key", str(key_path)] if key_path else []), *flags]
    log = Path(workdir) / f"{name}.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    return AggregatorProcess(proc, log)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb)) if na and nb else float("nan")


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
