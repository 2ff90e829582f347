"""The model a device serves suggestions from: the newest one it may fetch, not only the last it trained.

A device saves the global model it accepts for training (`model.fbm`), but it is picked for a
round only now and then, so its suggestions would age with it. The aggregator also publishes
the int8 inference model, retained on `model/int8` (about a quarter of the float model's
bytes). The running client follows that topic on its own MQTT session (`ServingFollower`),
only while the eligibility policy's network rule allows downloads (no fetching on a metered
link just to serve), verifies each message exactly like a training model (signature, fleet,
model id, payload sha256, a version that never goes back: `PersistentTrust` with its own
files `serving.json` and `serving.fbm`) and names the device's bundle, and keeps it on disk
atomically. `load_serving_model` gives `fedboard predict` the newest of the two verified
files. The full model on `model/current` is not followed for serving: it is 4x the bytes and
a device fetches it anyway whenever it trains.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_client.app import (BUNDLE_FILE, MODEL_FILE, PersistentTrust, VerifiedModel, decode_model_weights,
                             read_cached_bundle, verify_model_message)
from edge_client.client_config import ClientConfig
from edge_client.eligibility import EligibilityPolicy
from edge_client.platform import Platform
from edge_client.timers import call_later
from models.bundle import Bundle
from protocol.envelope import Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, TrustError
from protocol.model_message import INFERENCE_CODEC, ModelMessage
from protocol.signing import SignedManifest, load_public_key
from protocol.topics import FleetTopics

log = logging.getLogger(__name__)

SERVING_FILE = "serving.fbm"          # the newest verified int8 inference model (signed message)
SERVING_TRUST_FILE = "serving.json"   # its version order, kept apart from training's trust.json
MAX_INFERENCE_BYTES = 32 * 1024 * 1024  # a 2.1M-parameter int8 model is about 2.2 MB


class Follows(Protocol):
    """What the follower needs of the device session (DeviceClient.follow/unfollow)."""

    def follow(self, topic: str, handler: Callable[[bytes], None]) -> None: ...

    def unfollow(self, topic: str) -> None: ...


def serving_trust(public_key: object, fleet: str, model_id: str, state_dir: Path) -> PersistentTrust:
    """The trust of the serving stream: the training model's checks, under the serving files."""
    return PersistentTrust(public_key, fleet, model_id, state_dir, trust_file=SERVING_TRUST_FILE,
                           model_file=SERVING_FILE, kind=Kind.INFERENCE_MODEL)


class ServingFollower:
    """Keeps `serving.fbm` at the newest verified int8 model the fleet publishes.

    Re-reads the platform every `interval_s` and follows `model/int8` only while
    `policy.allows_download` says so; a change is logged once.
    """

    def __init__(self, session: Follows, trust: PersistentTrust, bundle: Bundle, platform: Platform,
                 policy: EligibilityPolicy, *, interval_s: float = 60.0) -> None:
        self.session = session
        self.trust = trust
        self.bundle = bundle
        self.platform = platform
        self.policy = policy
        self.interval_s = interval_s
        self.topic = FleetTopics(trust.fleet).model_int8
        self.following = False
        self.refused = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._check()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self.following:
                self.session.unfollow(self.topic)
                self.following = False

    def _check(self) -> None:
        if self._stopped.is_set():
            return
        try:
            allowed = self.policy.allows_download(self.platform.read())
        except Exception:  # a sensor read must not end the follower
            log.exception("serving model: could not read the platform")
            allowed = self.following
        with self._lock:
            if not self._stopped.is_set() and allowed != self.following:
                if allowed:
                    self.session.follow(self.topic, self.on_message)
                    log.info("following the fleet's int8 inference model on %s for suggestions", self.topic)
                else:
                    self.session.unfollow(self.topic)
                    log.info("metered or no network: not fetching the inference model for suggestions")
                self.following = allowed
        call_later(self.interval_s, self._check)

    def on_message(self, data: bytes) -> None:
        """Verify and keep one published inference model; refused ones are logged and change nothing."""
        try:
            self._accept(data)
        except ProtocolError as exc:
            self.refused += 1
            saved = self.trust.saved
            log.warning("refused the inference model on %s: %s (keeping %s)", self.topic, exc,
                        f"v{saved.version}" if saved is not None else "the trained model")

    def _accept(self, data: bytes) -> None:
        message = ModelMessage.from_envelope(decode_envelope(data, expect=Kind.INFERENCE_MODEL,
                                                             max_payload=MAX_INFERENCE_BYTES))
        signed = SignedManifest.from_bytes(message.signed_manifest)
        check_inference_claims(signed, message, self.bundle)  # claims only: accept() verifies the signature
        manifest = self.trust.accept(signed, message.weights_payload)  # saves serving.fbm when newer
        log.info("serving suggestions from the int8 model v%d (%d bytes)", manifest.version, manifest.payload_len)


