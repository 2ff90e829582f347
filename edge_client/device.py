"""The device side of a round, over MQTT with paho.

Event-driven: paho's network thread delivers the round plan, the assignment and the global
model; training runs on a worker thread (never on the network thread, so keepalives and
acks keep flowing); the encoded weight delta goes back with QoS 1. The device holds no model
between rounds unless asked to (`keep_model`), so a simulator can host hundreds of them.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from edge_client.local_dp import LocalDPConfig, privatize_update
from edge_client.mqtt_hub import MqttHub
from edge_client.outbox import Outbox
from edge_client.residuals import ResidualStore
from edge_client.secure_update import SecureUpdate
from edge_client.timers import call_later
from edge_client.trainer import InterpreterPool, TrainSettings, WindowSource, train_round
from protocol.codec import parse_codec
from protocol.codec.pipeline import Codec, EncodeResult
from protocol.envelope import DEFAULT_MAX_PAYLOAD, Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, TrustError
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan, UpdateMeta, to_dict
from protocol.model_message import ModelMessage
from protocol.signing import ModelTrust, SignedManifest
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings, configure_client

log = logging.getLogger(__name__)

# How long a device waits for the retained delta of the round's base version before it
# fetches the full model instead.
DELTA_WAIT_S = 10.0
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a client with the same id connected
SHORT_SESSION_S = 30.0     # an accepted session the broker closes sooner is suspect (edge_client.mqtt_hub)

# A pace-steering retry_after shorter than this is not worth an unsubscribe and a subscribe:
# the device keeps hearing plans (and checks in once the retry has run out).
QUIET_MIN_S = 1.0
# An update the broker confirmed but nobody acknowledged is sent again at most this many times.
MAX_RESENDS = 3


@dataclass(frozen=True)
class DeviceConfig:
    fleet: str
    device_id: str
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    seed: int = 0
    keep_model: bool = False          # keep the global weights between rounds (real devices)
    max_payload: int = DEFAULT_MAX_PAYLOAD
    platform_name: str = "linux"
    local_dp: LocalDPConfig | None = None  # the owner's local DP (client.toml [privacy]); None = off
    ack_timeout_s: float = 30.0       # no Ack this long after an update: send it again (while its round is open)


@dataclass
class DeviceStats:
    """What the device sent and received, for reports; never any text."""

    checkins: int = 0
    rounds_trained: int = 0
    rounds_abandoned: int = 0
    updates_sent: int = 0       # handed to MQTT with QoS 1 (or to the outbox when offline)
    updates_accepted: int = 0
    updates_rejected: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    models_refused: int = 0
    local_dp_releases: int = 0  # updates sent with local DP noise (epsilon composes over them)
    train_steps: int = 0
    train_s: float = 0.0
    connects: int = 0
    last_rejection: str = ""
    resends: int = 0            # updates sent again because no Ack came (the aggregator counts them once)


Eligibility = Callable[[bool], tuple[bool, tuple[str, ...]]]
"""`eligibility(training)` -> (eligible, reasons); None means always eligible."""

BeforeSend = Callable[[int, int], tuple[bool, float, str]]
"""`before_send(round_id, nbytes)` -> (ok, delay_wall_s, cause): a simulated platform's radio.

Not ok: the upload is lost (`cause`, e.g. "upload_lost"), nothing is published and the round
counts as abandoned. Ok: the update is published after `delay_wall_s` wall seconds (the time
the simulated link takes), from a timer rather than by sleeping on the training executor.
"""

UpdateTransform = Callable[[int, np.ndarray, Codec], "np.ndarray | bytes"]
"""`update_transform(round_id, delta, codec)` -> the delta to encode, or the payload to send as is.

