"""No silent reset, no fork: what an aggregator checks before it publishes anything, and the
explicit way back from a lost checkpoint (`fedboard aggregator --recover-from-broker`).

A device never goes back to an older model version (protocol.signing.ModelTrust). An
aggregator that lost `model.npz` (or its whole checkpoint directory) and started afresh at
version 0 would publish v0 over the v10 the fleet trusts: every device then ignores every later
plan and the fleet stops learning with no error anywhere. So a start is refused (exit 3) when
there is evidence of an earlier run: files left in the checkpoint directory (`earlier_run`),
or a model of this fleet on the broker newer than the one the aggregator would publish. The
broker is asked before anything is published, on the aggregator's own connection (never a
second client, which could take over the aggregator's persistent session).

The way back is explicit: the retained model is adopted only after the aggregator's own key
verifies it (signature, fleet, model id, payload sha256, weights checksum). What the broker
does not hold starts afresh and is said so: the server optimizer's state (e.g. FedAdam's
moments), the cohort RNG, pace steering's period.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.publisher import weights_digest
from protocol.codec import parse_codec
from protocol.envelope import Kind, decode_envelope
from protocol.errors import ProtocolError
from protocol.model_message import ModelMessage
from protocol.signing import ModelTrust, SignedManifest, key_fingerprint

log = logging.getLogger(__name__)

RECOVER_FLAG = "--recover-from-broker"


@dataclass(frozen=True)
class RetainedModel:
    """The global model the broker retains for the fleet, as far as it could be checked.

    `version` is what the message claims (None if it is not a model message at all);
    `weights` is set only when the aggregator's key verified everything (`problem` empty)."""

    envelope: bytes
    version: int | None
    round: int = 0                    # the round that committed it (manifest extra), 0 if unnamed
    weights: np.ndarray | None = None
    payload_len: int = 0
    problem: str = ""

    @property
    def verified(self) -> bool:
        return self.weights is not None and not self.problem


def inspect_retained_model(envelope: bytes, public_key: Any, fleet: str, model_id: str, dim: int,
                           max_payload: int) -> RetainedModel:
    """Parse and verify a retained model message with the aggregator's own public key."""
    try:
        message = ModelMessage.from_envelope(decode_envelope(envelope, max_payload=max_payload, expect=Kind.MODEL))
    except ProtocolError as exc:
        return RetainedModel(envelope, None, problem=f"not a model message ({exc})")
    try:
        signed = SignedManifest.from_bytes(message.signed_manifest)
        manifest = ModelTrust(public_key, fleet, model_id).accept(signed, message.weights_payload)
        if manifest.version != message.version or manifest.base_version is not None:
            return RetainedModel(envelope, message.version, problem=f"manifest says v{manifest.version}, "
                                 f"message v{message.version}")
        weights = parse_codec(manifest.codec).decode(message.weights_payload, dim)
    except (ProtocolError, ValueError) as exc:
        return RetainedModel(envelope, message.version, problem=str(exc))
    if manifest.extra.get("weights_f32_sha256") not in (None, weights_digest(weights)):
        return RetainedModel(envelope, message.version, problem="decoded weights differ from the manifest's checksum")
    round_id = manifest.extra.get("round")
    return RetainedModel(envelope, manifest.version, round_id if isinstance(round_id, int) else 0,
                         np.asarray(weights, dtype=np.float32), len(message.weights_payload))


class RetainedProbe:
    """Reads what the broker retains on `topic`, on a client that is already connected.

    Subscribes (QoS 0, so a backlog of unacknowledged QoS 1 messages cannot hold it back) to
    the topic and to a private probe topic, then publishes a nonce to the probe topic: the
    broker queues the retained message at subscribe time, before the nonce, so once the nonce
    is back, what was retained has been seen (or there was none). The owner routes incoming
    messages through `take` while the probe runs.
    """

    def __init__(self, client: Any, topic: str, probe_topic: str) -> None:
        self.client = client
        self.topic = topic
        self.probe_topic = probe_topic
        self.nonce = os.urandom(16)
        self.retained: bytes | None = None
        self._done = threading.Event()

    def take(self, topic: str, payload: bytes, retain: bool) -> bool:
        """True if the message is the probe's (the caller then drops it)."""
        if topic == self.probe_topic:
            if payload == self.nonce:
                self._done.set()
            return True
        if topic == self.topic:
            if retain and not self._done.is_set():
                self.retained = bytes(payload)
            return True
        return False

    def run(self, timeout_s: float) -> bytes | None:
        """The retained payload (None if nothing is retained); TimeoutError if the broker did not answer."""
        self.client.subscribe([(self.topic, 0), (self.probe_topic, 0)])
        self.client.publish(self.probe_topic, self.nonce, qos=1)
        try:
            if not self._done.wait(timeout_s):
                raise TimeoutError(f"the broker did not answer in {timeout_s:.0f} s when asked which model it "
                                   f"retains on {self.topic}; nothing was published: start the aggregator again")
        finally:
            self.client.unsubscribe([self.topic, self.probe_topic])
        return self.retained


def local_evidence_message(directory: Any, found: list[str]) -> str:
    """Why a start without model.npz is refused, and what to do."""
    return (f"{directory} has no model.npz but holds {', '.join(found)} from an earlier run: starting afresh at "
            "v0 would fork the fleet (devices never go back to an older model, so they would ignore every "
            "plan). Restore model.npz from a backup, or start with " + RECOVER_FLAG + " to continue from the "
            "signed model the broker retains (the server optimizer's state restarts). To start a new fleet on "
            "purpose, use another checkpoint directory and fleet name")


def broker_evidence_message(retained: RetainedModel, topic: str, ours: int, directory: Any, public_key: Any,
                            restored: bool) -> str:
    """Why a start is refused when the broker retains a newer model, and what to do."""
    where = (f"the checkpoint in {directory} is at v{ours} (restored from an older backup?)" if restored
             else f"{directory} holds no model (this start would publish v0)")
    if retained.verified:
        what = f"the broker retains model v{retained.version} of this fleet on {topic}, signed by this key"
        todo = (f"start with {RECOVER_FLAG} to continue from it (the next model is v{(retained.version or 0) + 1})"
                + (" (move model.npz away first)" if restored else "")
                + ", or restore the checkpoint directory that published it")
    else:
        what = (f"the broker retains a model claiming v{retained.version} on {topic} that this aggregator's key "
                f"(fingerprint {key_fingerprint(public_key)}) does not verify: {retained.problem}")
        todo = "start the aggregator that owns this fleet with its own key and checkpoint directory"
    return (f"{what}, but {where}: publishing would fork the fleet (devices ignore anything older than what "
            f"they trust). {todo[0].upper() + todo[1:]}. If another aggregator is serving this fleet right now, "
            f"leave it be: one aggregator per fleet. Only to start the fleet over on purpose: clear the retained "
            f"model (mosquitto_pub -r -n -t {topic}) and reset the devices' trust")
