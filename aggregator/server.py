"""The aggregator: runs rounds over MQTT.

A round: publish the plan (retained) -> collect check-ins for a window -> select the cohort
(seeded) and answer every check-in -> take updates until the target count or the deadline,
validating each before it touches the model -> aggregate (streaming) -> server optimizer ->
publish the new signed global model (retained). Bad messages are logged, acknowledged with
their reason and counted; they never stop the aggregator.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from aggregator.aggregation import make_aggregator
from aggregator.intake import IntakeLimits, RoundState, validate_update
from aggregator.publisher import PublishedModel, bundle_envelope, build_model_message
from aggregator.server_optimizers import make_server_optimizer
from models.bundle import Bundle
from protocol.codec import parse_codec
from protocol.envelope import DEFAULT_MAX_PAYLOAD, Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, ValidationError
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings, configure_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorConfig:
    """How rounds are run. Durations are wall-clock seconds."""

    fleet: str = "demo"
    clients_per_round: int = 20
    min_reports: int = 0                 # 0 = the target count (all of the cohort)
    checkin_window_s: float = 10.0
    expected_checkins: int = 0           # close the window early once this many checked in
    report_deadline_s: float = 300.0
    codec: str = "q8"
    downlink: str = "f32"
    local_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 1.0
    mu: float = 0.0
    max_steps: int = 0
    aggregation: str = "mean"
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    max_update_norm: float = 1e3
    max_payload: int = DEFAULT_MAX_PAYLOAD
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if not 0 <= self.min_reports <= self.clients_per_round:
            raise ValueError("min_reports must be in 0..clients_per_round")
        parse_codec(self.codec)
        parse_codec(self.downlink)


@dataclass
class RoundResult:
    round: int
    committed: bool
    version: int
    cohort: int
    participants: int
    dropped: int
    checkins: int
    uplink_bytes: int
    model_bytes: int
    wall_s: float
    rejected: dict[str, int] = field(default_factory=dict)
    train_loss: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


class Aggregator:
    """Owns the global model and one MQTT connection; `run_round()` runs one round."""

    def __init__(self, config: AggregatorConfig, bundle: Bundle, mqtt_settings: MqttSettings, private_key: object,
                 *, weights: np.ndarray | None = None, client_id: str | None = None) -> None:
        self.config = config
        self.bundle = bundle
        self.topics = FleetTopics(config.fleet)
        self._private_key = private_key
        self._mqtt = mqtt_settings
        self.dim = int(bundle.initial_weights.size)
        self.version = 0
        self.round_id = 0
        self._rng = np.random.default_rng(config.seed)
        self.optimizer = make_server_optimizer(config.server_optimizer, lr=config.server_lr)
        initial = bundle.initial_weights if weights is None else weights
        self.optimizer.init(np.asarray(initial, dtype=np.float32))
        self.model: PublishedModel = self._build_model(np.asarray(initial, dtype=np.float32))
        self.limits = IntakeLimits(dim=self.dim, max_norm=config.max_update_norm)
        self.rejections: Counter[str] = Counter()
        self._cv = threading.Condition()
        self._state: RoundState | None = None
        self._checkins: dict[str, CheckIn] = {}
        self._aggregate = make_aggregator(config.aggregation)
        self._uplink_bytes = 0
        self._losses: list[float] = []
        self._online: set[str] = set()
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"aggregator-{config.fleet}",
                                   protocol=mqtt_settings.paho_protocol())
        configure_client(self._client, mqtt_settings)
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    # ---- connection ------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        self._client.connect_async(self._mqtt.host, self._mqtt.port, keepalive=self._mqtt.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._client.loop_stop()
            raise ConnectionError(f"aggregator could not connect to {self._mqtt.host}:{self._mqtt.port} in {timeout_s} s")
        self._publish(self.topics.bundle, bundle_envelope(self.config.fleet, self.bundle.to_bytes(), self.bundle.model_id),
                      retain=True, wait=True)
        self._publish(self.topics.model, self.model.envelope_bytes, retain=True, wait=True)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object = None) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("aggregator: connection refused: %s", reason_code)
            return
        client.subscribe([(self.topics.all_checkins, 1), (self.topics.all_updates, 1), (self.topics.all_status, 1)])
        self._connected.set()

    @property
    def weights(self) -> np.ndarray:
        return self.model.weights

    @property
    def online_devices(self) -> int:
        return len(self._online)

    # ---- message intake (paho network thread) ------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            device = self.topics.device_of(msg.topic)
            kind = msg.topic[len(self.topics.root) + 1:].split("/", 1)[0]
            if kind == "update":
                self._handle_update(device, msg.payload)
            elif kind == "checkin":
                self._handle_checkin(device, decode_envelope(msg.payload, expect=Kind.CHECKIN))
            elif kind == "status":
                if not msg.payload:
                    return
                env = decode_envelope(msg.payload, expect=Kind.STATUS)
                (self._online.add if env.meta.get("state") == "online" else self._online.discard)(device)
        except ProtocolError as exc:
            self.rejections[exc.reason.value] += 1
            log.warning("aggregator: refused message on %s: %s", msg.topic, exc)
        except Exception:  # never let a bug in one message kill the network thread
            log.exception("aggregator: error handling %s", msg.topic)

    def _handle_checkin(self, device: str, env: Envelope) -> None:
        checkin = CheckIn.from_envelope(env)
        with self._cv:
            state = self._state
            if state is None or checkin.round_id != state.round_id or state.cohort:
                late = state is not None and checkin.round_id == state.round_id
                if late:  # window closed: tell it when to come back (pace steering)
                    self._send_assignment(device, Assignment(checkin.round_id, False, self._retry_after(), "window_closed"))
                return
            self._checkins[device] = checkin
            self._cv.notify_all()

    def _handle_update(self, device: str, data: bytes) -> None:
        size = len(data)
        try:
            env = decode_envelope(data, max_payload=self.config.max_payload, expect=Kind.UPDATE)
            if env.device != device:
                raise ValidationError(Reason.BAD_FIELD, f"envelope says device {env.device!r}, topic says {device!r}")
        except ProtocolError as exc:
            self._reject(device, -1, exc)
            return
        with self._cv:
            state = self._state
            if state is None:
                return
            try:
                delta = validate_update(env, state, self.limits)
            except ProtocolError as exc:
                if exc.reason is Reason.DUPLICATE:  # QoS 1 redelivery: counted once, not an error
                    log.info("aggregator: duplicate update from %s ignored", device)
                else:
                    self._reject(device, env.round, exc)
                return
            self._aggregate.add(delta, float(env.example_count), client_id=device)
            state.accepted.add(device)
            self._uplink_bytes += size
            loss = env.meta.get("train_loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                self._losses.append(float(loss))
            self._cv.notify_all()
        self._send_ack(device, Ack(env.round, True))

    def _reject(self, device: str, round_id: int, exc: ProtocolError) -> None:
        self.rejections[exc.reason.value] += 1
        log.warning("aggregator: rejected update from %s: %s", device, exc)
        self._send_ack(device, Ack(max(round_id, 0), False, exc.reason.value, exc.detail[:500]))

    # ---- rounds ------------------------------------------------------------------------------
    def run_round(self) -> RoundResult:
        """Run one round to its end (committed or abandoned) and return its metrics."""
        cfg = self.config
        started = time.monotonic()
        self.round_id += 1
        plan = RoundPlan(
            round_id=self.round_id, base_version=self.version, model_id=self.bundle.model_id, codec=cfg.codec,
            target_count=cfg.clients_per_round, checkin_window_s=cfg.checkin_window_s,
            report_deadline_s=cfg.report_deadline_s, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
            lr=cfg.client_lr, mu=cfg.mu, max_steps=cfg.max_steps, downlink=cfg.downlink,
        )
        rejected_before = Counter(self.rejections)
        with self._cv:
            self._state = RoundState(plan.round_id, plan.base_version, parse_codec(cfg.codec).spec)
            self._checkins = {}
            self._aggregate.reset(self.dim)
            self._uplink_bytes = 0
            self._losses = []
        self._publish(self.topics.round, plan.to_envelope(cfg.fleet).encode(), retain=True)

        cohort = self._select_cohort(plan)
        deadline = time.monotonic() + cfg.report_deadline_s
        with self._cv:
            state = self._state
            while len(state.accepted) < len(cohort) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            state.open = False
            accepted = len(state.accepted)
            uplink = self._uplink_bytes
            losses = list(self._losses)
            n_checkins = len(self._checkins)
        needed = cfg.min_reports or cfg.clients_per_round
        needed = min(needed, max(len(cohort), 1))
        committed = accepted >= needed and accepted > 0
        if committed:
            delta = self._aggregate.result()
            new_weights = self.optimizer.apply(self.model.weights, delta)
            self.version += 1
            self.model = self._build_model(new_weights)
            self._publish(self.topics.model, self.model.envelope_bytes, retain=True)
        else:
            log.warning("aggregator: round %d abandoned: %d of %d reports (need %d)", plan.round_id, accepted,
                        len(cohort), needed)
        rejected = {k: v - rejected_before.get(k, 0) for k, v in self.rejections.items() if v - rejected_before.get(k, 0)}
        result = RoundResult(
            round=plan.round_id, committed=committed, version=self.version, cohort=len(cohort), participants=accepted,
            dropped=len(cohort) - accepted, checkins=n_checkins, uplink_bytes=uplink,
            model_bytes=len(self.model.envelope_bytes), wall_s=time.monotonic() - started, rejected=rejected,
            train_loss=float(np.mean(losses)) if losses else float("nan"),
        )
        log.info("round %d: %s, %d/%d reports, %d check-ins, uplink %d B, %.1f s", result.round,
                 "committed" if committed else "ABANDONED", accepted, len(cohort), n_checkins, uplink, result.wall_s)
        return result

    def _select_cohort(self, plan: RoundPlan) -> list[str]:
        cfg = self.config
        window_end = time.monotonic() + cfg.checkin_window_s
        with self._cv:
            while time.monotonic() < window_end:
                if cfg.expected_checkins and len(self._checkins) >= cfg.expected_checkins:
                    break
                self._cv.wait(timeout=min(0.5, max(0.0, window_end - time.monotonic())))
            candidates = sorted(self._checkins)
            take = min(cfg.clients_per_round, len(candidates))
            chosen = sorted(self._rng.choice(candidates, size=take, replace=False).tolist()) if take else []
            assert self._state is not None
            self._state.cohort = set(chosen)
        retry = self._retry_after()
        for device in candidates:
            selected = device in self._state.cohort
            self._send_assignment(device, Assignment(plan.round_id, selected, 0.0 if selected else retry,
                                                     "" if selected else "not_selected"))
        return chosen

    def _retry_after(self) -> float:
        return float(self.config.checkin_window_s + self.config.report_deadline_s)

    def _build_model(self, weights: np.ndarray) -> PublishedModel:
        return build_model_message(fleet=self.config.fleet, model_id=self.bundle.model_id, version=self.version,
                                   weights=weights, codec_spec=self.config.downlink, private_key=self._private_key,
                                   extra={"bundle_sha256": self.bundle.sha256})

    # ---- publishing helpers -------------------------------------------------------------------
    def _send_assignment(self, device: str, assignment: Assignment) -> None:
        self._publish(self.topics.assign(device), assignment.to_envelope(self.config.fleet, device).encode())

    def _send_ack(self, device: str, ack: Ack) -> None:
        self._publish(self.topics.ack(device), ack.to_envelope(self.config.fleet, device).encode())

    def _publish(self, topic: str, data: bytes, *, retain: bool = False, wait: bool = False) -> None:
        info = self._client.publish(topic, data, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(30.0)