A simulator's fault-injection hook on the real update just before it is encoded (Byzantine
devices: scaled, sign-flipped or NaN updates). Returning bytes skips the encoder (and error
feedback), so a payload the honest encoder would refuse can still reach the aggregator.
"""


class DeviceClient:
    """One device: check in when eligible, train when selected, send the encoded delta."""

    def __init__(
        self,
        config: DeviceConfig,
        pool: InterpreterPool,
        windows: WindowSource,
        trust: ModelTrust,
        *,
        residuals: ResidualStore | None = None,
        outbox: Outbox | None = None,
        eligibility: Eligibility | None = None,
        executor: Executor | None = None,
        hub: MqttHub | None = None,
        on_event: Callable[[str, dict], None] | None = None,
        before_send: BeforeSend | None = None,
        update_transform: UpdateTransform | None = None,
    ) -> None:
        self.config = config
        self.topics = FleetTopics(config.fleet)
        self.pool = pool
        self.windows = windows
        self.trust = trust
        self.residuals = residuals or ResidualStore(None)
        self.outbox = outbox
        self.eligibility = eligibility
        self.stats = DeviceStats()
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=config.device_id)
        self._own_executor = executor is None
        self._hub = hub or MqttHub(f"mqtt-{config.device_id}")
        self._own_hub = hub is None
        self._on_event = on_event
        self._before_send = before_send
        self._update_transform = update_transform
        self._lock = threading.RLock()
        self._plan: RoundPlan | None = None
        self._plan_at = 0.0
        self._checked_in_round = -1
        self._assigned_round = -1
        self._training_round = -1
        self._fetching_model = False
        self._fetch_topic: str | None = None   # model/current or model/delta while fetching
        self._retry_at = 0.0                   # pace steering: no check-in before this (monotonic)
        self._back_for_round = 0               # pace steering: plans of earlier rounds are sat out
        self._quiet = False                    # steered away: not subscribed to round plans
        self._plan_sub_mid: int | None = None  # the wake-up subscription not yet acknowledged
        self._model_version = -1
        self._acked_round = -1                 # the latest round whose update got an Ack (accepted or not)
        self._warned_stale_base = False        # the plan-older-than-trusted-model WARNING was logged
        self._mismatch_warned: set[str] = set()  # model ids whose plans this device said it sits out
        self._weights: np.ndarray | None = None
        self._secure: SecureUpdate | None = None  # the secure-aggregation round in progress
        self._followed: dict[str, Callable[[bytes], None]] = {}  # follow(): extra topics on this session
        self._stopped = threading.Event()
        self.ready = threading.Event()  # set once connected and subscribed
        self._accepted_at = 0.0                # monotonic time of the last accepted connection
        self._short_sessions = 0               # accepted connections in a row the broker soon closed
        self._dim = int(pool.bundle.initial_weights.size)
        self._client = self._make_client()

    # ---- lifecycle -------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        settings = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.device_id,
            protocol=settings.paho_protocol(),
            **({} if settings.mqtt_version == 5 else {"clean_session": True}),
        )
        configure_client(client, settings, will_topic=self.topics.status(self.config.device_id),
                         will_payload=self._status_payload("offline"))
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        return client

    def start(self, delay_s: float = 0.0) -> None:
        """Connect through the hub, which reconnects with jittered backoff after a loss."""
        settings = self.config.mqtt
        if self._own_hub:
            self._hub.start()
        self._hub.add(self._client, settings.host, settings.port, keepalive=settings.keepalive_s,
                      backoff_min_s=settings.reconnect_min_s, backoff_max_s=settings.reconnect_max_s, delay_s=delay_s)

    def stop(self) -> None:
        self._stopped.set()
        try:
            info = self._client.publish(self.topics.status(self.config.device_id),
                                        self._status_payload("offline"), qos=1, retain=True)
            info.wait_for_publish(2.0)
        except (RuntimeError, ValueError):
            pass  # not connected: the broker publishes the will instead
        self._hub.remove(self._client)
        if self._own_hub:
            self._hub.stop()
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _status_payload(self, state: str) -> bytes:
        return Envelope(Kind.STATUS, self.config.fleet, self.config.device_id, meta={"state": state}).encode()

    # ---- MQTT callbacks (paho network thread) -----------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object = None) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("%s: connection refused: %s", self.config.device_id, reason_code)
            return
        self.stats.connects += 1
        self._accepted_at = time.monotonic()
        me = self.config.device_id
        subs = [(self.topics.assign(me), 1), (self.topics.ack(me), 1),
                (self.topics.secagg_roster, 1), (self.topics.secagg_unmask, 1), (self.topics.secagg_down(me), 1)]
        with self._lock:
            hear_plans = not self._quiet  # a steered-away device subscribes when its retry_after runs out
            if hear_plans:
                subs.insert(0, (self.topics.round, 1))
            if self._fetching_model:
                subs.append((self._fetch_topic or self.topics.model, 1))
            subs.extend((topic, 1) for topic in self._followed)
            rc, mid = client.subscribe(subs)
            if hear_plans:  # a wake-up subscription lost with the old connection is this one now
                self._plan_sub_mid = mid if rc == mqtt.MQTT_ERR_SUCCESS else None
        client.publish(self.topics.status(me), self._status_payload("online"), qos=1, retain=True)
        if self.outbox is not None and len(self.outbox):
            self._executor.submit(self._flush_outbox)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, *args: object) -> None:
        with self._lock:
            if mid == self._plan_sub_mid:
                self._plan_sub_mid = None
        self.ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                       properties: object = None) -> None:
        self.ready.clear()
        if self._stopped.is_set():
            return
        lived = time.monotonic() - self._accepted_at
        self._short_sessions = self._short_sessions + 1 if lived < SHORT_SESSION_S else 0
        # Mosquitto 2.0 closes the taken-over connection without sending its DISCONNECT 0x8E:
        # accepted sessions that end at once, twice in a row, are the same symptom.
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER or self._short_sessions == 2:
            log.warning("%s: the broker closed this session %.1f s after accepting it (%s): another client uses "
                        "this client id %r (two devices with one [device] id?); reconnecting with backoff",
                        self.config.device_id, lived, reason_code, self.config.device_id)
        else:
            log.info("%s: disconnected (%s); paho will reconnect", self.config.device_id, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.round:
                self._handle_plan(decode_envelope(msg.payload, expect=Kind.PLAN))
            elif msg.topic == self.topics.model:
                self.stats.downlink_bytes += len(msg.payload)
                env = decode_envelope(msg.payload, max_payload=self.config.max_payload, expect=Kind.MODEL)
                self._handle_model(env)
            elif msg.topic == self.topics.assign(self.config.device_id):
                self._handle_assignment(decode_envelope(msg.payload, expect=Kind.ASSIGN))
            elif msg.topic == self.topics.ack(self.config.device_id):
                self._handle_ack(decode_envelope(msg.payload, expect=Kind.ACK))
            elif msg.topic in (self.topics.secagg_roster, self.topics.secagg_unmask,
                               self.topics.secagg_down(self.config.device_id)):
                self._handle_secagg(msg.topic, msg.payload)
        except ProtocolError as exc:
            if msg.topic in (self.topics.model, self.topics.model_delta):
                self.stats.models_refused += 1
            log.warning("%s: refused message on %s: %s", self.config.device_id, msg.topic, exc)
        except Exception:  # a bug must not kill paho's network thread
            log.exception("%s: error handling %s", self.config.device_id, msg.topic)

    # ---- extra topics on this session (the app's serving model) -------------------------
    def follow(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Also receive `topic` on this session, subscribed again after every reconnect; `handler`
        gets each payload on the network thread. One session per device id: a second MQTT session
        with the same id would take this one over, so the app's serving model comes this way."""
        with self._lock:
            self._followed[topic] = handler
        self._client.message_callback_add(topic, self._on_followed)
        self._client.subscribe(topic, 1)  # not connected: the next _on_connect subscribes it

    def unfollow(self, topic: str) -> None:
        """Stop receiving a topic given to `follow` (a message already on its way may still come)."""
        with self._lock:
            if self._followed.pop(topic, None) is None:
                return
        self._client.message_callback_remove(topic)
        self._client.unsubscribe(topic)

    def _on_followed(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handler = self._followed.get(msg.topic)
        if handler is None or not msg.payload:  # unfollowed meanwhile, or a cleared retained message
            return
        self.stats.downlink_bytes += len(msg.payload)
        try:
            handler(bytes(msg.payload))
        except Exception:  # a bug must not kill paho's network thread
            log.exception("%s: error handling %s", self.config.device_id, msg.topic)

    # ---- round protocol ----------------------------------------------------------------
    def _handle_plan(self, env: Envelope) -> None:
        plan = RoundPlan.from_envelope(env)
        with self._lock:
            if self._quiet:  # sent before the broker applied our unsubscribe: unheard, as steering intends
                return       # (the retained plan comes again at the wake-up)
            if self._plan is not None and plan.round_id <= self._plan.round_id:
                return
            self._plan, self._plan_at = plan, time.monotonic()
            if plan.round_id < self._back_for_round:
                return  # pace steering expects this device for a later round
            if self._stale_base(plan):
                return
        self._maybe_check_in(plan)

    def _stale_base(self, plan: RoundPlan) -> bool:
        """A plan built on a model older than the one this device trusts: it could never load that
        model, so it sits the round out, and says why ONCE (until a usable plan comes), not per plan:
        the usual cause is an aggregator that lost its checkpoint and started again (lock held)."""
        oldest = self.trust.oldest_acceptable
        if oldest is None or plan.base_version >= oldest:
            self._warned_stale_base = False
            return False
        self._event("stale_plan", round=plan.round_id, base_version=plan.base_version, trusted=oldest)
        if not self._warned_stale_base:
            self._warned_stale_base = True
            log.warning("%s: ignoring round %d and every later plan built on a model older than v%d: it builds on "
                        "v%d, and this device never goes back to an older model than it trusts (did the aggregator "
                        "lose its checkpoint? Its operator restores it or runs `fedboard aggregator "
                        "--recover-from-broker`; see the README, Reliability)", self.config.device_id,
                        plan.round_id, oldest, plan.base_version)
        return True

    def _maybe_check_in(self, plan: RoundPlan) -> None:
        if plan.model_id != self.pool.bundle.model_id:
            self._event("model_mismatch", round=plan.round_id, model_id=plan.model_id)
            with self._lock:  # said once per model id, not at every plan
                first = plan.model_id not in self._mismatch_warned
                self._mismatch_warned.add(plan.model_id)
            if first:
                log.warning("%s: round %d is for model %s, this device has %s: sitting out that model's rounds "
                            "(install its bundle to take part)", self.config.device_id, plan.round_id, plan.model_id,
                            self.pool.bundle.model_id)
            return
        if self.eligibility is not None:
            ok, reasons = self.eligibility(False)
            if not ok:
                self._event("ineligible", round=plan.round_id, reasons=list(reasons))
                return
        n_train = len(self.windows.training_windows()[0])
        if n_train == 0:
            return
        with self._lock:
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # pace steering: the aggregator asked us to come back later
                self._schedule_check_in(plan, wait)
                return
            if self._checked_in_round >= plan.round_id:
                return
            self._checked_in_round = plan.round_id
        checkin = CheckIn(plan.round_id, max(self._model_version, 0), n_train, self.config.platform_name)
        self._publish(self.topics.checkin(self.config.device_id), checkin.to_envelope(self.config.fleet, self.config.device_id))
        self.stats.checkins += 1
        self._event("checkin", round=plan.round_id)

    def _handle_assignment(self, env: Envelope) -> None:
        assignment = Assignment.from_envelope(env)
        with self._lock:
            plan = self._plan
            if plan is None or assignment.round_id != plan.round_id:
                return
            if not assignment.selected:
                if assignment.retry_after_s > 0:
                    self._retry_at = max(self._retry_at, time.monotonic() + assignment.retry_after_s)
                    self._back_for_round = max(self._back_for_round, assignment.back_for_round)
                    self._go_quiet()
                return
            if self._assigned_round >= plan.round_id:
                return  # QoS 1 redelivery
            self._assigned_round = plan.round_id
            if assignment.retry_after_s > 0:  # after this round, wait for a later one (pace steering)
                self._retry_at = max(self._retry_at, time.monotonic() + assignment.retry_after_s)
                self._back_for_round = max(self._back_for_round, assignment.back_for_round)
                # quiet once its update is acknowledged: not now, while the cohort fetches the model
            have_model = self._weights is not None and self._model_version == plan.base_version
            use_delta = (not have_model and plan.delta_downlink and self._weights is not None
                         and self._model_version == plan.base_version - 1)
            if not have_model:
                self._fetching_model = True
                self._fetch_topic = self.topics.model_delta if use_delta else self.topics.model
        self._event("selected", round=plan.round_id)
        if plan.secure_aggregation:
            self._start_secure(plan)
        if have_model:
            self._start_training(plan)
        elif use_delta:
            self._fetch_delta(plan)
        else:
            self._client.subscribe(self.topics.model, 1)

    # ---- pace steering -------------------------------------------------------------------
    def will_answer(self, round_id: int) -> bool:
        """Whether the plan of `round_id`, published now, gets a check-in (eligibility aside):
        the device hears plans, its retry_after has run out, and pace steering expects it back
        for this round or an earlier one. Lets a simulator close the window on the last one."""
        with self._lock:
            return self.hears_plans and self._retry_at <= time.monotonic() and round_id >= self._back_for_round

    @property
    def hears_plans(self) -> bool:
        """Subscribed to round plans (and the broker confirmed it): the next plan will reach this
        device. False while pace steering keeps it away and until its wake-up is acknowledged."""
        with self._lock:
            return not self._quiet and self._plan_sub_mid is None

    def _go_quiet(self) -> None:
        """Stop hearing round plans until the retry_after runs out (lock held).

        Every plan published meanwhile would only be parsed and dropped: a phone would wake for
        it, a simulator would spend its network thread on it. At the wake-up the device
        subscribes again and the broker hands it the retained plan: a plan of a round before the
        one the aggregator expects it back for (`Assignment.back_for_round`) is sat out; the
        expected round's plan (retained because the answer reached the device late) is
        answered. With a retry shorter than QUIET_MIN_S it keeps listening.
        """
        wait = self._retry_at - time.monotonic()
        if self._quiet or wait < QUIET_MIN_S:
            return
        self._quiet = True
        self._client.unsubscribe(self.topics.round)
        call_later(wait, self._wake_up)

    def _wake_up(self) -> None:
        with self._lock:
            if self._stopped.is_set() or not self._quiet:
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # told to stay away longer meanwhile
                call_later(wait, self._wake_up)
                return
            self._quiet = False
            rc, mid = self._client.subscribe(self.topics.round, 1)
            # not connected: the next connection subscribes (and hears the retained plan)
            self._plan_sub_mid = mid if rc == mqtt.MQTT_ERR_SUCCESS else None

    def _schedule_check_in(self, plan: RoundPlan, wait_s: float) -> None:
        """Check in to `plan` after `wait_s` if its window is still open then (else the next plan will)."""
        window_left = plan.checkin_window_s - (time.monotonic() - self._plan_at)
        if wait_s >= window_left:
            return
        call_later(wait_s, self._retry_check_in, plan)  # one shared thread, not a thread per device

    def _retry_check_in(self, plan: RoundPlan) -> None:
        with self._lock:
            current = self._plan is plan and time.monotonic() - self._plan_at < plan.checkin_window_s
        if current and not self._stopped.is_set():
            self._maybe_check_in(plan)

    # ---- model download: the delta against the version held, else the full model ----------
    def _fetch_delta(self, plan: RoundPlan) -> None:
        self._client.message_callback_add(self.topics.model_delta, self._on_delta_message)
        self._client.subscribe(self.topics.model_delta, 1)
        call_later(DELTA_WAIT_S, self._delta_timeout, plan)

    def _delta_timeout(self, plan: RoundPlan) -> None:
        with self._lock:
            waiting = self._fetching_model and self._fetch_topic == self.topics.model_delta and self._plan is plan
        if waiting:
            log.info("%s: no usable delta for v%d within %.0f s; fetching the full model", self.config.device_id,
                     plan.base_version, DELTA_WAIT_S)
            self._fall_back_to_full(plan)

    def _fall_back_to_full(self, plan: RoundPlan) -> None:
        with self._lock:
            if not self._fetching_model or self._fetch_topic != self.topics.model_delta or self._plan is not plan:
                return
            self._fetch_topic = self.topics.model
        self._client.unsubscribe(self.topics.model_delta)
        self._client.subscribe(self.topics.model, 1)

    def _on_delta_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self.stats.downlink_bytes += len(msg.payload)
            env = decode_envelope(msg.payload, max_payload=self.config.max_payload, expect=Kind.MODEL)
            self._handle_model_delta(env)
        except ProtocolError as exc:
            self.stats.models_refused += 1
            log.warning("%s: refused message on %s: %s", self.config.device_id, msg.topic, exc)
            with self._lock:
                plan = self._plan
            if plan is not None:
                self._fall_back_to_full(plan)
        except Exception:  # a bug must not kill paho's network thread
            log.exception("%s: error handling %s", self.config.device_id, msg.topic)

    def _handle_model_delta(self, env: Envelope) -> None:
        message = ModelMessage.from_envelope(env)
        with self._lock:
            plan = self._plan
            wanted = self._fetching_model and self._fetch_topic == self.topics.model_delta and plan is not None
            base, base_version = self._weights, self._model_version
        if not wanted or message.version > plan.base_version:  # not fetching, or our plan is already stale
            return
        try:
            if base is None or message.version != plan.base_version:
                raise TrustError(Reason.STALE_BASE, f"retained delta is v{message.version}, the round needs "
                                                    f"v{plan.base_version}")
            weights = self._rebuild_from_delta(message, base, base_version)
        except (ProtocolError, ValueError) as exc:
            self.stats.models_refused += 1
            log.warning("%s: cannot use the delta to v%d (%s); fetching the full model", self.config.device_id,
                        message.version, exc)
            self._fall_back_to_full(plan)
            return
        self._install_model(weights, message.version, plan, self.topics.model_delta)

    def _rebuild_from_delta(self, message: ModelMessage, base: np.ndarray, base_version: int) -> np.ndarray:
        """W_v = W_{v-1} + decode(delta), checked bit for bit against the signed manifest.

        Nothing is decoded before the signature and payload hash hold; the trust state moves to
        the new version only once the rebuilt weights match `weights_f32_sha256`, so a failed
        delta leaves the device free to take the full model of the same version.
        """
        signed = SignedManifest.from_bytes(message.signed_manifest)
        manifest = signed.verify(self.trust.public_key)
        if manifest.model_id != self.pool.bundle.model_id or manifest.version != message.version:
            raise TrustError(Reason.WRONG_MODEL, f"manifest is {manifest.model_id} v{manifest.version}, message says "
                             f"v{message.version}, device runs {self.pool.bundle.model_id}")
        if manifest.base_version != base_version:
            raise TrustError(Reason.STALE_BASE, f"delta applies to v{manifest.base_version}, this device holds "
                                                f"v{base_version}")
        payload = message.weights_payload
        if len(payload) != manifest.payload_len or hashlib.sha256(payload).hexdigest() != manifest.weights_sha256:
            raise TrustError(Reason.BAD_HASH, "delta payload differs from the signed manifest")
        base_sha = manifest.extra.get("base_f32_sha256")
        if base_sha is not None and _f32_digest(base) != base_sha:
            raise TrustError(Reason.STALE_BASE, "the weights this device holds are not the delta's base")
        delta = parse_codec(manifest.codec).decode(payload, self._dim)
        weights = np.add(np.asarray(base, dtype=np.float32), delta, dtype=np.float32)
        expected = manifest.extra.get("weights_f32_sha256")
        if expected is None or _f32_digest(weights) != expected:
            raise ValueError("weights rebuilt from the delta do not match the manifest's checksum")
        self.trust.accept(signed, payload)
        return weights

    def _install_model(self, weights: np.ndarray, version: int, plan: RoundPlan, topic: str) -> None:
        with self._lock:
            self._weights, self._model_version = weights, version
            self._fetching_model = False
            self._fetch_topic = None
        self._client.unsubscribe(topic)
        self._start_training(plan)

    def _handle_model(self, env: Envelope) -> None:
        message = ModelMessage.from_envelope(env)
        with self._lock:
            plan = self._plan
            wanted = (self._fetching_model and self._fetch_topic in (None, self.topics.model) and plan is not None
                      and message.version == plan.base_version)
        if not wanted:
            return
        try:
            signed = SignedManifest.from_bytes(message.signed_manifest)
            manifest = self.trust.accept(signed, message.weights_payload)
            if manifest.model_id != self.pool.bundle.model_id or manifest.version != message.version:
                raise TrustError(Reason.WRONG_MODEL, f"manifest is {manifest.model_id} v{manifest.version}, "
                                 f"message says v{message.version}, device runs {self.pool.bundle.model_id}")
            weights = parse_codec(manifest.codec).decode(message.weights_payload, self._dim)
            digest = _f32_digest(weights)
            if manifest.extra.get("weights_f32_sha256") not in (None, digest):
                raise ValueError("decoded weights do not match the manifest's checksum")
        except (ProtocolError, ValueError) as exc:
            self.stats.models_refused += 1
            log.warning("%s: refused global model v%d: %s", self.config.device_id, message.version, exc)
            return
        assert plan is not None
        self._install_model(weights, message.version, plan, self.topics.model)

    def _start_training(self, plan: RoundPlan) -> None:
        with self._lock:
            if self._training_round >= plan.round_id:
                return
            self._training_round = plan.round_id
            weights = self._weights
        assert weights is not None
        self._executor.submit(self._train_and_send, plan, weights)

    def _deadline_passed(self, plan: RoundPlan) -> bool:
        return time.monotonic() - self._plan_at > plan.report_deadline_s

    def _train_and_send(self, plan: RoundPlan, weights: np.ndarray) -> None:
        try:
            self._train_and_send_inner(plan, weights)
        except Exception:
            log.exception("%s: training round %d failed", self.config.device_id, plan.round_id)
            self.stats.rounds_abandoned += 1

    def _train_and_send_inner(self, plan: RoundPlan, weights: np.ndarray) -> None:
        stop_reasons: list[str] = []

        def should_stop() -> bool:
            if self._stopped.is_set():
                stop_reasons.append("client_stopped")
            elif self._deadline_passed(plan):
                stop_reasons.append("deadline")
            elif self.eligibility is not None:
                ok, reasons = self.eligibility(True)
                if not ok:
                    stop_reasons.extend(reasons)
            return bool(stop_reasons)

        settings = TrainSettings(epochs=plan.local_epochs, lr=plan.lr, mu=plan.mu, clip=plan.clip_norm,
                                 max_steps=plan.max_steps)
        seed = hash_seed(self.config.seed, self.config.device_id, plan.round_id)
        local = train_round(self.pool, weights, self.windows.training_windows(), settings,
                            seed=seed, should_stop=should_stop)
        self.stats.train_steps += local.result.steps
        self.stats.train_s += local.train_s
        if local.result.stopped:
            self.stats.rounds_abandoned += 1
            self._event("abandoned", round=plan.round_id, reasons=stop_reasons)
            log.info("%s: round %d abandoned (%s); nothing sent", self.config.device_id, plan.round_id,
                     ", ".join(stop_reasons))
            self._release_model()
            return
        delta = np.subtract(local.weights, weights, out=local.weights)  # in place: one model copy less
        if self.config.local_dp is not None:
            delta = self._privatize(delta)
        if plan.secure_aggregation:  # the update leaves the device only masked (edge_client/secure_update.py)
            self._hand_over_secure(plan, delta, local.result.examples)
            return
        codec = parse_codec(plan.codec)
        forged = self._update_transform(plan.round_id, delta, codec) if self._update_transform else delta
        if isinstance(forged, np.ndarray):
            residual = self.residuals.load(self._dim) if codec.uses_error_feedback else None
            encoded = codec.encode(forged, residual=residual, rng=np.random.default_rng(seed + 1))
        else:
            encoded = EncodeResult(bytes(forged), None)
        meta = UpdateMeta(train_loss=local.result.mean_loss, first_loss=local.result.first_loss,
                          steps=local.result.steps, train_s=round(local.train_s, 4),
                          residual_norm=float(np.linalg.norm(encoded.residual)) if encoded.residual is not None else 0.0)
        data = Envelope(Kind.UPDATE, self.config.fleet, self.config.device_id, round=plan.round_id,
                        base_version=plan.base_version, example_count=local.result.examples, codec=codec.spec,
                        meta=to_dict(meta), payload=encoded.payload).encode()
        delay_s = 0.0
        if self._before_send is not None:
            ok, delay_s, cause = self._before_send(plan.round_id, len(data))
            if not ok:
                self.stats.rounds_abandoned += 1
                self._event("abandoned", round=plan.round_id, reasons=[cause or "upload_lost"])
                log.info("%s: round %d upload lost (%s)", self.config.device_id, plan.round_id, cause)
                self._release_model()
                return
        topic = self.topics.update(self.config.device_id)
        if delay_s > 0:  # the simulated link is slower than the real one: publish when it would be through
            timer = threading.Timer(delay_s, self._send_update_quietly, args=(topic, data, plan))
            timer.daemon = True
            timer.start()
        else:
            self._send_update(topic, data, plan)
        if encoded.residual is not None:
            self.residuals.save(encoded.residual)
        self.stats.rounds_trained += 1
        self.stats.updates_sent += 1
        self._event("sent", round=plan.round_id, bytes=len(encoded.payload), loss=local.result.mean_loss)
        self._release_model()

    def _send_update_quietly(self, topic: str, data: bytes, plan: RoundPlan) -> None:
        """A delayed send from a timer thread: never raise there (nobody would see it)."""
        if self._stopped.is_set():
            return
        try:
            self._send_update(topic, data, plan)
        except Exception:
            log.exception("%s: delayed update for round %d failed", self.config.device_id, plan.round_id)

    def _send_update(self, topic: str, data: bytes, plan: RoundPlan) -> None:
        """Publish with QoS 1; with an outbox the update is on disk first and leaves it on PUBACK."""
        self.stats.uplink_bytes += len(data)
        call_later(self.config.ack_timeout_s, self._resend_unacked, topic, data, plan, 1)
        if self.outbox is None:
            self._client.publish(topic, data, qos=1)
            return
        remaining = max(0.0, plan.report_deadline_s - (time.monotonic() - self._plan_at))
        item = self.outbox.put(topic, plan.round_id, time.time() + remaining, data)
        self._publish_and_confirm(item, topic, data, timeout_s=min(remaining, 60.0))

    def _resend_unacked(self, topic: str, data: bytes, plan: RoundPlan, attempt: int) -> None:
        """The broker confirmed the update (PUBACK) but no Ack came: something between the broker and
        the aggregator dropped it (e.g. a client that joined the workers' shared subscription took its
        turn). Send it again while its round is open; the aggregator counts it once (timer thread)."""
        with self._lock:
            if self._stopped.is_set() or self._acked_round >= plan.round_id or self._deadline_passed(plan):
                return
        log.warning("%s: no acknowledgement for the update of round %d after %.0f s: sending it again (%d of %d)",
                    self.config.device_id, plan.round_id, self.config.ack_timeout_s, attempt, MAX_RESENDS)
        self.stats.resends += 1
        self.stats.uplink_bytes += len(data)
        try:
            self._client.publish(topic, data, qos=1)
        except Exception:  # a timer thread: never raise there (nobody would see it)
            log.exception("%s: re-sending the update of round %d failed", self.config.device_id, plan.round_id)
        if attempt < MAX_RESENDS:
            call_later(self.config.ack_timeout_s, self._resend_unacked, topic, data, plan, attempt + 1)

    def _publish_and_confirm(self, item: str, topic: str, data: bytes, timeout_s: float) -> None:
        info = self._client.publish(topic, data, qos=1)
        try:
            info.wait_for_publish(max(timeout_s, 0.1))
        except (RuntimeError, ValueError) as exc:  # not connected: stays in the outbox
            log.info("%s: update kept in the outbox (%s)", self.config.device_id, exc)
            return
        if info.is_published():
            self.outbox.mark_sent(item)  # type: ignore[union-attr]

    def _flush_outbox(self) -> None:
        """After a (re)connect: re-send what is still useful, drop what missed its round."""
        assert self.outbox is not None
        for item in self.outbox.pending():
            if self.outbox.expired(item):
                self.outbox.drop(item.id, f"round {item.round_id} deadline passed before it could be sent")
                continue
            log.info("%s: re-sending the update for round %d from the outbox", self.config.device_id, item.round_id)
            self._publish_and_confirm(item.id, item.topic, item.data, timeout_s=min(60.0, item.deadline_unix - time.time()))

    def _release_model(self) -> None:
        if not self.config.keep_model:
            with self._lock:
                self._weights = None

    # ---- secure aggregation (edge_client/secure_update.py) ------------------------------------
    def _start_secure(self, plan: RoundPlan) -> None:
        secure = SecureUpdate(self.config.fleet, self.config.device_id, plan.round_id, self._dim,
                              update_clip=plan.update_clip, weighted=plan.secure_weighted)
        with self._lock:
            self._secure = secure
        self._send_secagg(secure.advertise())

    def _handle_secagg(self, topic: str, payload: bytes) -> None:
        self.stats.downlink_bytes += len(payload)
        with self._lock:
            secure = self._secure
        if secure is None:
            return  # e.g. the retained roster of a round this device is not in
        if topic == self.topics.secagg_roster:
            self._send_secagg(secure.on_roster(payload))
        elif topic == self.topics.secagg_unmask:
            self._send_secagg(secure.on_unmask(payload))
        elif secure.on_bundle(payload):  # the delta was ready first: mask off the MQTT thread
            threading.Thread(target=self._send_masked, args=(secure,), daemon=True,
                             name=f"mask-{self.config.device_id}").start()

    def _privatize(self, delta: np.ndarray) -> np.ndarray:
        """Clip and noise the update before anything else sees it (codec, masks, outbox).

        The generator is seeded by the OS, never from `hash_seed`: the aggregator knows every
        input of that seed and could subtract the noise.
        """
        cfg = self.config.local_dp
        assert cfg is not None
        result = privatize_update(delta, cfg, np.random.default_rng())
        self.stats.local_dp_releases += 1
        log.info("%s: local DP: update norm %.3g clipped to %.3g, noise sigma %.3g; epsilon %.3g after %d "
                 "update(s) at delta %g", self.config.device_id, result.norm, cfg.clip, result.sigma,
                 cfg.epsilon_after(self.stats.local_dp_releases), self.stats.local_dp_releases,
                 cfg.delta if cfg.delta is not None else 1e-5)
        return result.update

    def _hand_over_secure(self, plan: RoundPlan, delta: np.ndarray, examples: int) -> None:
        with self._lock:
            secure = self._secure if self._secure is not None and self._secure.round_id == plan.round_id else None
        self._release_model()
        if secure is None:
            log.warning("%s: round %d is secure but its key exchange never started; nothing sent",
                        self.config.device_id, plan.round_id)
            self.stats.rounds_abandoned += 1
            return
        self.stats.rounds_trained += 1
        if secure.set_update(delta, weight=float(examples)):
            self._send_masked(secure)

    def _send_masked(self, secure: SecureUpdate) -> None:
        data = secure.masked_input()
        if data is None:
            return
        if self._before_send is not None:
            ok, delay_s, cause = self._before_send(secure.round_id, len(data))
            if not ok:  # lost upload: the server recovers this device's masks from its peers' shares
                self.stats.rounds_abandoned += 1
                self._event("abandoned", round=secure.round_id, reasons=[cause or "upload_lost"])
                return
            if delay_s > 0:  # the simulated link is slower than the real one: publish when it would be through
                timer = threading.Timer(delay_s, self._send_secagg, args=(data,), kwargs={"count_update": True})
                timer.daemon = True
                timer.start()
                self._event("sent", round=secure.round_id, bytes=len(data))
                return
        self._send_secagg(data, count_update=True)
        self._event("sent", round=secure.round_id, bytes=len(data))

    def _send_secagg(self, data: bytes | None, *, count_update: bool = False) -> None:
        if data is None or self._stopped.is_set():
            return
        self.stats.uplink_bytes += len(data)
        if count_update:
            self.stats.updates_sent += 1
        self._client.publish(self.topics.secagg_up(self.config.device_id), data, qos=1)

    def _handle_ack(self, env: Envelope) -> None:
        ack = Ack.from_envelope(env)
        with self._lock:
            self._acked_round = max(self._acked_round, ack.round_id)
        if ack.accepted:
            self.stats.updates_accepted += 1
        else:
            self.stats.updates_rejected += 1
            self.stats.last_rejection = f"{ack.reason}: {ack.detail}"
            # over-selected devices that report after the goal was reached: expected, not a problem
            level = logging.INFO if ack.reason == Reason.ROUND_CLOSED.value else logging.WARNING
            log.log(level, "%s: update for round %d rejected: %s %s", self.config.device_id, ack.round_id,
                    ack.reason, ack.detail)
        self._event("ack", round=ack.round_id, accepted=ack.accepted, reason=ack.reason)
        with self._lock:
            self._go_quiet()  # its round is done: no plans until pace steering expects it back

    # ---- helpers -------------------------------------------------------------------------
    def _publish(self, topic: str, env: Envelope) -> None:
        self._client.publish(topic, env.encode(), qos=1)

    def _event(self, name: str, **fields: object) -> None:
        if self._on_event is not None:
            self._on_event(name, {"device": self.config.device_id, **fields})


def _f32_digest(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()


def hash_seed(seed: int, device: str, round_id: int) -> int:
    """A per-device, per-round seed that does not depend on Python's salted hash()."""
    digest = hashlib.blake2b(f"{seed}/{device}/{round_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def default_state_dir(device_id: str) -> Path:
    return Path.home() / ".local" / "state" / "fedboard" / device_id
