"""`fedboard client`: the real device, wired from `client.toml`.

Start-up ("bootstrap") happens before the round protocol can run, because the interpreter
needs the training bundle: the app reads the fleet's retained global model, verifies its
signature with the aggregator's public key, and takes the bundle the signed manifest names
(`extra["bundle_sha256"]`), from its cache in `state_dir` or from the retained bundle topic;
a fetched bundle's bytes must match the signed `bundle_file_sha256` and `bundle_file_bytes`
before the zip is opened (a zip bomb nobody signed is never inflated).
A broker that cannot be reached is not fatal when a verified bundle is cached (the MQTT
session keeps retrying in the background, as a device on a flaky network must); without a
bundle the app stops with an error that says what it waited for, and systemd restarts it
later.

State kept in `state_dir` (mode 0700): `bundle.fbz` (the training bundle), `trust.json` (the
last model version accepted, so a restart cannot be fed an older model), `model.fbm` (the
last accepted global model, signed, for `fedboard predict`), `serving.fbm` + `serving.json` (the
newest int8 inference model, fetched for suggestions: edge_client/serving.py), `residual.f32`
(error feedback).
The user's texts live in the text store (`[device] data`) and never leave the device. The texts,
the residual and `outbox/` are encrypted with the device's store key (edge_client/at_rest.py),
checked against every store before anything is written.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from edge_client.at_rest import device_keyring, open_device_stores
from edge_client.client_config import ClientConfig
from edge_client.device import DeviceClient, DeviceConfig
from edge_client.eligibility import EligibilityPolicy
from edge_client.eligibility import Reason as EligibilityReason
from edge_client.linux_platform import LinuxPlatform
from edge_client.platform import Platform
from edge_client.text_windows import StoreWindows
from edge_client.textstore import TextStore
from edge_client.trainer import InterpreterPool
from models.bundle import MAX_BUNDLE_BYTES, Bundle, BundleError, read_bundle
from models.tokenizer import Vocabulary
from protocol.codec import parse_codec
from protocol.envelope import DEFAULT_MAX_PAYLOAD, Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, TrustError
from protocol.model_message import ModelMessage
from protocol.signing import ModelManifest, ModelTrust, SignedManifest, load_public_key
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings, configure_client

if TYPE_CHECKING:
    from edge_client.serving import ServingFollower

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.fbz"
TRUST_FILE = "trust.json"
MODEL_FILE = "model.fbm"
TRUST_FORMAT = "fedboard-trust/1"
EXIT_RESTART = 75  # EX_TEMPFAIL: "run me again"; systemd's Restart=on-failure does
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


class BootstrapError(ConnectionError):
    """The client could not get a verified training bundle; the message says what it waited for."""


# -- small atomic files ----------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """temp file + fsync + rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrustState:
    """The newest model this device ever accepted (fleet-wide version order)."""

    fleet: str
    version: int
    weights_sha256: str
    model_id: str

    def to_json(self) -> bytes:
        return json.dumps({"format": TRUST_FORMAT, "fleet": self.fleet, "version": self.version,
                           "weights_sha256": self.weights_sha256, "model_id": self.model_id},
                          sort_keys=True).encode() + b"\n"


