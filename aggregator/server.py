"""The aggregator: runs rounds over MQTT.

A round (Bonawitz et al. 2019): publish the plan (retained) -> collect check-ins for a
window -> select the cohort with over-selection (seeded), answer every check-in, and tell the
others when to come back (pace steering) -> take updates until the goal count or the
deadline, validating each before it touches the model -> commit if enough reported (else the
round is abandoned and logged) -> server optimizer -> publish the new signed global model
(retained; full and delta). Bad messages are acknowledged with their reason and counted; they
never stop the aggregator.

Threads: paho's network thread only queues incoming messages; ONE intake thread decodes,
validates and folds them into the round, and acknowledges them (MQTT PUBACK and our Ack
message) only after the state that contains them is checkpointed. The caller's thread runs
`run_round()`. With a checkpoint directory the MQTT session is persistent, so after a
`kill -9` the broker delivers again whatever was not acknowledged, and the checkpoint holds
whatever was: the restarted aggregator continues the same round, nothing lost or doubled.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.aggregation import AggregationError
from aggregator.dp import DPFedAvgAggregator, make_any_aggregator
from aggregator.privacy_accounting import PrivacyAccountant
from aggregator.checkpoint import CheckpointError, CheckpointStore, ModelCheckpoint, RoundCheckpoint, RoundEnd
from aggregator.cohort import PaceSteering, select_cohort
from aggregator.config import AggregatorConfig
from aggregator.evaluation import EvalHook, FederatedEval, device_eval_counts
from aggregator.intake import IntakeLimits, RoundState, check_header, decode_into, value_check
from aggregator.metrics import AggregatorMetrics, JsonLines
from aggregator.publisher import PublishedModel, Release, build_inference_message, build_release, bundle_envelope
from aggregator.scale_out import CoordinatorLink, merge_states
from aggregator.secure_round import SecureAggregation
from models.bundle import Bundle
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, ValidationError
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan
from protocol.model_message import ModelMessage
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings, configure_client

log = logging.getLogger(__name__)

__all__ = ["Aggregator", "AggregatorConfig", "AggregatorStopped", "RoundResult"]

# Longest wait before the devices not selected in a round get their answer (see _reporting_phase).
STEER_DELAY_S = 1.0


class AggregatorStopped(RuntimeError):
    """`request_stop()` interrupted a round; the checkpoint lets a restart finish it."""


@dataclass
class RoundResult:
    round: int
    committed: bool
    version: int
    cohort: int
    participants: int
    dropped: int                # reports missing from the goal when the round closed
    checkins: int
    uplink_bytes: int
    model_bytes: int
    wall_s: float
    rejected: dict[str, int] = field(default_factory=dict)
    train_loss: float = float("nan")
    goal: int = 0
    duplicates: int = 0
    abandoned_reason: str = ""
    resumed: bool = False
    delta_bytes: int = 0
    eval: dict[str, float] = field(default_factory=dict)
    fed_eval: dict[str, float] = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)  # DP-FedAvg: clip, noise, epsilon so far at delta
    secagg: dict = field(default_factory=dict)   # secure aggregation: phase timings, bytes by phase, dropouts
    # time.monotonic() at the end of each phase (opened, window_closed, assigned, steered, reports_closed,
    # published), so a simulator can tell where a round's wall time went (bench/fleet_scale.py)
    phase_marks: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _OpenRound:
    """Bookkeeping of the round in progress (all of it goes into the round checkpoint)."""

    plan: RoundPlan
    phase: str                                   # "checkin" or "reporting"
    started_unix: float
    window_end_unix: float
    deadline_unix: float = 0.0
    steered_away: int = 0
    expected: int = 0                            # the window closes at this many check-ins (0: at its end)
    checkins: dict[str, CheckIn] = field(default_factory=dict)
    cohort: list[str] = field(default_factory=list)
    retry: dict[str, float] = field(default_factory=dict)   # unselected device -> retry_after_s
    goal: int = 0
    uplink_bytes: int = 0
    losses: list[float] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    fed_eval: FederatedEval = field(default_factory=FederatedEval)
    grants: dict[str, str] = field(default_factory=dict)    # scale-out: device -> worker
    partials: dict[str, dict] = field(default_factory=dict)  # scale-out: worker -> aggregator state
    resumed: bool = False
    accepted_sha: dict[str, str] = field(default_factory=dict)  # device -> sha256 of its update (the ledger)
    refused: set[str] = field(default_factory=set)  # cohort devices whose update for this round was rejected
    steering_sent: bool = False                  # the devices not selected have their answer
    marks: dict[str, float] = field(default_factory=dict)   # phase -> time.monotonic() at its end


class _ByteBoundedQueue:
    """A FIFO that holds at most `capacity` payload bytes (one item always fits).

    paho's network thread blocks in `put` while the intake thread is behind, so unread updates
    wait in the broker (which bounds and persists them), not in the aggregator's memory.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque = deque()
        self._bytes = 0
        self._cv = threading.Condition()

    def put(self, item: Any, size: int) -> None:
        with self._cv:
            while self._items and self._bytes + size > self.capacity:
                self._cv.wait()
            self._items.append((item, size))
            self._bytes += size
            self._cv.notify_all()

    def get(self) -> Any:
        with self._cv:
            while not self._items:
                self._cv.wait()
            item, size = self._items.popleft()
            self._bytes -= size
            self._cv.notify_all()
            return item

    def empty(self) -> bool:
        with self._cv:
            return not self._items


@dataclass
class _Pending:
    """An acknowledgement held back until the state it confirms is checkpointed."""

    mid: int
    qos: int
    reply: tuple[str, bytes] | None = None