def check_inference_claims(signed: SignedManifest, message: ModelMessage, bundle: Bundle) -> None:
    """An inference model for THIS bundle, named as one, with one version; TrustError if not."""
    manifest = signed.manifest
    if manifest.codec != INFERENCE_CODEC or message.codec != INFERENCE_CODEC:
        raise TrustError(Reason.WRONG_MODEL, f"codec {manifest.codec!r} is not an inference model ({INFERENCE_CODEC})")
    if manifest.version != message.version:
        raise TrustError(Reason.WRONG_MODEL, f"manifest says v{manifest.version}, message says v{message.version}")
    named = VerifiedModel(signed, message.weights_payload, manifest).bundle_sha256
    if named != bundle.sha256:
        raise TrustError(Reason.WRONG_MODEL, f"made for bundle {named[:12]}, this device runs {bundle.sha256[:12]}")


@dataclass(frozen=True)
class ServedModel:
    """What `fedboard predict` runs: the newest verified model the device holds."""

    bundle: Bundle
    version: int | None          # None: no global model yet (the bundle's initial weights)
    kind: str                    # "int8" or "float"
    weights: np.ndarray | None = None  # float: the global weights
    tflite: bytes | None = None        # int8: the inference model

    def describe(self) -> str:
        if self.version is None:
            return f"{self.kind} model, the bundle's initial weights"
        source = "the inference model fetched for suggestions" if self.kind == "int8" else "the model it trained on"
        return f"{self.kind} model v{self.version}, the device's latest global model: {source}"


def load_serving_model(config: ClientConfig) -> ServedModel:
    """The newest of `model.fbm` (float) and `serving.fbm` (int8), both verified; int8 on a tie.

    A serving file that does not verify is skipped with a warning (the float model serves).
    """
    state_dir, fleet = config.device.state_dir, config.device.fleet
    public_key = load_public_key(config.trust.aggregator_public_key)
    bundle = read_cached_bundle(state_dir / BUNDLE_FILE)
    if bundle is None:
        raise FileNotFoundError(f"no training bundle in {state_dir}: run `fedboard client --config "
                                f"{config.path}` once so it fetches one")
    served = ServedModel(bundle, None, "float")
    path = state_dir / MODEL_FILE
    if path.exists():  # as load_saved_model, keeping the version
        trained = verify_model_message(path.read_bytes(), public_key, fleet)
        if trained.bundle_sha256 == bundle.sha256:
            served = ServedModel(bundle, trained.manifest.version, "float",
                                 weights=decode_model_weights(trained, bundle.param_count))
        else:
            log.warning("the saved global model belongs to another bundle: using the bundle's initial weights")
    version = served.version
    path = state_dir / SERVING_FILE
    if not path.exists():
        return served
    try:
        model = verify_model_message(path.read_bytes(), public_key, fleet, kind=Kind.INFERENCE_MODEL)
        message = ModelMessage(config.device.fleet, model.manifest.version, model.manifest.codec,
                               model.signed.to_bytes(), model.payload)
        check_inference_claims(model.signed, message, bundle)
        if model.manifest.model_id != bundle.model_id:
            raise TrustError(Reason.WRONG_MODEL, f"model id {model.manifest.model_id!r}, the bundle is {bundle.model_id!r}")
    except (ProtocolError, OSError) as exc:
        log.warning("%s is unusable (%s): serving the trained model", path, exc)
        return served
    if version is not None and model.manifest.version < version:
        return served
    return ServedModel(bundle, model.manifest.version, "int8", tflite=model.payload)