def load_trust_state(path: Path, fleet: str) -> TrustState | None:
    """The saved state, None if there is none (or it is another fleet's); ValueError if corrupt.

    A corrupt file is an error rather than "no state", because forgetting the last version
    would let an older signed model be replayed; delete the file to trust afresh.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
        if obj.get("format") != TRUST_FORMAT:
            raise ValueError(f"format {obj.get('format')!r}")
        state = TrustState(str(obj["fleet"]), int(obj["version"]), str(obj["weights_sha256"]), str(obj["model_id"]))
        if state.version < 0 or not _SHA256.match(state.weights_sha256):
            raise ValueError("bad version or sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); delete it to accept the next model the aggregator "
                         "signs") from None
    if state.fleet != fleet:
        log.warning("%s belongs to fleet %s, this device is in %s: ignoring it", path, state.fleet, fleet)
        return None
    return state


class PersistentTrust(ModelTrust):
    """ModelTrust whose last accepted version survives restarts (`trust.json` in state_dir).

    ModelTrust alone keeps the version in memory. After a restart the device must not accept
    anything older than what it had, yet must accept the SAME model again (the retained model
    has usually not changed). ModelTrust re-admits the same version only with the same sha256,
    which it does not persist; so this class starts ModelTrust one version below the saved one
    and refuses, itself, that version with any other payload hash. Every accepted model is
    written back (state and, for `fedboard predict`, the signed model message itself).
    """

    def __init__(self, public_key: object, fleet: str, model_id: str | None, state_dir: Path,
                 *, save_model: bool = True, trust_file: str = TRUST_FILE, model_file: str = MODEL_FILE,
                 kind: Kind = Kind.MODEL) -> None:
        # trust_file/model_file/kind: a second stream with its own version order (the int8 serving
        # model, edge_client/serving.py) reuses this class under other file names
        self.state_path = Path(state_dir) / trust_file
        self.model_path = Path(state_dir) / model_file
        self.kind = kind
        self.save_model = save_model
        self.saved = load_trust_state(self.state_path, fleet)
        floor = None if self.saved is None or self.saved.version == 0 else self.saved.version - 1
        super().__init__(public_key, fleet, model_id, last_version=floor)  # type: ignore[arg-type]
        self._save_lock = threading.Lock()

    def accept(self, signed: SignedManifest, weights_payload: bytes) -> ModelManifest:
        saved = self.saved
        claimed = getattr(signed, "manifest", None)
        if (saved is not None and isinstance(claimed, ModelManifest) and claimed.version == saved.version
                and claimed.weights_sha256 != saved.weights_sha256):
            exc = TrustError(Reason.OLD_VERSION, f"version {claimed.version} with other weights than the "
                                                 f"version {saved.version} this device accepted before (replay?)")
            log.warning("refused model for fleet %s: %s", self.fleet, exc)
            raise exc
        manifest = super().accept(signed, weights_payload)
        self._remember(manifest, signed, weights_payload)
        return manifest

    def _remember(self, manifest: ModelManifest, signed: SignedManifest, payload: bytes) -> None:
        state = TrustState(manifest.fleet, manifest.version, manifest.weights_sha256, manifest.model_id)
        with self._save_lock:
            if state == self.saved:
                return
            try:  # the model first: a crash between the two leaves a state that takes it again
                if self.save_model and manifest.base_version is None:
                    message = ModelMessage(manifest.fleet, manifest.version, manifest.codec, signed.to_bytes(),
                                           bytes(payload))
                    write_atomic(self.model_path, message.to_envelope(self.kind).encode())
                write_atomic(self.state_path, state.to_json())
            except OSError as exc:  # a full SD card must not stop training; the next accept retries
                log.error("could not save %s: %s", self.state_path, exc)
                return
            self.saved = state
        log.info("trusted model version %d saved to %s", state.version, self.state_path)


# -- process memory (glibc malloc) ----------------------------------------------------------------------
# mallopt(3) parameter numbers from <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MALLOC_ARENA_MAX = 2                 # the paho thread and the training thread share two arenas
MALLOC_MMAP_THRESHOLD = 128 * 1024   # every weight-sized buffer (3 MB) gets its own mapping


@functools.lru_cache(maxsize=1)
def _glibc() -> object | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (musl and others: no such symbol, no tuning)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc() -> dict[str, int]:
    """Make glibc give freed memory back to the system at once; returns what was set.

    By default glibc raises its mmap threshold to the size of the biggest block freed so far
    (up to 32 MB) and gives every thread an arena of its own, so the weight-sized buffers of
    each round (weights, delta, codec scratch: 3 MB each) stay in the heap after they are
    freed, and the client's peak RSS grows by about 25 MB. A fixed 128 kB threshold maps each
    of them separately (unmapped when freed) and two arenas serve all threads; numpy's small
    objects are unaffected. A knob set in the environment (MALLOC_ARENA_MAX,
    MALLOC_MMAP_THRESHOLD_) wins over this default.
    """
    libc = _glibc()
    if libc is None:
        return {}
    done: dict[str, int] = {}
    for env, param, value in (("MALLOC_ARENA_MAX", _M_ARENA_MAX, MALLOC_ARENA_MAX),
                              ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)):
        if env not in os.environ and libc.mallopt(param, value) == 1:
            done[env] = value
    log.debug("glibc malloc tuned: %s", done)
    return done


def trim_heap() -> None:
    """Hand the free pages of glibc's heaps back to the system (after a round): malloc_trim(0)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# -- the state directory ------------------------------------------------------------------------------