class Aggregator:
    """Owns the global model and one MQTT connection; `run_round()` runs one round."""

    def __init__(self, config: AggregatorConfig, bundle: Bundle, mqtt_settings: MqttSettings, private_key: object,
                 *, weights: np.ndarray | None = None, client_id: str | None = None,
                 eval_hook: EvalHook | None = None) -> None:
        self.config = config
        self.bundle = bundle
        self.topics = FleetTopics(config.fleet)
        self._private_key = private_key
        self._mqtt = mqtt_settings
        self.dim = int(bundle.initial_weights.size)
        self.eval_hook = eval_hook
        self.metrics = AggregatorMetrics(config.fleet)
        self._jsonl = JsonLines(config.metrics_jsonl) if config.metrics_jsonl else None
        self.limits = IntakeLimits(dim=self.dim, max_norm=config.max_update_norm)
        self._check = value_check(self.limits)
        self.rejections: Counter[str] = Counter()
        self._cv = threading.Condition()
        self._flush_lock = threading.Lock()
        self._state: RoundState | None = None
        self._round: _OpenRound | None = None
        self._aggregate = make_any_aggregator(config.aggregation)
        self._accountant: PrivacyAccountant | None = None  # set on the first DP round
        self._online: set[str] = set()
        self._pace = PaceSteering(checkins_per_slot=config.pace_checkins_per_slot,
                                  max_skip_rounds=config.pace_max_skip_rounds, seed=config.seed)
        self._steered_until: dict[str, float] = {}
        # retained publishes (bundle, model, int8, plan) in order: a republish after a broker
        # restart racing a commit left the previous version retained
        self._retained_lock = threading.RLock()
        self._back_for: dict[str, int] = {}  # steered device -> the round it is expected back for
        self._previous: tuple[int, set[str]] = (-1, set())  # the last round's accepted ids, for late duplicates
        self._inbox = _ByteBoundedQueue(config.intake_buffer_mb * 2**20)
        self._pending: list[_Pending] = []
        self._dirty = False
        self._failure: BaseException | None = None
        self._abort = threading.Event()
        self._int8_thread: threading.Thread | None = None
        self._int8_envelope: bytes | None = None
        self._intake: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._link = CoordinatorLink(self.topics, config) if config.workers else None
        self._secure = SecureAggregation(self) if config.secure_aggregation else None
        self._store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
        self._last_end: RoundEnd | None = None  # how the last round ended (model checkpoint + ledger)
        self.version = 0
        self.round_id = 0
        self._rng = np.random.default_rng(config.seed)
        self.optimizer = config.make_server_optimizer()
        try:
            self._load_or_init(weights)
        except BaseException:
            if self._store is not None:
                self._store.close()
            raise
        self._connected = threading.Event()
        persistent = self._store is not None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"aggregator-{config.fleet}",
            protocol=mqtt_settings.paho_protocol(), manual_ack=True,
            **({} if mqtt_settings.mqtt_version == 5 else {"clean_session": not persistent}))
        configure_client(self._client, mqtt_settings)
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def _load_or_init(self, weights: np.ndarray | None) -> None:
        """The checkpointed model and open round if there are any, else the bundle's (or given) weights."""
        restored = self._store.load_model() if self._store else None
        if restored is not None:
            if weights is not None:
                log.warning("checkpoint found: starting from its model v%d, not from the weights passed in",
                            restored.version)
            self._restore_model(restored)
        else:
            initial = np.asarray(self.bundle.initial_weights if weights is None else weights, dtype=np.float32)
            self.optimizer.init(initial)
            self.release = self._build_release(initial, previous=None)
            if self._store:
                self._save_model()
        round_ckpt = self._store.load_round() if self._store else None
        if round_ckpt is not None and round_ckpt.round_id > self.round_id:
            self._resume_round(round_ckpt)

    # ---- public state ------------------------------------------------------------------------
    @property
    def model(self) -> PublishedModel:
        return self.release.full

    @property
    def weights(self) -> np.ndarray:
        return self.release.weights

    @property
    def online_devices(self) -> int:
        return len(self._online)

    @property
    def round_in_progress(self) -> bool:
        """True while a round is open (also one resumed from the checkpoint and not yet finished)."""
        return self._round is not None

    # ---- connection ------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        """Connect, then (re-)publish the retained state devices need: bundle, model, delta, int8, plan."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        self._intake = threading.Thread(target=self._intake_loop, name=f"intake-{self.config.fleet}", daemon=True)
        self._intake.start()
        kwargs: dict[str, Any] = {}
        if self._mqtt.mqtt_version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s if self._store else 0
            kwargs = {"clean_start": self._store is None, "properties": props}
        self._client.connect_async(self._mqtt.host, self._mqtt.port, keepalive=self._mqtt.keepalive_s, **kwargs)
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(timeout_s):
            self.stop()
            raise ConnectionError(f"aggregator could not connect to {self._mqtt.host}:{self._mqtt.port} in {timeout_s} s")
        self._republish_retained()

    def _republish_retained(self) -> None:
        """Publish the retained state devices bootstrap from: bundle, model, delta, int8, the open
        round's plan (and its assignments). At start, and after reconnecting to a broker that lost
        our session, since it lost its retained messages too (a SIGKILL before it saved them)."""
        with self._retained_lock:  # what is current now; a commit or a new round waits, then overwrites it
            self._publish(self.topics.bundle, bundle_envelope(self.config.fleet, self.bundle.to_bytes(),
                                                              self.bundle.model_id), retain=True, wait=True)
            self._publish_release(self.release)
            if self._int8_envelope is not None:
                self._publish(self.topics.model_int8, self._int8_envelope, retain=True, wait=True)
            with self._cv:
                r = self._round
            if r is not None:  # resumed after a restart, or open while the broker restarted: tell the fleet again
                self._publish(self.topics.round, r.plan.to_envelope(self.config.fleet).encode(), retain=True, wait=True)
                if r.phase == "reporting":
                    self._send_assignments(r)
                    if self._link is not None:
                        self._publish(*self._link.round_message(r.plan, r.cohort,
                                                                self._state.open if self._state else False,
                                                                self.config), retain=True, wait=True)

    def stop(self) -> None:
        """Flush and acknowledge what is checkpointed, then disconnect (the session stays on the broker)."""
        if self._stopped:
            return
        self._stopped = True
        self._abort.set()  # a round still running in another thread raises AggregatorStopped
        if self._intake is not None:
            self._inbox.put(None, 0)
            self._intake.join(30)
        if self._int8_thread is not None:
            self._int8_thread.join(120)
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
        self.metrics.close()
        if self._store is not None:
            self._store.close()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object = None) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("aggregator: connection refused: %s", reason_code)
            return
        if self._link is not None:
            subs = [(self._link.all_claims, 1), (self._link.all_partials, 1)]
        else:
            subs = [(self.topics.all_updates, 1)]
        if self._secure is not None:
            subs.append((self.topics.all_secagg_up, 1))
        client.subscribe(subs + [(self.topics.all_checkins, 1), (self.topics.all_status, 1)])
        reconnect = self._connected.is_set()
        self._connected.set()
        if reconnect and not getattr(flags, "session_present", False) and not self._stopped:
            log.warning("aggregator: reconnected and the broker has no session of ours (restarted without "
                        "saving?): publishing the retained bundle, model and round again")
            # not on paho's network thread: the publishes wait for their PUBACKs
            threading.Thread(target=self._republish_retained, name="republish", daemon=True).start()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                       properties: object = None) -> None:
        if not self._stopped:
            log.warning("aggregator: disconnected from the broker (%s); paho reconnects", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # paho's network thread: queue only (blocks while the intake thread is a buffer behind)
        self._inbox.put((msg.topic, msg.payload, msg.mid, msg.qos), len(msg.payload))

    # ---- intake thread ----------------------------------------------------------------------
    def _intake_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                break
            if self._failure is not None:
                continue  # no more acks: the broker keeps these for the restarted aggregator
            topic, payload, mid, qos = item
            token = _Pending(mid, qos)
            try:
                self._process(topic, payload, token)
            except Exception:  # never let a bug in one message kill intake
                log.exception("aggregator: error handling %s", topic)
                self._defer(token)
            with self._cv:
                backlog = len(self._pending)
            if self._inbox.empty() or backlog >= self.config.checkpoint_batch:
                self._flush_or_fail()
        self._flush_or_fail()

    def _process(self, topic: str, payload: bytes, token: _Pending) -> None:
        rest = topic[len(self.topics.root) + 1:] if topic.startswith(self.topics.root + "/") else ""
        kind = rest.split("/", 1)[0]
        try:
            if kind == "update":
                self._handle_update(self.topics.device_of(topic), payload, token)
            elif kind == "secagg" and self._secure is not None and rest.startswith("secagg/up/"):
                self._secure.on_message(self.topics.device_of(topic), payload, token)
            elif kind == "checkin":
                device = self.topics.device_of(topic)
                self._handle_checkin(device, decode_envelope(payload, expect=Kind.CHECKIN), token)
            elif kind == "status":
                device = self.topics.device_of(topic)
                if payload:
                    env = decode_envelope(payload, expect=Kind.STATUS)
                    (self._online.add if env.meta.get("state") == "online" else self._online.discard)(device)
                    self.metrics.c(self.metrics.online).set(len(self._online))
                self._defer(token)
            elif self._link is not None and self._link.is_claim(topic):
                self._handle_claim(self._link.worker_of(topic), payload, token)
            elif self._link is not None and self._link.is_partial(topic):
                self._handle_partial(self._link.worker_of(topic), payload, token)
            else:
                self._defer(token)
        except ProtocolError as exc:
            self.rejections[exc.reason.value] += 1
            self.metrics.rejected(exc.reason.value)
            log.warning("aggregator: refused message on %s: %s", topic, exc)
            self._defer(token)

    def _handle_checkin(self, device: str, env: Envelope, token: _Pending) -> None:
        checkin = CheckIn.from_envelope(env)
        reply = None
        with self._cv:
            r = self._round
            if r is not None and checkin.round_id == r.plan.round_id:
                if r.phase == "checkin":
                    if device not in r.checkins:
                        r.checkins[device] = checkin
                        self._pace.observe_checkin(device)
                        self.metrics.c(self.metrics.checkins).inc()
                        self._dirty = True
                        if r.expected and len(r.checkins) >= r.expected:  # not a wake-up per check-in
                            self._cv.notify_all()
                elif device not in r.cohort:
                    # window closed: come back for the next round. Not spread again: this device
                    # already sat out the rounds it was given (a device back from pace steering
                    # hears the retained plan, whose window may have closed)
                    now = time.time()
                    retry = round(self._pace.until_next_round(now - r.started_unix), 3) \
                        if self.config.pace_steering else 0.0
                    self._steered_until[device] = now + retry
                    self._back_for[device] = r.plan.round_id + 1
                    reply = self._assignment_message(device, Assignment(checkin.round_id, False, retry, "window_closed",
                                                                        r.plan.round_id + 1))
        self._defer(token, reply)

    def _handle_update(self, device: str, data: bytes, token: _Pending) -> None:
        started = time.perf_counter()
        try:
            env = decode_envelope(data, max_payload=self.config.max_payload, expect=Kind.UPDATE)
            if env.device != device:
                raise ValidationError(Reason.BAD_FIELD, f"envelope says device {env.device!r}, topic says {device!r}")
        except ProtocolError as exc:
            self._reject(token, device, -1, exc)
            return
        with self._cv:
            state, r = self._state, self._round
            try:
                if state is None:
                    raise ValidationError(Reason.ROUND_CLOSED, "no round is open yet")
                if env.round == self._previous[0] and device in self._previous[1]:
                    raise ValidationError(Reason.DUPLICATE, f"already counted in round {env.round}")
                codec = check_header(env, state, self.limits)
                self._aggregate.add_decoded_into(decode_into(codec, env.payload), float(env.example_count),
                                                 client_id=device, check=self._check)
            except ValidationError as exc:
                if exc.reason is Reason.DUPLICATE:  # QoS 1 redelivery: counted once, confirmed again
                    if r is not None and env.round == r.plan.round_id:
                        r.duplicates += 1
                    self.metrics.c(self.metrics.duplicates).inc()
                    log.info("aggregator: duplicate update from %s ignored", device)
                    self._defer(token, self._ack_message(device, Ack(env.round, True, Reason.DUPLICATE.value,
                                                                     "already counted")))
                else:
                    self._reject(token, device, env.round, exc)
                return
            except AggregationError as exc:  # e.g. a robust aggregator's buffer is full
                self._reject(token, device, env.round, ValidationError(Reason.ROUND_CLOSED, str(exc)))
                return
            assert state is not None and r is not None
            state.accepted.add(device)
            r.accepted_sha[device] = hashlib.sha256(data).hexdigest()
            self._account(r, env.meta, len(data))
            if len(state.accepted) >= r.goal:
                state.open = False  # goal reached: later reports (the over-selected) are refused
            self._dirty = True
            self._cv.notify_all()
        self.metrics.intake_seconds.labels(self.config.fleet).observe(time.perf_counter() - started)
        self.metrics.c(self.metrics.updates_accepted).inc()
        self.metrics.c(self.metrics.uplink_bytes).inc(len(data))
        self._defer(token, self._ack_message(device, Ack(env.round, True)))

    def _account(self, r: _OpenRound, meta: dict, size: int) -> None:
        r.uplink_bytes += size
        loss = meta.get("train_loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            r.losses.append(float(loss))
        counts = device_eval_counts(meta)
        if counts is not None:
            r.fed_eval.add(counts)

    def _reject(self, token: _Pending, device: str, round_id: int, exc: ProtocolError) -> None:
        self.rejections[exc.reason.value] += 1
        self.metrics.rejected(exc.reason.value)
        with self._cv:
            r = self._round
            if r is not None:
                r.rejected[exc.reason.value] += 1
                if round_id == r.plan.round_id and self._state is not None and device in self._state.cohort:
                    r.refused.add(device)  # its answer for this round is in: no need to wait for it
                    self._cv.notify_all()
        # a late report of an over-selected device is expected, not a problem
        level = logging.INFO if exc.reason is Reason.ROUND_CLOSED else logging.WARNING
        log.log(level, "aggregator: rejected update from %s: %s", device, exc)
        self._defer(token, self._ack_message(device, Ack(max(round_id, 0), False, exc.reason.value, exc.detail[:500])))

    # ---- scale-out: the coordinator's side ----------------------------------------------------
    def _handle_claim(self, worker: str, payload: bytes, token: _Pending) -> None:
        assert self._link is not None
        claim = self._link.parse_claim(payload)
        device = claim["device"]
        with self._cv:
            state, r = self._state, self._round
            try:
                if state is None or r is None:
                    raise ValidationError(Reason.ROUND_CLOSED, "no round is open")
                self._link.check_claim(claim, state)
            except ValidationError as exc:
                if exc.reason is Reason.DUPLICATE and r is not None:
                    r.duplicates += 1
                    self.metrics.c(self.metrics.duplicates).inc()
                elif r is not None:
                    r.rejected[exc.reason.value] += 1
                    self.rejections[exc.reason.value] += 1
                    self.metrics.rejected(exc.reason.value)
                self._defer(token, self._link.grant_message(worker, claim, False, exc.reason.value, exc.detail))
                return
            state.accepted.add(device)
            r.grants[device] = worker
            self._account(r, claim.get("meta", {}), int(claim.get("bytes", 0)))
            if len(state.accepted) >= r.goal:
                state.open = False
            self._dirty = True
            self._cv.notify_all()
        self.metrics.c(self.metrics.updates_accepted).inc()
        self._defer(token, self._link.grant_message(worker, claim, True))

    def _handle_partial(self, worker: str, payload: bytes, token: _Pending) -> None:
        assert self._link is not None
        round_id, state = self._link.parse_partial(payload)
        with self._cv:
            r = self._round
            if r is not None and round_id == r.plan.round_id:
                r.partials[worker] = state
                self._cv.notify_all()
        self._defer(token)

    # ---- acknowledgements and checkpoints -----------------------------------------------------
    def _defer(self, token: _Pending, reply: tuple[str, bytes] | None = None) -> None:
        token.reply = reply
        with self._cv:
            self._pending.append(token)

    def _ack_message(self, device: str, ack: Ack) -> tuple[str, bytes]:
        return self.topics.ack(device), ack.to_envelope(self.config.fleet, device).encode()

    def _assignment_message(self, device: str, assignment: Assignment) -> tuple[str, bytes]:
        return self.topics.assign(device), assignment.to_envelope(self.config.fleet, device).encode()

    def flush(self) -> None:
        """Checkpoint the round if it changed, then send the acknowledgements it covers."""
        with self._flush_lock:
            with self._cv:
                pending, self._pending = self._pending, []
                snapshot = self._round_snapshot() if self._dirty and self._store is not None else None
                self._dirty = False
            if snapshot is not None:
                assert self._store is not None
                before = self._store.bytes_written
                self._store.save_round(snapshot)
                self._store.ledger.record_accepted(snapshot.round_id, snapshot.meta["accepted_sha256"])
                self.metrics.c(self.metrics.checkpoint_bytes).inc(self._store.bytes_written - before)
            for item in pending:
                if item.reply is not None:
                    self._client.publish(item.reply[0], item.reply[1], qos=1)
                if item.qos > 0:
                    self._client.ack(item.mid, item.qos)

    def _flush_or_fail(self) -> None:
        try:
            self.flush()
        except CheckpointError as exc:
            log.error("aggregator: %s", exc)
            with self._cv:
                self._failure = exc
                self._cv.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._abort.is_set():
            raise AggregatorStopped("the aggregator was asked to stop in the middle of a round")

    def request_stop(self) -> None:
        """Make a running `run_round()` raise AggregatorStopped soon (safe from a signal handler)."""
        self._abort.set()

    def _round_snapshot(self) -> RoundCheckpoint | None:
        r, state = self._round, self._state
        if r is None or state is None:
            return None
        meta = {
            "plan": asdict(r.plan), "phase": r.phase, "started_unix": r.started_unix,
            "window_end_unix": r.window_end_unix, "deadline_unix": r.deadline_unix, "steered_away": r.steered_away,
            "checkins": {d: asdict(c) for d, c in r.checkins.items()}, "cohort": r.cohort, "retry": r.retry,
            "goal": r.goal, "accepted": sorted(state.accepted), "open": state.open, "uplink_bytes": r.uplink_bytes,
            "losses": r.losses, "rejected": dict(r.rejected), "duplicates": r.duplicates,
            "fed_eval": r.fed_eval.state(), "grants": r.grants, "rng_state": self._rng.bit_generator.state,
            "accepted_sha256": r.accepted_sha,
        }
        aggregate = self._aggregate.state() if self._aggregate.count else None
        return RoundCheckpoint(r.plan.round_id, meta, aggregate)

    def _resume_round(self, ckpt: RoundCheckpoint) -> None:
        m = ckpt.meta
        plan = RoundPlan(**m["plan"])
        r = _OpenRound(plan=plan, phase=m["phase"], started_unix=m["started_unix"],
                       window_end_unix=m["window_end_unix"], deadline_unix=m["deadline_unix"],
                       steered_away=m["steered_away"], checkins={d: CheckIn(**c) for d, c in m["checkins"].items()},
                       cohort=list(m["cohort"]), retry=dict(m["retry"]), goal=m["goal"], uplink_bytes=m["uplink_bytes"],
                       losses=list(m["losses"]), rejected=Counter(m["rejected"]), duplicates=m["duplicates"],
                       fed_eval=FederatedEval.from_state(m["fed_eval"]), grants=dict(m["grants"]), resumed=True,
                       accepted_sha=dict(m.get("accepted_sha256", {})))
        self._aggregate.reset(self.dim)
        if ckpt.aggregate is not None:
            self._aggregate.load_state(ckpt.aggregate)
        if sorted(self._aggregate.client_ids) != sorted(m["accepted"]) and not r.grants:
            raise CheckpointError(f"round checkpoint of round {ckpt.round_id} is inconsistent: accepted ids "
                                  "differ from the ids in the running sum; move round.npz away to drop the round")
        self._rng.bit_generator.state = m["rng_state"]
        self._state = RoundState(plan.round_id, plan.base_version, plan.codec, set(r.cohort), set(m["accepted"]),
                                 bool(m["open"]))
        if r.phase == "checkin":
            # the window ran on while we were down, and the check-ins not yet checkpointed are still
            # queued on the broker for our session: open the window again so they arrive before the
            # cohort is chosen (closing it at once gave an empty cohort and an abandoned round)
            r.window_end_unix = time.time() + self.config.checkin_window_s
        self._round = r
        self.round_id = plan.round_id
        if self._store is not None:  # the ledger may be one flush behind the checkpoint: complete it
            self._store.ledger.record_accepted(plan.round_id, r.accepted_sha)
        log.info("resuming round %d (%s phase) from %s: %d check-ins, %d of %d reports accepted", plan.round_id,
                 r.phase, self._store.directory if self._store else "?", len(r.checkins), len(m["accepted"]), r.goal)

    def _save_model(self) -> None:
        assert self._store is not None
        delta = self.release.delta.envelope_bytes if self.release.delta is not None else b""
        self._store.save_model(ModelCheckpoint(
            version=self.version, last_round=self.round_id, weights=self.release.weights,
            optimizer=self.optimizer.state(), rng_state=self._rng.bit_generator.state,
            model_envelope=self.release.full.envelope_bytes, delta_envelope=delta,
            extra={"model_id": self.bundle.model_id, "period_s": self._pace.period_s,
                   "last_round_end": self._last_end.to_dict() if self._last_end is not None else None}))

    def _restore_model(self, ckpt: ModelCheckpoint) -> None:
        model_id = ckpt.extra.get("model_id")
        if model_id != self.bundle.model_id:
            raise CheckpointError(f"checkpoint in {self._store.directory if self._store else '?'} is for model "
                                  f"{model_id}, the bundle is {self.bundle.model_id}: use that bundle or another "
                                  "checkpoint directory")
        if ckpt.weights.shape != (self.dim,):
            raise CheckpointError(f"checkpoint weights have shape {ckpt.weights.shape}, the model has {self.dim}")
        self.version, self.round_id = ckpt.version, ckpt.last_round
        self.optimizer.init(ckpt.weights)
        self.optimizer.load_state(ckpt.optimizer)
        self._rng.bit_generator.state = ckpt.rng_state
        self._pace.period_s = ckpt.extra.get("period_s")
        full = PublishedModel(ckpt.version, ckpt.weights, ckpt.model_envelope, _payload_len(ckpt.model_envelope))
        delta = (PublishedModel(ckpt.version, ckpt.weights, ckpt.delta_envelope, _payload_len(ckpt.delta_envelope))
                 if ckpt.delta_envelope else None)
        self.release = Release(full, delta)
        if self._store is not None:
            self._int8_envelope = self._store.load_int8()
            end = ckpt.extra.get("last_round_end")
            if end is not None:  # killed between the model checkpoint and its ledger line
                self._last_end = RoundEnd(**end)
                self._store.ledger.record_round_end(self._last_end)
        log.info("restored model v%d (last round %d) from %s", self.version, self.round_id,
                 self._store.directory if self._store else "?")

    # ---- rounds ------------------------------------------------------------------------------
    def run_round(self) -> RoundResult:
        """Run one round to its end (committed or abandoned) and return its metrics.

        After a restart from a checkpoint, the first call finishes the interrupted round.
        """
        self._raise_if_failed()
        r = self._round if self._round is not None else self._open_round()
        if r.phase == "checkin":
            self._checkin_phase(r)
        if self._secure is not None:
            self._secure.run(r)  # aggregator/secure_round.py: the four phases instead of plain updates
        else:
            self._reporting_phase(r)
        return self._finish_round(r)

    def _open_round(self) -> _OpenRound:
        cfg = self.config
        self.round_id += 1
        plan = RoundPlan(
            round_id=self.round_id, base_version=self.version, model_id=self.bundle.model_id,
            codec=parse_codec(cfg.codec).spec, target_count=cfg.clients_per_round,
            checkin_window_s=cfg.checkin_window_s, report_deadline_s=cfg.report_deadline_s,
            local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.client_lr, mu=cfg.mu,
            max_steps=cfg.max_steps, downlink=parse_codec(cfg.downlink).spec,
            delta_downlink=self.release.delta is not None, clip_norm=cfg.client_clip,
            secure_aggregation=cfg.secure_aggregation, update_clip=cfg.secure_clip() if cfg.secure_aggregation else 0.0,
            secure_weighted=cfg.secure_weighted(),
        )
        now = time.time()
        with self._cv:
            self._steered_until = {d: t for d, t in self._steered_until.items() if t > now}
            self._back_for = {d: b for d, b in self._back_for.items() if b > plan.round_id}
            r = _OpenRound(plan, "checkin", now, now + cfg.checkin_window_s,
                           steered_away=self._steered_away(plan.round_id, now))
            if self._state is not None:
                self._previous = (self._state.round_id, set(self._state.accepted))
            self._state = RoundState(plan.round_id, plan.base_version, plan.codec)
            self._aggregate.reset(self.dim)
            self._round = r
            self._dirty = True
        self.flush()
        with self._retained_lock:
            self._publish(self.topics.round, plan.to_envelope(cfg.fleet).encode(), retain=True)
        r.marks["opened"] = time.monotonic()
        return r

    def _checkin_phase(self, r: _OpenRound) -> None:
        cfg = self.config
        with self._cv:
            r.expected = expected = max(1, cfg.expected_checkins - r.steered_away) if cfg.expected_checkins else 0
            while True:
                self._raise_if_failed()
                left = r.window_end_unix - time.time()
                if left <= 0 or (expected and len(r.checkins) >= expected):
                    break
                self._cv.wait(timeout=min(0.5, left))
            candidates = sorted(r.checkins)
            r.cohort = select_cohort(candidates, cfg.cohort_size(len(candidates)), self._rng)
            r.goal = cfg.goal(len(r.cohort))
            chosen = set(r.cohort)
            now = time.time()
            others = [device for device in candidates if device not in chosen]
            # the cohort waits its turn too once this round is done (told with its assignment):
            # coming straight back, it made up a third of the next window's check-ins
            for device, retry in zip(others + r.cohort, self._retry_afters(r, len(candidates))):
                if device not in chosen:
                    r.retry[device] = retry
                self._steered_until[device] = now + retry
                self._back_for[device] = r.plan.round_id + self._pace.rounds_ahead(retry, now - r.started_unix)
            assert self._state is not None
            self._state.cohort = chosen
            r.phase = "reporting"
            r.deadline_unix = now + cfg.report_deadline_s
            self._dirty = True
        r.marks["window_closed"] = time.monotonic()
        self.flush()  # the cohort is durable before any device hears of it (and check-ins are acked)
        if self._link is not None:
            self._publish(*self._link.round_message(r.plan, r.cohort, True, cfg), retain=True, wait=True)
        # plain rounds answer the devices not selected from _reporting_phase, once the cohort is training
        self._send_assignments(r, steer=self._secure is not None)

    def _send_assignments(self, r: _OpenRound, *, steer: bool = True) -> None:
        """Tell the cohort, then (`steer`) every device not selected when to come back.

        The cohort goes first, and a plain round sends the "not selected" answers only once the
        cohort is training (`_steer_once`): up to a whole fleet's worth of them would otherwise
        queue in front of the cohort's model downloads while the trainers wait.
        """
        now = time.time()
        with self._cv:
            retries = [round(max(0.0, self._steered_until.get(d, now) - now), 3) for d in r.cohort]
            back_for = [self._back_for.get(d, 0) for d in r.cohort]
        for device, retry, back in zip(r.cohort, retries, back_for):
            self._publish(*self._assignment_message(device, Assignment(r.plan.round_id, True, retry, "", back)))
        r.marks["assigned"] = time.monotonic()
        if steer:
            self._send_steering(r)

    def _send_steering(self, r: _OpenRound) -> None:
        """"Not selected" answers; each says how long is left of the retry_after decided at selection,
        so the device comes back when the aggregator expects it however late the answer leaves."""
        now = time.time()
        with self._cv:
            r.steering_sent = True
            answers = [(d, round(max(0.0, self._steered_until.get(d, now) - now), 3) if retry > 0 else 0.0,
                        self._back_for.get(d, 0)) for d, retry in r.retry.items()]
        for device, retry, back in answers:
            self._publish(*self._assignment_message(device, Assignment(r.plan.round_id, False, retry, "not_selected",
                                                                       back)))
        r.marks["steered"] = time.monotonic()

    def _steer_once(self, r: _OpenRound) -> None:
        if not r.steering_sent:
            self._send_steering(r)

    def _retry_afters(self, r: _OpenRound, count: int) -> list[float]:
        """retry_after for `count` devices not needed now, around those already sent away (lock held)."""
        if not self.config.pace_steering:
            return [0.0] * count
        now = time.time()
        booked = [until - now for until in self._steered_until.values() if until > now]
        retries = self._pace.retry_afters(count, self.config.cohort_size(len(r.checkins)), now - r.started_unix, booked)
        return [round(retry, 3) for retry in retries]

    def steered_away_now(self) -> int:
        """Devices pace steering keeps out of the next round: the next round's window does not
        count on them (`expected_checkins` minus these)."""
        with self._cv:
            return self._steered_away(self.round_id + 1, time.time())

    def _steered_away(self, round_id: int, now: float) -> int:
        """Devices that will not check in to `round_id`: their retry_after runs on, or they are
        expected back for a later round (lock held)."""
        return sum(1 for d in self._steered_until.keys() | self._back_for.keys()
                   if self._steered_until.get(d, 0.0) > now or self._back_for.get(d, 0) > round_id)

    def _reporting_phase(self, r: _OpenRound) -> None:
        # the devices not selected hear once the first update is in (the cohort has its models and
        # trains), or after STEER_DELAY_S at the latest
        steer_at = time.monotonic() + min(STEER_DELAY_S, self.config.report_deadline_s / 4)
        with self._cv:
            state = self._state
            assert state is not None
            while state.open and len(state.accepted) < r.goal:
                self._raise_if_failed()
                if len(state.accepted | r.refused) >= len(r.cohort):
                    break  # every device of the cohort was accepted or refused: nothing more can come
                left = r.deadline_unix - time.time()
                if left <= 0:
                    break
                if not r.steering_sent:
                    steer_in = steer_at - time.monotonic()
                    if state.accepted or steer_in <= 0:
                        self._cv.release()  # ~1,000 publishes must not hold up the intake thread
                        try:
                            self._steer_once(r)
                        finally:
                            self._cv.acquire()
                        continue
                    left = min(left, steer_in)
                self._cv.wait(timeout=min(0.5, left))
            state.open = False
            self._dirty = True
        self._steer_once(r)  # the goal was reached (or the deadline passed) before
        r.marks["reports_closed"] = time.monotonic()
        self.flush()  # every accepted update is in the checkpoint, and acknowledged
        self._raise_if_failed()

    def _collect_partials(self, r: _OpenRound) -> str:
        """Scale-out: ask the workers for their partial sums and merge them; '' or why not."""
        assert self._link is not None
        self._publish(*self._link.round_message(r.plan, r.cohort, False, self.config), retain=True, wait=True)
        workers = sorted(set(r.grants.values()))
        deadline = time.monotonic() + self.config.worker_timeout_s
        with self._cv:
            while any(w not in r.partials for w in workers) and time.monotonic() < deadline:
                self._cv.wait(timeout=0.5)
            missing = [w for w in workers if w not in r.partials]
            partials = {w: r.partials[w] for w in workers if w in r.partials}
        if missing:
            return f"no partial sum from worker(s) {', '.join(missing)} within {self.config.worker_timeout_s} s"
        try:
            merged = merge_states([partials[w] for w in workers], dim=self.dim)
            got = sorted(str(x) for x in np.asarray(merged["client_ids"] if "client_ids" in merged
                                                     else merged["inner.client_ids"]).tolist())
            if got != sorted(r.grants):
                return f"the workers' partial sums hold {len(got)} updates, {len(r.grants)} were granted"
            self._aggregate.load_state(merged)
        except (ValueError, KeyError) as exc:
            return f"cannot merge the workers' partial sums: {exc}"
        return ""

    def _account_privacy(self, cohort: int, checkins: int) -> dict:
        """Epsilon spent so far when the aggregation is DP-FedAvg (fixed sampling rate: the first
        round's cohort / check-ins, an approximation of Poisson sampling; see aggregator/PRIVACY.md)."""
        if not isinstance(self._aggregate, DPFedAvgAggregator):
            return {}
        dp = self._aggregate.config
        if self._accountant is None:
            q = min(1.0, cohort / max(checkins, cohort, 1))
            self._accountant = PrivacyAccountant(dp.update_noise_multiplier, q, self.config.dp_delta)
        epsilon = self._accountant.step()
        return {**self._aggregate.round_report(), "epsilon": epsilon, "delta": self.config.dp_delta,
                "sampling_probability": self._accountant.sampling_probability, "rounds": self._accountant.rounds}

    def _finish_round(self, r: _OpenRound) -> RoundResult:
        cfg = self.config
        state = self._state
        assert state is not None
        accepted = len(state.accepted)
        needed = cfg.needed_reports(len(r.cohort))
        reason = "" if accepted >= needed else f"{accepted} of {len(r.cohort)} reports, {needed} needed"
        if self._secure is not None:  # committed when the secure sum was unmasked (>= threshold survived)
            reason = self._secure.commit_reason(r)
        if not reason and self._link is not None:
            reason = self._collect_partials(r)
        committed = not reason
        delta_bytes = 0
        if committed:
            step = self._aggregate.result()
            proposed = self.optimizer.apply(self.release.weights, step)
            self.version += 1
            self.release = self._build_release(proposed, previous=self.release.full)
            delta_bytes = len(self.release.delta.envelope_bytes) if self.release.delta is not None else 0
        else:
            log.warning("aggregator: round %d ABANDONED: %s", r.plan.round_id, reason)
        if self._store is not None:
            self._last_end = RoundEnd(r.plan.round_id, self.version, committed, accepted)
            self._save_model()  # the round is over (committed or not) before anyone hears of it
            self._store.ledger.record_round_end(self._last_end)
        if committed:
            self._publish_release(self.release)
            self._maybe_publish_int8()
        r.marks["published"] = time.monotonic()
        privacy = self._account_privacy(len(r.cohort), len(r.checkins)) if committed else {}
        evaluation: dict[str, float] = {}
        if committed and self.eval_hook is not None and cfg.eval_every and r.plan.round_id % cfg.eval_every == 0:
            evaluation = {k: float(v) for k, v in self.eval_hook(self.weights).items()}
        with self._cv:
            self._pace.observe_round(time.time() - r.started_unix)
        result = RoundResult(
            round=r.plan.round_id, committed=committed, version=self.version, cohort=len(r.cohort),
            participants=accepted, dropped=max(0, r.goal - accepted), checkins=len(r.checkins),
            uplink_bytes=r.uplink_bytes, model_bytes=len(self.release.full.envelope_bytes),
            wall_s=time.time() - r.started_unix, rejected=dict(r.rejected),
            train_loss=float(np.mean(r.losses)) if r.losses else float("nan"), goal=r.goal,
            duplicates=r.duplicates, abandoned_reason=reason, resumed=r.resumed, delta_bytes=delta_bytes,
            eval=evaluation, fed_eval=r.fed_eval.result(), privacy=privacy,
            secagg=self._secure.report(r) if self._secure is not None else {}, phase_marks=dict(r.marks),
        )
        with self._cv:
            self._round = None  # late updates still meet the closed RoundState: round_closed / duplicate
        self.metrics.round_ended(result.to_dict())
        if self._jsonl is not None:
            self._jsonl.write({"fleet": cfg.fleet, "time": time.time(), **result.to_dict()})
        log.info("round %d: %s, %d/%d reports (cohort %d), %d check-ins, uplink %d B, %.1f s%s", result.round,
                 "committed" if committed else "ABANDONED", accepted, r.goal, len(r.cohort), result.checkins,
                 r.uplink_bytes, result.wall_s, f", eval {evaluation}" if evaluation else "")
        return result

    # ---- publishing -----------------------------------------------------------------------------
    def _build_release(self, proposed: np.ndarray, previous: PublishedModel | None) -> Release:
        return build_release(fleet=self.config.fleet, model_id=self.bundle.model_id, version=self.version,
                             proposed=proposed, previous=previous, full_codec=self.config.downlink,
                             delta_codec=self.config.downlink_delta, private_key=self._private_key,
                             extra={"bundle_sha256": self.bundle.sha256, "round": self.round_id})

    def _publish_release(self, release: Release) -> None:
        with self._retained_lock:
            self._publish(self.topics.model, release.full.envelope_bytes, retain=True, wait=True)
            if release.delta is not None:
                self._publish(self.topics.model_delta, release.delta.envelope_bytes, retain=True, wait=True)

    def _maybe_publish_int8(self) -> None:
        every = self.config.int8_every
        if not every or self.version % every:
            return
        if self._int8_thread is not None and self._int8_thread.is_alive():
            log.info("int8 export of an earlier version still running; skipping v%d", self.version)
            return
        version, weights = self.version, self.weights.copy()
        self._int8_thread = threading.Thread(target=self._publish_int8, args=(version, weights),
                                             name="int8-export", daemon=True)
        self._int8_thread.start()

    def _publish_int8(self, version: int, weights: np.ndarray) -> None:
        try:
            from models.export import export_int8_inference  # TensorFlow: only when asked for

            tflite = export_int8_inference(self.bundle, weights)
            data = build_inference_message(fleet=self.config.fleet, model_id=self.bundle.model_id, version=version,
                                           tflite=tflite, weights=weights, private_key=self._private_key,
                                           extra={"bundle_sha256": self.bundle.sha256})
            if self._store is not None:
                self._store.save_int8(data)
            with self._retained_lock:
                self._int8_envelope = data
                self._publish(self.topics.model_int8, data, retain=True, wait=True)
            log.info("published the int8 inference model of v%d (%d bytes)", version, len(tflite))
        except Exception:
            log.exception("int8 export of v%d failed; devices keep the previous inference model", version)

    def _publish(self, topic: str, data: bytes, *, retain: bool = False, wait: bool = False) -> None:
        info = self._client.publish(topic, data, qos=1, retain=retain)
        if wait:
            try:
                info.wait_for_publish(30.0)
            except (RuntimeError, ValueError) as exc:  # not connected: paho sends it after reconnecting
                log.warning("aggregator: %s queued, not yet sent: %s", topic, exc)


def _payload_len(envelope: bytes) -> int:
    try:
        return len(ModelMessage.from_envelope(decode_envelope(envelope)).weights_payload)
    except ProtocolError:
        return 0
