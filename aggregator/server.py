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
from paho.mqtt.subscribeoptions import SubscribeOptions

from aggregator.aggregation import AggregationError
from aggregator.dp import DPFedAvgAggregator, make_any_aggregator
from aggregator.privacy_accounting import PrivacyAccountant
from aggregator.checkpoint import CheckpointError, CheckpointStore, ModelCheckpoint, RoundCheckpoint, RoundEnd
from aggregator.cohort import PaceSteering, select_cohort, thin_but_due
from aggregator.config import AggregatorConfig
from aggregator.fleet_lease import FleetLease, FleetTaken, owner_token, parse_retained
from aggregator.evaluation import EvalHook, FederatedEval, device_eval_counts, eval_bound
from aggregator.intake import IntakeLimits, RoundState, check_header, decode_into, value_check
from aggregator.metrics import AggregatorMetrics, JsonLines
from aggregator.publisher import (PublishedModel, Release, build_inference_message, build_release, bundle_envelope,
                                  bundle_extra, bundle_file_bytes)
from aggregator.scale_out import CoordinatorLink, agg_root, merge_states
from aggregator.recovery import (RECOVER_FLAG, RetainedModel, RetainedProbe, broker_evidence_message,
                                 inspect_retained_model, local_evidence_message)
from aggregator.secure_round import SecureAggregation
from aggregator.weights import WeightBound
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
# A retained status message above this size is junk a device parked on the broker: the aggregator deletes it.
MAX_STATUS_BYTES = 4096


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
    weight_capped: int = 0      # updates whose claimed example count was cut (aggregator/weights.py)
    checkin_wait_s: float = 0.0  # how long the window was extended waiting for the report floor

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
    bound: WeightBound | None = None             # the cohort's weight limits (built from the check-ins)
    weight_capped: int = 0                       # updates whose claimed example count was cut
    extended_s: float = 0.0                      # window extended this long, waiting for the report floor
    due: set[str] = field(default_factory=set)   # booked for this round, still away when it opened


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
                 eval_hook: EvalHook | None = None, recover_from_broker: bool = False) -> None:
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
        self._retained_unconfirmed: dict[str, mqtt.MQTTMessageInfo] = {}
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
        # the fleet lease (aggregator/fleet_lease.py): nothing is processed until it is ours
        self._lease = FleetLease(self.topics, owner_token(config.checkpoint_dir), config.lease_interval_s) \
            if config.lease_interval_s > 0 else None
        self._lease_seen = b""              # the retained lease found at start
        self._lease_probe = threading.Event()
        self._lease_held = False
        self._lease_stop = threading.Event()
        self._serving = threading.Event()
        self._last_end: RoundEnd | None = None  # how the last round ended (model checkpoint + ledger)
        self.version = 0
        self.round_id = 0
        self._rng = np.random.default_rng(config.seed)
        self.optimizer = config.make_server_optimizer()
        # aggregator/recovery.py: without model.npz, take the broker's retained model (after connecting)
        self._recover = recover_from_broker and self._store is not None and not self._store.model_path.exists()
        self._restored = False                    # the model came from model.npz
        self._deferred_round: RoundCheckpoint | None = None  # resumed once the recovered model is known
        self._probe: RetainedProbe | None = None  # reading the broker's retained model at start
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
        if self._store is not None:
            self._store.ledger  # noqa: B018 -- a corrupt ledger is refused now, before anything runs
            found = self._store.earlier_run()
            if restored is None and found and not self._recover:
                raise CheckpointError(local_evidence_message(self._store.directory, found))
        self._restored = restored is not None
        if restored is not None:
            if weights is not None:
                log.warning("checkpoint found: starting from its model v%d, not from the weights passed in",
                            restored.version)
            self._restore_model(restored)
        else:
            initial = np.asarray(self.bundle.initial_weights if weights is None else weights, dtype=np.float32)
            self.optimizer.init(initial)
            self.release = self._build_release(initial, previous=None)
            if self._store and not self._recover:  # recovering: saved once the broker's model is adopted
                self._save_model()
        round_ckpt = self._store.load_round() if self._store else None
        if round_ckpt is not None and self._recover:
            self._deferred_round = round_ckpt
        elif round_ckpt is not None and round_ckpt.round_id > self.round_id:
            base = _planned_base(round_ckpt)
            if base != self.version:
                raise CheckpointError(
                    f"{self._store.round_path if self._store else 'round.npz'} holds round {round_ckpt.round_id} "
                    f"planned on model v{base}, but the model is v{self.version}: its updates cannot be added to "
                    "this model. Restore the model.npz it belongs to, or move round.npz away to drop the round")
            try:
                self._resume_round(round_ckpt)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # written by another version?
                raise CheckpointError(f"{self._store.round_path if self._store else 'round.npz'} cannot be resumed "
                                      f"({type(exc).__name__}: {exc}): move it away to drop the round") from exc

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
        try:
            if self._store is not None:  # nothing is processed, acknowledged or published before this check
                self._check_broker_model(timeout_s)
            self._take_lease(timeout_s)
        except BaseException as exc:
            self._failure = exc  # the intake skips (never acknowledges) what the session delivered
            self.stop()
            raise
        self._republish_retained()

    def _check_broker_model(self, timeout_s: float) -> None:
        """Refuse to publish over a newer model the broker retains; adopt it with --recover-from-broker."""
        self._probe = RetainedProbe(self._client, self.topics.model, f"{self.topics.root}/aggregator/probe")
        try:
            data = self._probe.run(timeout_s)
        finally:
            self._probe = None
        public_key = self._private_key.public_key()  # type: ignore[attr-defined]
        retained = (inspect_retained_model(data, public_key, self.config.fleet, self.bundle.model_id, self.dim,
                                           self.config.max_payload) if data else None)
        if self._recover:
            self._adopt_retained(retained)
        elif retained is not None and retained.version is not None and retained.version > self.version:
            if not self._restored and self._store is not None:  # the v0 this start wrote is no evidence: a retry
                self._store.model_path.unlink(missing_ok=True)  # must be refused the same way
            raise CheckpointError(broker_evidence_message(retained, self.topics.model, self.version,
                                                          self._store.directory if self._store else "?",
                                                          public_key, self._restored))
        elif retained is not None and retained.problem:
            log.warning("aggregator: the retained model on %s is not one this key verifies (%s); publishing "
                        "v%d over it", self.topics.model, retained.problem, self.version)

    def _adopt_retained(self, retained: RetainedModel | None) -> None:
        """--recover-from-broker: continue from the verified retained model (see aggregator/recovery.py)."""
        assert self._store is not None
        if retained is None or not retained.verified:
            why = "none is retained" if retained is None else f"it cannot be used: {retained.problem}"
            raise CheckpointError(f"{RECOVER_FLAG}: no model to recover on {self.topics.model} ({why}); restore "
                                  f"{self._store.model_path} from a backup instead")
        assert retained.weights is not None and retained.version is not None
        ledger = self._store.ledger
        self.version = retained.version
        self.round_id = max(retained.round, ledger.last_ended_round)  # the last round that ended
        self.optimizer = self.config.make_server_optimizer()
        self.optimizer.init(retained.weights)
        self.release = Release(PublishedModel(self.version, retained.weights, retained.envelope, retained.payload_len))
        log.warning("recovered model v%d (round %d) from the broker, verified with this aggregator's key; the next "
                    "model is v%d. Lost with model.npz and started afresh: the %s server optimizer's state%s, the "
                    "cohort RNG and pace steering's period", self.version, self.round_id, self.version + 1,
                    self.config.server_optimizer, " (its moments restart from zero)"
                    if self.optimizer.buffer_names else "")
        round_ckpt, self._deferred_round = self._deferred_round, None
        resumable = (round_ckpt is not None and round_ckpt.round_id > self.round_id
                     and _planned_base(round_ckpt) == self.version)
        if round_ckpt is not None and not resumable:
            base = _planned_base(round_ckpt)
            aside = self._store.round_path.with_name(f"{self._store.round_path.name}.v{base}-unusable")
            self._store.round_path.rename(aside)
            log.warning("round %d in round.npz was planned on v%s, not on the recovered v%d: its accepted updates "
                        "cannot be used; moved to %s", round_ckpt.round_id, base, self.version, aside)
        # round ids are never reused: the ledger is keyed by them
        self.round_id = max(self.round_id, ledger.last_round, round_ckpt.round_id if round_ckpt and not resumable else 0)
        self._save_model()
        if resumable:
            assert round_ckpt is not None
            self._resume_round(round_ckpt)
        self._recover = False

    def _take_lease(self, timeout_s: float) -> None:
        """Read the retained lease (the probe's echo comes after it), refuse a fresh foreign one, hold ours."""
        if self._lease is None:
            self._serving.set()
            return
        self._client.publish(self._lease.probe, b"", qos=1)
        if not self._lease_probe.wait(timeout_s):
            raise ConnectionError(f"the broker did not echo the lease probe within {timeout_s} s: is the "
                                  f"aggregator's user allowed {self._lease.topic}?")
        self._lease.check_before_start(parse_retained(self.config.fleet, self._lease_seen))
        self._lease_held = True
        self._publish_lease(self._lease.message())
        self._serving.set()
        threading.Thread(target=self._heartbeat, name="fleet-lease", daemon=True).start()

    def _publish_lease(self, message: bytes) -> None:
        assert self._lease is not None
        info = self._client.publish(self._lease.topic, message, qos=1, retain=True)
        try:
            info.wait_for_publish(10.0)
        except (RuntimeError, ValueError) as exc:  # not connected: the heartbeat (or its expiry) follows
            log.warning("aggregator: fleet lease not published: %s", exc)

    def _heartbeat(self) -> None:
        assert self._lease is not None
        while not self._lease_stop.wait(self._lease.interval_s):
            if self._failure is None:
                self._client.publish(self._lease.topic, self._lease.message(), qos=1, retain=True)

    def _lost_fleet(self, why: str) -> None:
        """Another aggregator claimed the fleet: stop taking (and acknowledging) updates, loudly."""
        log.critical("aggregator: %s", why)
        with self._cv:
            if self._failure is None:
                self._failure = FleetTaken(why)
            self._cv.notify_all()

    def _republish_retained(self) -> None:
        """Publish the retained state devices bootstrap from: bundle, model, delta, int8, the open
        round's plan (and its assignments). At start, and after reconnecting to a broker that lost
        our session, since it lost its retained messages too (a SIGKILL before it saved them)."""
        with self._retained_lock:  # what is current now; a commit or a new round waits, then overwrites it
            self._publish(self.topics.bundle, bundle_envelope(self.config.fleet, bundle_file_bytes(self.bundle),
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
        self._serving.set()  # an intake thread still waiting for the start checks sees the failure and exits
        if self._intake is not None:
            self._inbox.put(None, 0)
            self._intake.join(30)
        if self._int8_thread is not None:
            self._int8_thread.join(120)
        self._lease_stop.set()
        if self._started and self._lease_held and self._lease is not None and \
                not isinstance(self._failure, FleetTaken):
            self._publish_lease(self._lease.message(released=True))
        if self._started:
            self._drain_retained(30.0)
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
        subs.append((self.topics.all_checkins, 1))
        # a persistent session keeps the subscriptions of an earlier run in another role (update/+ of a
        # single aggregator restarted as a coordinator): drop every one this role does not read
        root = agg_root(self.topics)
        stale = {self.topics.all_updates, self.topics.all_secagg_up, f"{root}/claim/+", f"{root}/partial/+"}
        stale -= {topic for topic, _ in subs}
        if stale:
            client.unsubscribe(sorted(stale))
        if self._mqtt.mqtt_version == 5:
            # device topics: never the retained junk a device parked there at subscribe, and a live
            # retained publish keeps its flag so _on_message can delete it (nobody needs it retained)
            opts = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True,
                                    retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            subs = [(topic, opts if topic.startswith(self.topics.root + "/") and "/agg/" not in topic else qos)
                    for topic, qos in subs]
            status: tuple[str, Any] = (self.topics.all_status, SubscribeOptions(qos=1, noLocal=True,
                                                                              retainAsPublished=True))
        else:
            status = (self.topics.all_status, 1)
        extra = [(self._lease.topic, 1), (self._lease.probe, 1)] if self._lease is not None else []
        if self._mqtt.mqtt_version == 5:
            extra = [(topic, SubscribeOptions(qos=qos)) for topic, qos in extra]
        client.subscribe(subs + [status] + extra)
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
        probe = self._probe
        if probe is not None and probe.take(msg.topic, msg.payload, bool(msg.retain)):
            return  # the start check's (aggregator/recovery.py), at QoS 0: nothing to acknowledge
        if self._lease is not None and msg.topic in (self._lease.topic, self._lease.probe):
            self._on_lease_message(msg)
            client.ack(msg.mid, msg.qos)
            return
        if self._device_retained(msg):
            client.ack(msg.mid, msg.qos)
            return
        # before the start checks pass, intake waits: never block the probes (the broker's in-flight window bounds this)
        self._inbox.put((msg.topic, msg.payload, msg.mid, msg.qos), len(msg.payload) if self._serving.is_set() else 0)

    def _on_lease_message(self, msg: mqtt.MQTTMessage) -> None:
        assert self._lease is not None
        if msg.topic == self._lease.probe:
            self._lease_probe.set()
        elif not self._lease_held:
            self._lease_seen = msg.payload  # the retained lease, read before the probe's echo
        else:
            why = self._lease.foreign(msg.payload)
            if why:
                self._lost_fleet(why)

    def _device_retained(self, msg: mqtt.MQTTMessage) -> bool:
        """Delete what a device retained on its own topics (bounded: one message a topic until we see it);
        True when the message is nothing but that deletion coming back (MQTT 3.1.1 has no noLocal)."""
        rest = msg.topic[len(self.topics.root) + 1:] if msg.topic.startswith(self.topics.root + "/") else ""
        kind = rest.split("/", 1)[0]
        if kind not in ("update", "checkin", "status", "secagg") or rest.startswith("secagg/down"):
            return False
        if not msg.payload:
            return kind != "status"  # an empty status is the device clearing its own presence
        if msg.retain and (kind != "status" or len(msg.payload) > MAX_STATUS_BYTES):
            log.warning("aggregator: %d B retained on %s deleted (devices may not park messages on the broker)",
                        len(msg.payload), msg.topic)
            self._client.publish(msg.topic, b"", qos=1, retain=True)
            return kind == "status"  # a junk status is not a status; an update or check-in is still handled
        return False

    # ---- intake thread ----------------------------------------------------------------------
    def _intake_loop(self) -> None:
        self._serving.wait()  # nothing is processed, nor acknowledged, before the fleet lease is ours
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
            if kind == "update" and self._link is not None:
                log.info("aggregator: update on %s ignored: the workers take updates (left queued from an "
                         "earlier run in another role)", topic)
                self._defer(token)
            elif kind == "update":
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
        if checkin.train_examples < 1:  # it bounds the device's update weight (aggregator/weights.py)
            raise ValidationError(Reason.BAD_FIELD, f"check-in declares {checkin.train_examples} training windows: "
                                                    "a device with nothing to train on must not check in")
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
                assert r is not None  # an open RoundState belongs to the open round
                weight, cut = self._weight_bound(r).weight(device, env.example_count)
                self._aggregate.add_decoded_into(decode_into(codec, env.payload), weight,
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
            self._account(r, env.meta, len(data), device)
            if cut:
                self._note_capped(r, device, env.example_count, weight, cut)
            if len(state.accepted) >= r.goal:
                state.open = False  # goal reached: later reports (the over-selected) are refused
            self._dirty = True
            self._cv.notify_all()
        self.metrics.intake_seconds.labels(self.config.fleet).observe(time.perf_counter() - started)
        self.metrics.c(self.metrics.updates_accepted).inc()
        self.metrics.c(self.metrics.uplink_bytes).inc(len(data))
        self._defer(token, self._ack_message(device, Ack(env.round, True)))

    def _account(self, r: _OpenRound, meta: dict, size: int, device: str) -> None:
        r.uplink_bytes += size
        loss = meta.get("train_loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            r.losses.append(float(loss))
        counts = device_eval_counts(meta)
        if counts is not None:
            checkin = r.checkins.get(device)
            bound = eval_bound(checkin.train_examples if checkin is not None else 0, self.bundle.config.seq_len)
            if counts[2] <= bound:
                r.fed_eval.add(counts)
            else:  # one device must not decide the round's federated accuracy
                log.warning("aggregator: evaluation counts of %s ignored: %d scored positions, its %d declared "
                            "windows hold at most %d", device, counts[2],
                            checkin.train_examples if checkin is not None else 0, bound)

    def _note_capped(self, r: _OpenRound, device: str, claimed: int, weight: float, cut: str) -> None:
        """Count a cut weight; WARNING when the device claimed more than it declared (a lie), INFO when
        an honest large device met the cohort cap (several a round on skewed data)."""
        r.weight_capped += 1
        level = logging.WARNING if r.bound is not None and r.bound.exceeds_declaration(device, claimed) \
            else logging.INFO
        log.log(level, "aggregator: update from %s weighs %g: %s", device, weight, cut)

    def _weight_bound(self, r: _OpenRound) -> WeightBound:
        """The cohort's weight limits (aggregator/weights.py), built at the first update (lock held)."""
        if r.bound is None:
            plan = r.plan
            declared = {d: r.checkins[d].train_examples for d in r.cohort if d in r.checkins}
            r.bound = WeightBound.for_cohort(declared, factor=self.config.weight_cap, local_epochs=plan.local_epochs,
                                             max_steps=plan.max_steps, batch_size=plan.batch_size)
        return r.bound

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
            weight, cut = self._weight_bound(r).weight(device, claim["examples"])
            state.accepted.add(device)
            r.grants[device] = worker
            self._account(r, claim.get("meta", {}), int(claim.get("bytes", 0)), device)
            if cut:
                self._note_capped(r, device, claim["examples"], weight, cut)
            if len(state.accepted) >= r.goal:
                state.open = False
            self._dirty = True
            self._cv.notify_all()
        self.metrics.c(self.metrics.updates_accepted).inc()
        self._defer(token, self._link.grant_message(worker, claim, True, weight=weight))

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
            # booked for this round but their retry runs on (the rounds came faster than steering
            # expected): a thin window waits for them rather than closing on the devices already in
            due = {d for d, b in self._back_for.items() if b == plan.round_id and self._steered_until.get(d, 0.0) > now}
            self._steered_until = {d: t for d, t in self._steered_until.items() if t > now}
            self._back_for = {d: b for d, b in self._back_for.items() if b > plan.round_id}
            r = _OpenRound(plan, "checkin", now, now + cfg.checkin_window_s,
                           steered_away=self._steered_away(plan.round_id, now), due=due)
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
        floor = cfg.report_floor()
        with self._cv:
            r.expected = expected = max(1, cfg.expected_checkins - r.steered_away) if cfg.expected_checkins else 0
            while True:
                self._raise_if_failed()
                left = r.window_end_unix - time.time()
                enough = len(r.checkins) >= floor
                if expected and len(r.checkins) >= expected and (enough or not cfg.checkin_patience_s) \
                        and not thin_but_due(len(r.checkins), cfg.cohort_target(), r.due, r.checkins):
                    break
                if left <= 0:
                    if enough or not self._extend_window(r, floor):
                        break
                    continue
                self._cv.wait(timeout=min(0.5, left))
            candidates = sorted(r.checkins)
            # below the floor no cohort is chosen: its updates could never commit
            size = cfg.cohort_size(len(candidates)) if len(candidates) >= floor else 0
            r.cohort = select_cohort(candidates, size, self._rng)
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

    def _extend_window(self, r: _OpenRound, floor: int) -> bool:
        """Keep a window below the report floor open for another checkin_window_s, within
        checkin_patience_s; False when patience ran out (lock held). Logged once a minute at most."""
        cfg = self.config
        room = cfg.checkin_patience_s - r.extended_s
        if room <= 0:
            return False
        step = min(cfg.checkin_window_s, room)
        r.window_end_unix = time.time() + step
        log.debug("aggregator: round %d window extended by %.1f s: %d check-in(s), floor %d", r.plan.round_id, step,
                  len(r.checkins), floor)
        if r.extended_s == 0 or r.extended_s // 60 != (r.extended_s + step) // 60:
            log.info("aggregator: round %d has %d check-in(s), %d needed to commit (min_reports floor): waiting "
                     "for devices (%.0f s so far, checkin_patience_s %g)", r.plan.round_id, len(r.checkins), floor,
                     r.extended_s, cfg.checkin_patience_s)
        r.extended_s += step
        return True

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
        # spread for the cohort a round aims at, not this round's: a thin round spreading devices
        # further made the next rounds thinner still (rounds of one device)
        retries = self._pace.retry_afters(count, self.config.cohort_target(), now - r.started_unix, booked)
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
        needed = max(cfg.needed_reports(len(r.cohort)), cfg.report_floor())  # never a round of one device
        reason = "" if accepted >= needed else f"{accepted} of {len(r.cohort)} reports, {needed} needed"
        if not r.cohort and r.checkins:
            reason = f"{len(r.checkins)} check-in(s), fewer than the min_reports floor {cfg.report_floor()}"
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
            weight_capped=r.weight_capped, checkin_wait_s=round(r.extended_s, 3),
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
                             extra={**bundle_extra(self.bundle), "round": self.round_id})

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
                                           extra=bundle_extra(self.bundle))
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
        if retain:
            with self._retained_lock:  # the newest retained publish per topic is what stop() must see out
                self._retained_unconfirmed[topic] = info
        if wait:
            try:
                info.wait_for_publish(30.0)
            except (RuntimeError, ValueError) as exc:  # not connected: paho sends it after reconnecting
                log.warning("aggregator: %s queued, not yet sent: %s", topic, exc)

    def _drain_retained(self, timeout_s: float) -> None:
        """Wait until the broker confirmed the newest retained publish of every topic.

        A commit made while the broker was away is queued in paho and sent after reconnecting;
        disconnecting before that would leave the fleet's retained model behind the checkpoint."""
        deadline = time.monotonic() + timeout_s
        with self._retained_lock:
            pending = dict(self._retained_unconfirmed)
        for topic, info in pending.items():
            while not _confirmed(info) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _confirmed(info):
                log.warning("aggregator: the broker has not confirmed the retained %s after %.0f s; "
                            "the next start publishes it again", topic, timeout_s)


def _planned_base(ckpt: RoundCheckpoint) -> object:
    """The model version the checkpointed round was planned on (None if the file does not say)."""
    plan = ckpt.meta.get("plan") if isinstance(ckpt.meta, dict) else None
    return plan.get("base_version") if isinstance(plan, dict) else None


def _confirmed(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged a QoS 1 publish. paho's `is_published()` raises for a message
    published while disconnected (rc NO_CONN) although paho keeps it and sends it after reconnecting;
    its acknowledgement then shows in the same flag `wait_for_publish` reads."""
    try:
        return info.is_published()
    except RuntimeError:
        return bool(getattr(info, "_published", False))
    except ValueError:  # the client's queue was full: it was never queued; the next start republishes
        return True


def _payload_len(envelope: bytes) -> int:
    try:
        return len(ModelMessage.from_envelope(decode_envelope(envelope)).weights_payload)
    except ProtocolError:
        return 0