def _probe_write(directory: Path) -> None:
    """Create, write, fsync, rename and remove a small file: everything a state file needs (OSError if not)."""
    probe = directory / f".write-probe-{os.getpid()}"
    write_atomic(probe, b"fedboard\n")
    probe.unlink()


def ensure_state_dir(path: Path) -> None:
    """Create the state directory (0700) and prove it takes a file; ValueError naming it if not.

    Without it the client fetched a bundle it could not cache (a traceback), or, with a cached
    bundle, checked in, took a cohort seat, trained, and then discarded the update it could not
    write to its outbox, every round.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _probe_write(path)
    except OSError as exc:
        raise ValueError(f"state directory {path} is not writable ({exc.strerror or exc}): the client keeps its "
                         "bundle, trust state and unsent updates there; give the service's user write access "
                         "(systemd: StateDirectory=fedboard) or set [device] state_dir to a writable path") from None


class StateDirProbe:
    """Whether the device can still persist an update: the directories take a file and have room.

    Asked before every check-in (`EligibilityGate`), at most once per `interval_s`: a device
    that cannot keep its update until the broker acknowledges it must not take a cohort seat.
    A change of answer is logged once (WARNING when it starts, INFO when it ends).
    """

    def __init__(self, directories: tuple[Path, ...], *, min_free_bytes: int, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directories = tuple(Path(d) for d in directories)
        self.min_free_bytes = min_free_bytes
        self.interval_s = interval_s
        self._clock = clock
        self._checked: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        now = self._clock()
        with self._lock:
            if self._checked is not None and now - self._checked[0] < self.interval_s:
                return self._checked[1]
            problem = self._problem()
            ok = problem is None
            if self._checked is None or self._checked[1] != ok:
                if ok:
                    if self._checked is not None:
                        log.info("state directory writable again: checking in for rounds")
                else:
                    log.warning("cannot persist updates (%s): not checking in for rounds until it can "
                                "(eligibility reason %s)", problem, "state_not_writable")
            self._checked = (now, ok)
            return ok

    def _problem(self) -> str | None:
        for directory in self.directories:
            try:
                _probe_write(directory)
                st = os.statvfs(directory)
            except OSError as exc:
                return f"{directory}: {exc.strerror or exc}"
            free = st.f_bavail * st.f_frsize
            if free < self.min_free_bytes:
                return f"{directory}: {free} bytes free, an update needs up to {self.min_free_bytes}"
        return None


# -- eligibility -------------------------------------------------------------------------------------
class EligibilityGate:
    """The `eligibility(training) -> (ok, reasons)` callable DeviceClient asks.

    During training it is asked before every step; the platform is then read at most once
    per `check_interval_s` (reads touch a dozen sysfs files).
    """

    def __init__(self, platform: Platform, policy: EligibilityPolicy, *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, storage: Callable[[], bool] | None = None) -> None:
        self.platform = platform
        self.policy = policy
        self.storage = storage  # `StateDirProbe`: asked before a check-in, not at every training step
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[bool, tuple[str, ...]]] | None = None

    def __call__(self, training: bool) -> tuple[bool, tuple[str, ...]]:
        now = self._clock()
        with self._lock:
            if training and self._cached is not None and now - self._cached[0] < self.check_interval_s:
                return self._cached[1]
        decision = self.policy.check(self.platform.read(), training=training)
        answer = (decision.eligible, tuple(r.value for r in decision.reasons))
        if not training and self.storage is not None and not self.storage():
            answer = (False, answer[1] + (EligibilityReason.STATE_NOT_WRITABLE.value,))
        with self._lock:
            self._cached = (now, answer) if training else None
        return answer


# -- bootstrap: the retained model and the bundle -------------------------------------------------------
class RetainedReader:
    """One short MQTT session that reads retained messages (the model, the bundle)."""

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self.settings = settings
        self._messages: dict[str, bytes] = {}
        self._cv = threading.Condition()
        self._refused: str | None = None
        self._connected = False
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=settings.paho_protocol())
        configure_client(self._client, settings)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def connect(self, timeout_s: float) -> None:
        s = self.settings
        where = f"{s.host}:{s.port}"
        try:
            self._client.connect(s.host, s.port, keepalive=s.keepalive_s)
        except ssl.SSLError as exc:
            raise BootstrapError(f"TLS handshake with {where} failed ({exc.reason or exc}): check [broker] tls_ca "
                                 f"and that the broker's certificate names {s.host}") from None
        except OSError as exc:
            raise BootstrapError(f"cannot reach the broker at {where}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._connected and self._refused is None and time.monotonic() < deadline:
                self._cv.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        if self._refused is not None:
            self.close()
            raise BootstrapError(f"the broker at {where} refused the connection: {self._refused} "
                                 f"(check [broker] username and password)")
        if not self._connected:
            self.close()
            raise BootstrapError(f"no answer from the broker at {where} within {timeout_s:.0f} s")

    def get(self, topic: str, timeout_s: float) -> bytes | None:
        """The retained message of `topic`, or None if none arrived within the timeout."""
        self._client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while topic not in self._messages and time.monotonic() < deadline:
                self._cv.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            data = self._messages.pop(topic, None)
        self._client.unsubscribe(topic)
        return data

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object = None) -> None:
        with self._cv:
            if getattr(reason_code, "is_failure", False):
                self._refused = str(reason_code)
            else:
                self._connected = True
            self._cv.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:  # an empty retained message means "cleared"
            with self._cv:
                self._messages[msg.topic] = bytes(msg.payload)
                self._cv.notify_all()


@dataclass(frozen=True)
class VerifiedModel:
    """The retained global model after its signature and hash were checked."""

    signed: SignedManifest
    payload: bytes
    manifest: ModelManifest

    @property
    def bundle_sha256(self) -> str:
        sha = self.manifest.extra.get("bundle_sha256")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise TrustError(Reason.BAD_FIELD, f"model v{self.manifest.version} does not name its training "
                                               "bundle (manifest extra.bundle_sha256): update the aggregator")
        return sha

    @property
    def bundle_file(self) -> tuple[str, int]:
        """(sha256, size) of the training bundle's BYTES, checked before the zip is opened."""
        sha, size = self.manifest.extra.get("bundle_file_sha256"), self.manifest.extra.get("bundle_file_bytes")
        if not isinstance(sha, str) or not _SHA256.match(sha) or isinstance(size, bool) or not isinstance(size, int) \
                or not 0 < size <= MAX_BUNDLE_BYTES:
            raise TrustError(Reason.BAD_FIELD, f"model v{self.manifest.version} does not sign its training bundle's "
                                               "bytes (manifest extra.bundle_file_sha256, bundle_file_bytes): "
                                               "update the aggregator")
        return sha, size


