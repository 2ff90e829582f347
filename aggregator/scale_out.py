"""Scale-out: several intake workers share the update stream; one coordinator commits.

Decoding and validating updates is the aggregator's CPU cost (megabytes per update). Workers
subscribe to the updates through an MQTT shared subscription,
``$share/<group>/fedboard/<fleet>/update/+``, so the broker hands each update to ONE of
them. A worker validates and decodes it, then CLAIMS it from the coordinator (a tiny message:
device, round, weight); the coordinator grants the first claim per device while the round is
open and the goal is not reached, so an update redelivered to another worker is still counted
once. A granted update is folded into the worker's partial sum and acknowledged to the device.
When the round closes, each worker publishes its partial aggregator state; the coordinator
checks that the ids in the partial sums are exactly the ones it granted, merges the sums and
runs the server optimizer and publishing as a single aggregator would.

Internal topics (only the aggregator's broker user may use them), under ``fedboard/<fleet>/agg/``:
``round`` (retained: round id, base version, codec, open, cohort), ``claim/<worker>``,
``grant/<worker>``, ``partial/<worker>``. Messages travel in the usual envelope (kind STATUS,
JSON meta, CRC-checked) so a corrupted one is refused like any other. See SCALE_OUT.md.
"""
from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from aggregator.aggregation import make_aggregator
from aggregator.intake import IntakeLimits, RoundState, validate_update
from protocol.envelope import DEFAULT_MAX_PAYLOAD, Envelope, Kind, decode_envelope
from protocol.errors import EnvelopeError, ProtocolError, Reason, ValidationError
from protocol.messages import Ack
from protocol.topics import FleetTopics, check_id
from protocol.transport import MqttSettings, configure_client

log = logging.getLogger(__name__)


# The default share group: anyone can name it, so deployments pass broker-config's secret one.
WELL_KNOWN_GROUP = "fedboard-agg"


def agg_root(topics: FleetTopics) -> str:
    return f"{topics.root}/agg"


def shared_updates(topics: FleetTopics, group: str) -> str:
    return f"$share/{check_id('share group', group)}/{topics.all_updates}"


def _envelope(fleet: str, worker: str, round_id: int, meta: dict, payload: bytes = b"") -> bytes:
    return Envelope(Kind.STATUS, fleet, worker, round=round_id, codec="fedboard-agg", meta=meta, payload=payload).encode()


def _decode(payload: bytes, kind: str) -> Envelope:
    env = decode_envelope(payload, expect=Kind.STATUS)
    if env.codec != "fedboard-agg" or env.meta.get("type") != kind:
        raise EnvelopeError(Reason.BAD_FIELD, f"not an aggregator {kind} message")
    return env


def state_to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise EnvelopeError(Reason.BAD_PAYLOAD, f"partial sum is not a readable npz: {exc}") from None


def merge_states(states: list[dict[str, Any]], *, dim: int) -> dict[str, Any]:
    """One aggregator state holding the sum of several mean-type partial states.

    Works for 'mean' and 'clip:C|mean' (the clip happened on the workers, per update).
    """
    if not states:
        raise ValueError("no partial state to merge")
    kind = str(np.asarray(states[0]["kind"]).item())
    if kind == "clip":
        inner = merge_states([{k[6:]: v for k, v in s.items() if k.startswith("inner.")} for s in states], dim=dim)
        first = dict(states[0])
        out = {k: v for k, v in first.items() if not k.startswith("inner.")}
        out["clipped"] = sum(int(np.asarray(s["clipped"]).item()) for s in states)
        out["max_norm_seen"] = max(float(np.asarray(s["max_norm_seen"]).item()) for s in states)
        out.update({f"inner.{k}": v for k, v in inner.items()})
        return out
    if kind != "mean":
        raise ValueError(f"cannot merge partial states of a {kind!r} aggregator (mean-type only)")
    for s in states:
        if str(np.asarray(s["kind"]).item()) != "mean" or int(np.asarray(s["dim"]).item()) != dim:
            raise ValueError("partial states disagree in kind or size")
    total = np.zeros(dim, dtype=np.asarray(states[0]["sum"]).dtype)
    ids: list[str] = []
    for s in states:
        total += np.asarray(s["sum"])
        ids += [str(x) for x in np.asarray(s["client_ids"]).reshape(-1).tolist()]
    if len(set(ids)) != len(ids):
        raise ValueError("a device appears in two partial sums")
    return {"kind": "mean", "spec": str(np.asarray(states[0]["spec"]).item()), "dim": dim, "count": len(ids),
            "total_weight": float(sum(float(np.asarray(s["total_weight"]).item()) for s in states)),
            "client_ids": np.array(ids, dtype=np.str_) if ids else np.zeros(0, dtype="<U1"), "sum": total}