def verify_model_message(data: bytes, public_key: object, fleet: str, *, kind: Kind = Kind.MODEL) -> VerifiedModel:
    """Parse and verify a model message (signature, fleet, payload hash); ProtocolError if refused."""
    message = ModelMessage.from_envelope(decode_envelope(data, expect=kind))
    signed = SignedManifest.from_bytes(message.signed_manifest)
    manifest = ModelTrust(public_key, fleet).accept(signed, message.weights_payload)  # type: ignore[arg-type]
    if manifest.version != message.version:
        raise TrustError(Reason.WRONG_MODEL, f"manifest says v{manifest.version}, message says v{message.version}")
    return VerifiedModel(signed, message.weights_payload, manifest)


def decode_model_weights(model: VerifiedModel, dim: int) -> np.ndarray:
    """The float32 weights of a verified full model, checked against the manifest's checksum."""
    if model.manifest.base_version is not None:
        raise ValueError(f"model v{model.manifest.version} is a delta, not full weights")
    weights = parse_codec(model.manifest.codec).decode(model.payload, dim)
    digest = hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()
    if model.manifest.extra.get("weights_f32_sha256") not in (None, digest):
        raise ValueError("decoded weights do not match the manifest's checksum")
    return np.asarray(weights, dtype=np.float32)


def read_cached_bundle(path: Path) -> Bundle | None:
    if not path.exists():
        return None
    try:
        return read_bundle(path)
    except (BundleError, OSError) as exc:
        log.warning("cached bundle %s is unusable (%s); fetching it again", path, exc)
        return None


def bootstrap(config: ClientConfig, public_key: object) -> tuple[Bundle, VerifiedModel | None]:
    """The training bundle (verified) and the retained model if the broker gave it."""
    fleet, state_dir = config.device.fleet, config.device.state_dir
    topics = FleetTopics(fleet)
    timeout = config.broker.bootstrap_timeout_s
    cache_path = state_dir / BUNDLE_FILE
    cached = read_cached_bundle(cache_path)
    reader = RetainedReader(config.mqtt_settings(), config.device.id)
    try:
        reader.connect(timeout)
    except BootstrapError as exc:
        if cached is None:
            raise BootstrapError(f"no training bundle yet and {exc}") from None
        log.warning("%s; starting with the cached bundle %s, the client keeps retrying", exc, cached.model_id)
        return cached, None
    try:
        data = reader.get(topics.model, timeout)
        if data is None:
            if cached is not None:
                log.warning("no retained model on %s within %.0f s; starting with the cached bundle %s",
                            topics.model, timeout, cached.model_id)
                return cached, None
            raise BootstrapError(f"no retained global model on {topics.model} within {timeout:.0f} s: is the "
                                 f"aggregator of fleet {fleet!r} running and publishing to this broker?")
        try:
            model = verify_model_message(data, public_key, fleet)
            wanted = model.bundle_sha256
            file_sha, file_size = model.bundle_file
        except ProtocolError as exc:
            raise BootstrapError(f"refused the retained model on {topics.model}: {exc} (is "
                                 f"{config.trust.aggregator_public_key} the aggregator's public key?)") from None
        if cached is not None and cached.sha256 == wanted:
            return cached, model
        data = reader.get(topics.bundle, timeout)
        if data is None:
            raise BootstrapError(f"no retained training bundle on {topics.bundle} within {timeout:.0f} s")
        try:
            envelope = decode_envelope(data, expect=Kind.BUNDLE, max_payload=DEFAULT_MAX_PAYLOAD)
            if len(envelope.payload) != file_size:  # the signed size and digest come before any unzipping
                raise BundleError(f"{len(envelope.payload)} bytes, the signed model names {file_size}")
            bundle = Bundle.from_bytes(envelope.payload, expected_sha256=file_sha)
        except (ProtocolError, BundleError) as exc:
            raise BootstrapError(f"the retained bundle on {topics.bundle} is unusable: {exc}") from None
        if bundle.sha256 != wanted:
            raise BootstrapError(f"the retained bundle {bundle.sha256[:12]} is not the one the signed model names "
                                 f"({wanted[:12]}): refusing it")
        write_atomic(cache_path, envelope.payload, 0o600)  # the signed bytes themselves
        log.info("training bundle %s (%d parameters) fetched and cached in %s", bundle.model_id,
                 bundle.param_count, cache_path)
        return bundle, model
    finally:
        reader.close()


def load_saved_model(config: ClientConfig) -> tuple[Bundle, np.ndarray | None]:
    """The cached bundle and the last accepted global weights (None if none), for suggestions."""
    state_dir = config.device.state_dir
    bundle = read_cached_bundle(state_dir / BUNDLE_FILE)
    if bundle is None:
        raise FileNotFoundError(f"no training bundle in {state_dir}: run `fedboard client --config "
                                f"{config.path}` once so it fetches one")
    path = state_dir / MODEL_FILE
    if not path.exists():
        return bundle, None
    model = verify_model_message(path.read_bytes(), load_public_key(config.trust.aggregator_public_key),
                                 config.device.fleet)
    if model.bundle_sha256 != bundle.sha256:
        log.warning("the saved global model belongs to another bundle: using the bundle's initial weights")
        return bundle, None
    return bundle, decode_model_weights(model, bundle.param_count)