class CoordinatorLink:
    """The coordinator's half of the protocol: topic names, round context, claims, grants."""

    def __init__(self, topics: FleetTopics, config: Any) -> None:
        self.topics = topics
        self.fleet = topics.fleet
        self.root = agg_root(topics)
        self.max_update_norm = config.max_update_norm

    @property
    def all_claims(self) -> str:
        return f"{self.root}/claim/+"

    @property
    def all_partials(self) -> str:
        return f"{self.root}/partial/+"

    def is_claim(self, topic: str) -> bool:
        return topic.startswith(f"{self.root}/claim/")

    def is_partial(self, topic: str) -> bool:
        return topic.startswith(f"{self.root}/partial/")

    def worker_of(self, topic: str) -> str:
        return check_id("worker", topic.rsplit("/", 1)[-1])

    def round_message(self, plan: Any, cohort: list[str], open_: bool, config: Any) -> tuple[str, bytes]:
        meta = {"type": "round", "round_id": plan.round_id, "base_version": plan.base_version, "codec": plan.codec,
                "open": open_, "aggregation": config.aggregation, "max_norm": config.max_update_norm}
        return f"{self.root}/round", _envelope(self.fleet, "", plan.round_id, meta, json.dumps(cohort).encode())

    def parse_claim(self, payload: bytes) -> dict[str, Any]:
        env = _decode(payload, "claim")
        claim = dict(env.meta)
        check_id("device", claim.get("device", ""))
        for key in ("round_id", "base_version", "examples", "bytes"):
            if not isinstance(claim.get(key), int):
                raise EnvelopeError(Reason.BAD_FIELD, f"claim.{key} must be an int")
        return claim

    def check_claim(self, claim: dict[str, Any], state: RoundState) -> None:
        device = claim["device"]
        if claim["round_id"] != state.round_id:
            raise ValidationError(Reason.WRONG_ROUND, f"claim for round {claim['round_id']}, round {state.round_id} is open")
        if device in state.accepted:
            raise ValidationError(Reason.DUPLICATE, f"an update from {device!r} was already accepted this round")
        if not state.open:
            raise ValidationError(Reason.ROUND_CLOSED, f"round {state.round_id} is already closed")
        if device not in state.cohort:
            raise ValidationError(Reason.NOT_IN_COHORT, f"device {device!r} was not selected")
        if claim["base_version"] != state.base_version:
            raise ValidationError(Reason.STALE_BASE, f"trained from version {claim['base_version']}")

    def grant_message(self, worker: str, claim: dict[str, Any], granted: bool, reason: str = "",
                      detail: str = "", weight: float | None = None) -> tuple[str, bytes]:
        meta = {"type": "grant", "device": claim["device"], "round_id": claim["round_id"], "granted": granted,
                "reason": reason, "detail": detail[:300]}
        if weight is not None:  # the bounded weight (aggregator/weights.py): the worker adds with it
            meta["weight"] = weight
        return f"{self.root}/grant/{worker}", _envelope(self.fleet, worker, claim["round_id"], meta)

    def parse_partial(self, payload: bytes) -> tuple[int, dict[str, np.ndarray]]:
        env = _decode(payload, "partial")
        return env.round, state_from_bytes(env.payload)


@dataclass
class _Context:
    round_id: int = -1
    base_version: int = 0
    codec: str = ""
    open: bool = False
    cohort: set[str] = field(default_factory=set)
    aggregation: str = "mean"
    max_norm: float = 1e3


class IntakeWorker:
    """One scale-out worker process: validates, claims, folds and acknowledges updates.

    It keeps no checkpoint: if it dies mid-round, its partial sum is missing when the round
    closes and the coordinator abandons that round (never a wrong model); the updates it had
    acknowledged are lost with it, as a device that dropped out would be.
    """

    def __init__(self, fleet: str, dim: int, mqtt_settings: MqttSettings, worker_id: str, *,
                 group: str = "fedboard-agg", max_payload: int = DEFAULT_MAX_PAYLOAD, claim_timeout_s: float = 10.0) -> None:
        if mqtt_settings.mqtt_version != 5:
            log.info("shared subscriptions work best over MQTT 5; using %d", mqtt_settings.mqtt_version)
        self.fleet, self.dim, self.worker_id = fleet, dim, check_id("worker", worker_id)
        self.topics = FleetTopics(fleet)
        self.root = agg_root(self.topics)
        self.group = group
        if group == WELL_KNOWN_GROUP:
            log.warning("worker %s: share group %r is the well-known default: a device that subscribes to "
                        "$share/%s/... takes its turn at updates it may not read (the broker drops them; devices "
                        "re-send). Pass the secret of `fedboard broker-config --workers N` (credentials/share-group) "
                        "as --share-group", worker_id, group, group)
        self.max_payload = max_payload
        self.claim_timeout_s = claim_timeout_s
        self._mqtt = mqtt_settings
        self._ctx = _Context()
        self._aggregate = make_aggregator("mean")
        self._accepted: set[str] = set()
        self._grants: dict[str, tuple[threading.Event, dict]] = {}
        self._lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self.accepted_total = 0
        self.rejected_total = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"agg-worker-{worker_id}",
                                   protocol=mqtt_settings.paho_protocol(), manual_ack=True)
        configure_client(self._client, mqtt_settings)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()
        self._client.connect_async(self._mqtt.host, self._mqtt.port, keepalive=self._mqtt.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.stop()
            raise ConnectionError(f"worker {self.worker_id} could not connect to {self._mqtt.host}:{self._mqtt.port}")

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(30)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object = None) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("worker %s: connection refused: %s", self.worker_id, reason_code)
            return
        client.subscribe([(f"{self.root}/round", 1), (f"{self.root}/grant/{self.worker_id}", 1),
                          (shared_updates(self.topics, self.group), 1)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == f"{self.root}/grant/{self.worker_id}":
            # answered here, on the network thread: the intake thread is waiting for it
            try:
                env = _decode(msg.payload, "grant")
                with self._lock:
                    waiting = self._grants.get(env.meta.get("device", ""))
                if waiting is not None and env.round == waiting[1].get("round_id"):
                    waiting[1].update(env.meta)
                    waiting[0].set()
            except ProtocolError as exc:
                log.warning("worker %s: bad grant: %s", self.worker_id, exc)
            client.ack(msg.mid, msg.qos)
            return
        self._inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            topic, payload, mid, qos = item
            try:
                if topic == f"{self.root}/round":
                    self._handle_round(payload)
                else:
                    self._handle_update(self.topics.device_of(topic), payload)
            except ProtocolError as exc:
                log.warning("worker %s: refused message on %s: %s", self.worker_id, topic, exc)
            except Exception:
                log.exception("worker %s: error handling %s", self.worker_id, topic)
            if qos > 0:
                self._client.ack(mid, qos)

    def _handle_round(self, payload: bytes) -> None:
        env = _decode(payload, "round")
        m = env.meta
        try:
            cohort = set(json.loads(env.payload.decode() or "[]"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(Reason.BAD_PAYLOAD, f"cohort list is not JSON: {exc}") from None
        if m["round_id"] != self._ctx.round_id:
            self._aggregate = make_aggregator(m.get("aggregation", "mean"))
            self._aggregate.reset(self.dim)
            self._accepted = set()
        self._ctx = _Context(m["round_id"], m["base_version"], m["codec"], bool(m["open"]), cohort,
                             m.get("aggregation", "mean"), float(m.get("max_norm", 1e3)))
        if not self._ctx.open and self._aggregate.count:  # (again after a coordinator restart)
            data = _envelope(self.fleet, self.worker_id, self._ctx.round_id, {"type": "partial"},
                             state_to_bytes(self._aggregate.state()))
            self._client.publish(f"{self.root}/partial/{self.worker_id}", data, qos=1).wait_for_publish(30)
            log.info("worker %s: partial sum of round %d sent (%d updates)", self.worker_id, self._ctx.round_id,
                     self._aggregate.count)

    def _handle_update(self, device: str, data: bytes) -> None:
        ctx = self._ctx
        round_id = -1
        try:
            env = decode_envelope(data, max_payload=self.max_payload, expect=Kind.UPDATE)
            round_id = env.round
            if env.device != device:
                raise ValidationError(Reason.BAD_FIELD, f"envelope says device {env.device!r}, topic says {device!r}")
            state = RoundState(ctx.round_id, ctx.base_version, ctx.codec, ctx.cohort, set(self._accepted), ctx.open)
            delta = validate_update(env, state, IntakeLimits(self.dim, ctx.max_norm))
        except ProtocolError as exc:
            self._answer(device, round_id, exc.reason is Reason.DUPLICATE, exc.reason.value, exc.detail)
            return
        claim = {"type": "claim", "device": device, "round_id": env.round, "base_version": env.base_version,
                 "examples": env.example_count, "bytes": len(data),
                 "meta": {k: v for k, v in env.meta.items() if k in ("train_loss", "eval", "extra")}}
        event = threading.Event()
        with self._lock:
            self._grants[device] = (event, {"round_id": env.round})
        self._client.publish(f"{self.root}/claim/{self.worker_id}",
                             _envelope(self.fleet, self.worker_id, env.round, claim), qos=1)
        granted = event.wait(self.claim_timeout_s)
        with self._lock:
            answer = self._grants.pop(device)[1]
        if not granted:
            self._answer(device, env.round, False, Reason.ROUND_CLOSED.value, "the coordinator did not answer")
            return
        if answer.get("granted"):
            weight = answer.get("weight")  # the coordinator's bound on the claimed example count
            bounded = float(env.example_count) if not isinstance(weight, (int, float)) or isinstance(weight, bool) \
                else min(float(env.example_count), float(weight))
            self._aggregate.add(delta, bounded, client_id=device)
            self._accepted.add(device)
            self.accepted_total += 1
            self._answer(device, env.round, True, "", "")
        else:
            reason = str(answer.get("reason", ""))
            self._answer(device, env.round, reason == Reason.DUPLICATE.value, reason, str(answer.get("detail", "")))

    def _answer(self, device: str, round_id: int, accepted: bool, reason: str, detail: str) -> None:
        if not accepted:
            self.rejected_total += 1
            log.warning("worker %s: rejected update from %s: %s %s", self.worker_id, device, reason, detail)
        ack = Ack(max(round_id, 0), accepted, reason, detail[:500])
        self._client.publish(self.topics.ack(device), ack.to_envelope(self.fleet, device).encode(), qos=1)


def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