# -- the app ---------------------------------------------------------------------------------------------
class ClientApp:
    """The device process: bootstrap, then the round protocol until stopped.

    `run()` blocks until SIGTERM or SIGINT; `start()`/`stop()` let a test or an embedding
    program drive it from another thread. `platform` replaces the Linux sensors (tests).
    """

    serving_check_s = 60.0  # how often the network is re-read for the serving model (edge_client/serving.py)

    def __init__(self, config: ClientConfig, *, platform: Platform | None = None) -> None:
        config.check_files()
        tune_malloc()
        self.config = config
        self.state_dir = config.device.state_dir
        ensure_state_dir(self.state_dir)
        self.public_key = load_public_key(config.trust.aggregator_public_key)
        p = config.platform
        self.platform: Platform = platform or LinuxPlatform(
            idle_after_s=p.idle_after_s, metered_interfaces=p.metered_interfaces,
            unmetered_interfaces=p.unmetered_interfaces)
        self.gate = EligibilityGate(self.platform, config.policy)
        self.device: DeviceClient | None = None
        self.bundle: Bundle | None = None
        self.trust: PersistentTrust | None = None
        self.store: TextStore | None = None
        self.serving: ServingFollower | None = None
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()
        self.exit_code = 0
        self._last_ineligible: tuple[str, ...] = ()

    def start(self) -> None:
        cfg = self.config
        stores = open_device_stores(cfg, device_keyring(cfg))  # a wrong or missing store key stops here, unwritten
        try:
            self.bundle, retained = bootstrap(cfg, self.public_key)
        except BaseException:
            stores.close()
            raise
        self.trust = PersistentTrust(self.public_key, cfg.device.fleet, self.bundle.model_id, self.state_dir)
        if retained is not None and retained.manifest.model_id == self.bundle.model_id:
            try:  # seeds the version and hash, so the unchanged retained model is taken again later
                self.trust.accept(retained.signed, retained.payload)
            except TrustError:
                pass  # logged by ModelTrust; the device waits for a newer model
        # an uncompressed float32 update must fit, or the round's work would be lost
        self.gate.storage = StateDirProbe((self.state_dir, self.state_dir / "outbox"),
                                          min_free_bytes=4 * self.bundle.param_count + 2**20)
        store = stores.text
        windows = StoreWindows(store, Vocabulary.from_json(self.bundle.vocab_json), self.bundle.config.seq_len)
        # The interpreter lives only while a round trains: between rounds the client holds no
        # arena, and delta, encoding and publishing do not stack on the training peak.
        pool = InterpreterPool(self.bundle, size=1, num_threads=cfg.training.threads, keep_idle=False,
                               after_release=trim_heap)
        device = DeviceClient(
            DeviceConfig(fleet=cfg.device.fleet, device_id=cfg.device.id, mqtt=cfg.mqtt_settings(),
                         keep_model=True, platform_name="linux", local_dp=cfg.privacy.local_dp),
            pool, windows, self.trust, residuals=stores.residuals,
            outbox=stores.outbox, eligibility=self.gate, on_event=self._on_event,
        )
        from edge_client.serving import ServingFollower, serving_trust  # it imports this module

        serving = ServingFollower(device, serving_trust(self.public_key, cfg.device.fleet, self.bundle.model_id,
                                                        self.state_dir),
                                  self.bundle, self.platform, cfg.policy, interval_s=self.serving_check_s)
        with self._stop_lock:
            self.store, self.device, self.serving = store, device, serving
        device.start()
        serving.start()
        log.info("device %s of fleet %s running with model %s; %d texts in %s", cfg.device.id, cfg.device.fleet,
                 self.bundle.model_id, store.count(), cfg.device.data)
        if self._stop.is_set():  # stop() was called while the bootstrap ran
            self.stop()

    def stop(self) -> None:
        """Stop cleanly: training stops at its next step, nothing half-sent, status offline."""
        self._stop.set()
        with self._stop_lock:
            device, self.device = self.device, None
            store, self.store = self.store, None
            serving, self.serving = self.serving, None
        if serving is not None:
            serving.stop()
        if device is not None:
            device.stop()
        if store is not None:
            store.close()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or `stop()` from another thread); returns the exit code."""
        handlers: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            while not self._stop.wait(3600):
                pass
        finally:
            self.stop()
            for sig, previous in handlers.items():
                signal.signal(sig, previous)  # type: ignore[arg-type]
        log.info("device %s stopped", self.config.device.id)
        return self.exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def _on_event(self, name: str, fields: dict) -> None:
        if name == "model_mismatch":
            # The fleet moved to another training bundle: exit non-zero so the service manager
            # restarts the client, whose bootstrap then fetches the new bundle.
            log.warning("the fleet now trains model %s, this client runs %s: restarting to fetch its bundle",
                        fields.get("model_id"), self.bundle.model_id if self.bundle else "?")
            self.exit_code = EXIT_RESTART
            self._stop.set()
            return
        if name == "ineligible":
            reasons = tuple(fields.get("reasons", ()))
            if reasons != self._last_ineligible:
                log.info("not eligible for rounds: %s", ", ".join(reasons))
                self._last_ineligible = reasons
            return
        self._last_ineligible = ()
        details = " ".join(f"{k}={v}" for k, v in fields.items() if k != "device")
        log.info("round event %s: %s", name, details)
