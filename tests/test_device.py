"""DeviceClient through a real broker and a real aggregator: eligibility, outbox, model trust.

Each test runs the real round protocol (plan -> check-in -> assignment -> model -> training ->
update -> ack) with a tiny model, and then does to the device what happens to real ones: the
charger is pulled mid-training, the phone is on cellular, the broker dies right after
training and the client restarts, a broker-level attacker publishes forged, unsigned,
tampered and replayed models. Eligibility is the production chain: a StaticPlatform read by
the app's EligibilityGate under the default EligibilityPolicy.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.publisher import build_model_message
from aggregator.server import Aggregator, AggregatorConfig
from device_sim.broker import EmbeddedBroker
from device_sim.mosquitto import MosquittoBroker, find_mosquitto, free_port
from edge_client.app import EligibilityGate
from edge_client.device import DeviceClient, DeviceConfig
from edge_client.eligibility import EligibilityPolicy
from edge_client.outbox import Outbox
from edge_client.platform import NetworkType, StaticPlatform
from edge_client.residuals import ResidualStore
from edge_client.text_windows import StoreWindows
from edge_client.textstore import TextStore
from edge_client.trainer import InterpreterPool
from models.bundle_cache import get_or_export_bundle
from models.config import ModelConfig
from models.tokenizer import Vocabulary, build_vocabulary
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.messages import Assignment, RoundPlan
from protocol.model_message import ModelMessage
from protocol.signing import ModelManifest, ModelTrust, generate_keypair, sha256_hex
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings

# The same texts and model as tests/test_app.py, so the session exports the tiny bundle once.
KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]
DEVICE = "dev-1"


# -- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(cache_dir):
    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


def _keypair():
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    private_pem, public_pem = generate_keypair()
    return load_pem_private_key(private_pem, None), load_pem_public_key(public_pem)


@pytest.fixture(scope="module")
def keys():
    return _keypair()


@pytest.fixture(scope="module")
def amqtt():
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def stack():
    """Teardown in reverse order of setup: devices, then aggregators, then brokers."""
    with contextlib.ExitStack() as s:
        yield s


def require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")


def settings_for(port: int, mqtt_version: int) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, mqtt_version=mqtt_version, keepalive_s=10,
                        reconnect_min_s=0.2, reconnect_max_s=1.0)


def start_aggregator(stack, bundle, settings, private_key, fleet, **overrides) -> Aggregator:
    options = dict(fleet=fleet, clients_per_round=1, expected_checkins=1, checkin_window_s=20.0,
                   report_deadline_s=30.0, codec="q8", local_epochs=1, client_lr=1.0)
    options.update(overrides)
    agg = Aggregator(AggregatorConfig(**options), bundle, settings, private_key, client_id=f"aggregator-{fleet}")
    agg.start()
    stack.callback(agg.stop)
    return agg


def run_round_in_background(stack, agg: Aggregator) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")
    stack.callback(pool.shutdown, wait=True)
    return pool.submit(agg.run_round)


class Events:
    """The device's on_event stream, waitable."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []
        self._cv = threading.Condition()

    def __call__(self, name: str, fields: dict) -> None:
        with self._cv:
            self.seen.append((name, fields))
            self._cv.notify_all()

    def named(self, name: str) -> list[dict]:
        with self._cv:
            return [fields for n, fields in self.seen if n == name]

    def wait(self, name: str, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not any(n == name for n, _ in self.seen):
                left = deadline - time.monotonic()
                assert left > 0, f"no {name!r} event within {timeout_s} s; saw {[n for n, _ in self.seen]}"
                self._cv.wait(left)
            return next(fields for n, fields in self.seen if n == name)


def wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def start_device(stack, bundle, settings, public_key, fleet, state_dir: Path, *, texts=KEYBOARD * 5,
                 eligibility=None, outbox=None, events=None, wait_ready=True) -> DeviceClient:
    """A DeviceClient on a real text store in `state_dir`, started; stopped by `stack`."""
    store = TextStore(state_dir / "texts.db")
    if store.count() == 0:
        store.add_many(texts)
    windows = StoreWindows(store, Vocabulary.from_json(bundle.vocab_json), bundle.config.seq_len)
    device = DeviceClient(DeviceConfig(fleet=fleet, device_id=DEVICE, mqtt=settings), InterpreterPool(bundle),
                          windows, ModelTrust(public_key, fleet, bundle.model_id),
                          residuals=ResidualStore(state_dir), outbox=outbox, eligibility=eligibility, on_event=events)
    stack.callback(store.close)
    stack.callback(device.stop)
    device.start()
    if wait_ready:
        assert device.ready.wait(20), "device did not connect and subscribe within 20 s"
    return device


def publish(settings: MqttSettings, topic: str, data: bytes, *, retain: bool = False) -> None:
    """What anyone with write access to the broker can do (an attacker, or the aggregator's stand-in)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=settings.paho_protocol())
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        client.publish(topic, data, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_until_aggregator_listens(agg: Aggregator, settings: MqttSettings, fleet: str, timeout_s: float = 30.0) -> None:
    """After a broker restart: publish `online` for a probe device until the aggregator has seen it.

    The aggregator subscribes to status and update topics in one SUBSCRIBE, so once it counts
    the probe it also receives updates again.
    """
    topic = FleetTopics(fleet).status("probe")
    online = Envelope(Kind.STATUS, fleet, "probe", meta={"state": "online"}).encode()
    before = agg.online_devices
    deadline = time.monotonic() + timeout_s
    while agg.online_devices <= before:
        assert time.monotonic() < deadline, "the aggregator did not come back after the broker restart"
        with contextlib.suppress(OSError):
            publish(settings, topic, online)
        time.sleep(0.3)


# -- eligibility ----------------------------------------------------------------------------------------
def test_unplugging_mid_training_stops_training_and_reports_nothing(stack, bundle, keys, amqtt, tmp_path):
    """MQTT 3.1.1 through the embedded amqtt broker."""
    private_key, public_key = keys
    settings = settings_for(amqtt.address.port, 3)
    # a long round: many windows and many epochs, so the unplug lands in the middle of it
    agg = start_aggregator(stack, bundle, settings, private_key, "unplug", local_epochs=1000, report_deadline_s=6.0)
    phone = StaticPlatform(battery_percent=80.0, charging=True, network=NetworkType.WIFI)
    gate = EligibilityGate(phone, EligibilityPolicy(), check_interval_s=0.0)
    training = threading.Event()

    def eligibility(during_training: bool):
        if during_training:
            training.set()
        return gate(during_training)

    def unplug_once_training() -> None:
        if training.wait(30):
            time.sleep(0.3)
            phone.set(charging=False)

    events = Events()
    outbox = Outbox(tmp_path / "outbox")
    device = start_device(stack, bundle, settings, public_key, "unplug", tmp_path, texts=KEYBOARD * 100,
                          eligibility=eligibility, outbox=outbox, events=events)
    threading.Thread(target=unplug_once_training, daemon=True).start()
    result = agg.run_round()

    abandoned = events.wait("abandoned", 10)
    assert abandoned["reasons"] == ["not_charging"], abandoned
    steps_per_epoch = -(-len(KEYBOARD * 100) // bundle.config.batch_size)
    assert 0 < device.stats.train_steps < 1000 * steps_per_epoch  # it trained, and stopped early
    assert device.stats.rounds_abandoned == 1 and device.stats.rounds_trained == 0
    assert device.stats.updates_sent == 0 and device.stats.uplink_bytes == 0
    assert len(outbox) == 0  # not even kept for later
    assert result.cohort == 1 and result.participants == 0 and not result.committed
    assert result.uplink_bytes == 0 and agg.version == 0


def test_a_metered_network_blocks_check_in(stack, bundle, keys, amqtt, tmp_path):
    private_key, public_key = keys
    settings = settings_for(amqtt.address.port, 3)
    agg = start_aggregator(stack, bundle, settings, private_key, "metered", checkin_window_s=2.0)
    phone = StaticPlatform(network=NetworkType.CELLULAR, metered=True)
    events = Events()
    device = start_device(stack, bundle, settings, public_key, "metered", tmp_path,
                          eligibility=EligibilityGate(phone, EligibilityPolicy()), events=events)

    result = agg.run_round()
    assert result.checkins == 0 and result.cohort == 0 and not result.committed
    assert device.stats.checkins == 0 and device.stats.train_steps == 0
    assert events.named("ineligible") == [{"device": DEVICE, "round": 1, "reasons": ["metered_network"]}]

    phone.set(network=NetworkType.WIFI, metered=False)  # home again: the same device takes part
    result = agg.run_round()
    assert result.checkins == 1 and result.participants == 1 and result.committed
    assert device.stats.checkins == 1 and device.stats.rounds_trained == 1


# -- the offline outbox across a client restart ------------------------------------------------------------
class OutboxThatLosesTheBroker(Outbox):
    """The real outbox; `on_put` runs once the update is on disk, before it is published."""

    def __init__(self, directory: Path, on_put) -> None:
        super().__init__(directory)
        self.on_put = on_put

    def put(self, topic: str, round_id: int, deadline_unix: float, data: bytes) -> str:
        item = super().put(topic, round_id, deadline_unix, data)
        self.on_put()
        return item


def _train_while_the_broker_dies(stack, bundle, keys, tmp_path, fleet: str, report_deadline_s: float):
    """Round 1 runs; the broker is SIGKILLed right after training; the client then stops.

    Returns the aggregator, its round (a Future), the port, and the killed broker's settings.
    """
    require_mosquitto()
    private_key, public_key = keys
    port = free_port()
    broker = MosquittoBroker(port=port)
    stack.callback(broker.stop)
    broker.start()
    settings = settings_for(port, 5)
    agg = start_aggregator(stack, bundle, MqttSettings(host="127.0.0.1", port=port, keepalive_s=10,
                                                       reconnect_min_s=0.5, reconnect_max_s=1.0),
                           private_key, fleet, report_deadline_s=report_deadline_s)
    holder: list[DeviceClient] = []

    def lose_the_broker() -> None:
        broker.kill()
        wait_for(lambda: not holder[0].ready.is_set(), "the device to notice the dead broker", 10)

    with contextlib.ExitStack() as first_run:
        events = Events()
        holder.append(start_device(first_run, bundle, settings, public_key, fleet, tmp_path, events=events,
                                   outbox=OutboxThatLosesTheBroker(tmp_path / "outbox", lose_the_broker)))
        round_future = run_round_in_background(stack, agg)
        events.wait("sent", 30)  # training done, publish attempted while the broker is gone
        device = holder[0]
        assert device.stats.updates_accepted == 0
    # the client process is gone (stopped); what it leaves is the state directory
    pending = Outbox(tmp_path / "outbox").pending()
    assert [item.round_id for item in pending] == [1] and pending[0].topic == FleetTopics(fleet).update(DEVICE)
    return agg, round_future, port, settings, pending[0]


@pytest.mark.mosquitto
def test_an_update_in_the_outbox_is_sent_after_a_restart_and_counted_once(stack, bundle, keys, tmp_path):
    _, public_key = keys
    agg, round_future, port, settings, item = _train_while_the_broker_dies(stack, bundle, keys, tmp_path,
                                                                           "outbox", report_deadline_s=40.0)
    assert not round_future.done()  # the round is still open, waiting for the report
    broker = MosquittoBroker(port=port)
    stack.callback(broker.stop)
    broker.start()
    wait_until_aggregator_listens(agg, settings, "outbox")

    # a NEW client on the same state directory: it re-sends from the outbox on connect
    device = start_device(stack, bundle, settings, public_key, "outbox", tmp_path, outbox=Outbox(tmp_path / "outbox"))
    wait_for(lambda: device.stats.updates_accepted == 1, "the re-sent update to be acknowledged")
    result = round_future.result(timeout=30)
    assert result.committed and result.participants == 1 and result.duplicates == 0 and not result.rejected
    assert result.uplink_bytes == len(item.data)  # exactly the bytes trained before the restart
    assert len(Outbox(tmp_path / "outbox")) == 0  # removed once the broker acknowledged it
    assert device.stats.rounds_trained == 0  # the new client did not train again: it re-sent


@pytest.mark.mosquitto
def test_an_update_whose_round_closed_is_dropped_with_a_log_line(stack, bundle, keys, tmp_path, caplog):
    _, public_key = keys
    caplog.set_level(logging.INFO)
    agg, round_future, port, settings, item = _train_while_the_broker_dies(stack, bundle, keys, tmp_path,
                                                                           "expired", report_deadline_s=4.0)
    result = round_future.result(timeout=30)  # the deadline passes while the broker is down
    assert not result.committed and result.participants == 0
    wait_for(lambda: time.time() > item.deadline_unix, "the outbox item's deadline", 10)
    broker = MosquittoBroker(port=port)
    stack.callback(broker.stop)
    broker.start()
    wait_until_aggregator_listens(agg, settings, "expired")

    device = start_device(stack, bundle, settings, public_key, "expired", tmp_path, outbox=Outbox(tmp_path / "outbox"))
    wait_for(lambda: len(Outbox(tmp_path / "outbox")) == 0, "the expired update to be dropped", 10)
    # the file goes first, the log line right after it (another thread): wait for the line too
    wait_for(lambda: f"dropped {item.id}: round 1 deadline passed before it could be sent" in caplog.text,
             "the drop to be logged", 5)
    time.sleep(0.5)  # anything sent would have reached the listening aggregator by now
    assert not agg.rejections and device.stats.updates_accepted == device.stats.updates_rejected == 0


# -- model trust through the real message path ---------------------------------------------------------------
def _unsigned(bundle, fleet: str) -> bytes:
    payload = np.ascontiguousarray(bundle.initial_weights, dtype="<f4").tobytes()
    manifest = ModelManifest(fleet=fleet, model_id=bundle.model_id, version=0, weights_sha256=sha256_hex(payload),
                             codec="f32", payload_len=len(payload), extra={"bundle_sha256": bundle.sha256})
    return ModelMessage(fleet, 0, "f32", manifest.canonical_bytes(), payload).to_envelope(Kind.MODEL).encode()


def _tampered(genuine: bytes) -> bytes:
    message = ModelMessage.from_envelope(decode_envelope(genuine))
    weights = bytearray(message.weights_payload)
    weights[100] ^= 0x40
    return ModelMessage(message.fleet, message.version, message.codec, message.signed_manifest,
                        bytes(weights)).to_envelope(Kind.MODEL).encode()


@pytest.mark.mosquitto
def test_forged_unsigned_tampered_and_replayed_models_are_refused(stack, bundle, keys, mosquitto, tmp_path, caplog):
    private_key, public_key = keys
    caplog.set_level(logging.INFO)
    fleet, topics = "trust", FleetTopics("trust")
    settings = settings_for(mosquitto.port, 5)
    agg = start_aggregator(stack, bundle, settings, private_key, fleet)
    genuine_v0 = agg.model.envelope_bytes
    attacker_key, _ = _keypair()
    forged = build_model_message(fleet=fleet, model_id=bundle.model_id, version=0, weights=bundle.initial_weights,
                                 codec_spec="f32", private_key=attacker_key,
                                 extra={"bundle_sha256": bundle.sha256}).envelope_bytes
    # the attacker replaces the retained model before the round: the selected device fetches it
    publish(settings, topics.model, forged, retain=True)
    device = start_device(stack, bundle, settings, public_key, fleet, tmp_path)
    round_1 = run_round_in_background(stack, agg)
    wait_for(lambda: device.stats.models_refused == 1, "the forged model to be refused")
    assert "refused global model v0: bad_signature" in caplog.text
    publish(settings, topics.model, _unsigned(bundle, fleet))
    wait_for(lambda: device.stats.models_refused == 2, "the unsigned model to be refused")
    assert "bad_magic: not a signed manifest (unsigned model" in caplog.text
    publish(settings, topics.model, _tampered(genuine_v0))
    wait_for(lambda: device.stats.models_refused == 3, "the tampered model to be refused")
    assert "bad_hash: payload sha256 differs from the signed manifest" in caplog.text
    publish(settings, topics.model, os.urandom(64))
    wait_for(lambda: device.stats.models_refused == 4, "the garbage message to be refused")
    assert f"refused message on {topics.model}" in caplog.text
    assert device.stats.train_steps == 0 and device.stats.rounds_trained == 0 and not round_1.done()

    publish(settings, topics.model, genuine_v0, retain=True)  # the real one: the device trains on it
    assert round_1.result(timeout=30).participants == 1
    assert agg.run_round().participants == 1  # round 2 trains on v1 (the aggregator's retained model)
    assert device.trust.last_version == 1 and device.stats.rounds_trained == 2
    steps, refused = device.stats.train_steps, device.stats.models_refused

    # Replay: the attacker republishes the signed v0 and a plan and an assignment that ask for it.
    publish(settings, topics.model, genuine_v0, retain=True)
    plan = RoundPlan(round_id=agg.round_id + 1, base_version=0, model_id=bundle.model_id, codec="q8",
                     target_count=1, checkin_window_s=20.0, report_deadline_s=30.0)
    publish(settings, topics.round, plan.to_envelope(fleet).encode(), retain=True)
    # a plan on a model older than the one it trusts is sat out, said once (issue 14): no check-in
    wait_for(lambda: "ignoring round %d and every later plan built on a model older than v1" % plan.round_id
             in caplog.text, "the device to sit the replayed plan out")
    assert device.stats.checkins == 2
    publish(settings, topics.assign(DEVICE), Assignment(plan.round_id, True).to_envelope(fleet, DEVICE).encode())
    wait_for(lambda: device.stats.models_refused == refused + 1, "the replayed older model to be refused")
    assert "refused global model v0: old_version: version 0 is not newer than 1" in caplog.text
    time.sleep(0.3)
    assert device.stats.train_steps == steps and device.stats.rounds_trained == 2 and device.trust.last_version == 1



# -- pace steering ------------------------------------------------------------------------------------------
@pytest.mark.mosquitto
def test_a_steered_away_device_stops_hearing_plans_until_its_retry_runs_out(stack, bundle, mosquitto, keys, tmp_path):
    """Told "come back in 1.5 s", the device unsubscribes from round plans: a plan published
    meanwhile never reaches it (subscribed, it would have checked in to it once the retry ran
    out). At the wake-up it subscribes again and the broker hands it the retained plan, which it
    answers unless pace steering expects it back for a later round (`back_for_round`). The test
    plays the aggregator's part on the broker."""
    _, public_key = keys
    fleet, topics = "steer", FleetTopics("steer")
    settings = settings_for(mosquitto.port, 5)
    events = Events()
    device = start_device(stack, bundle, settings, public_key, fleet, tmp_path, events=events)

    def plan(round_id: int) -> bytes:
        return RoundPlan(round_id=round_id, base_version=0, model_id=bundle.model_id, codec="q8", target_count=1,
                         checkin_window_s=30.0, report_deadline_s=60.0).to_envelope(fleet).encode()

    def checked_in_rounds() -> list[int]:
        return [fields["round"] for fields in events.named("checkin")]

    def steer_away(round_id: int, back_for_round: int = 0) -> None:
        wait_for(lambda: device.hears_plans, "the device to hear plans")
        answer = Assignment(round_id, False, retry_after_s=1.5, reason="not_selected", back_for_round=back_for_round)
        publish(settings, topics.assign(DEVICE), answer.to_envelope(fleet, DEVICE).encode())
        wait_for(lambda: not device.hears_plans, "the device to stop hearing plans")

    publish(settings, topics.round, plan(1), retain=True)
    wait_for(lambda: checked_in_rounds() == [1], "the check-in to round 1")
    steer_away(1)
    publish(settings, topics.round, plan(2))  # live only, while it is away: it never hears it
    wait_for(lambda: device.hears_plans, "the device to listen again", timeout_s=10)
    time.sleep(1.5)  # past the retry: a device that had heard plan 2 would have checked in by now
    assert checked_in_rounds() == [1] and device._plan.round_id == 1

    publish(settings, topics.round, plan(3), retain=True)
    wait_for(lambda: checked_in_rounds() == [1, 3], "the check-in to round 3")
    steer_away(3)
    publish(settings, topics.round, plan(4), retain=True)  # while it is away, retained
    wait_for(lambda: checked_in_rounds() == [1, 3, 4], "the check-in to the retained round 4 after the wake-up")

    steer_away(4, back_for_round=6)  # expected back for round 6: the retained plan 5 is not for it
    publish(settings, topics.round, plan(5), retain=True)
    wait_for(lambda: device.hears_plans, "the device to listen again", timeout_s=10)
    wait_for(lambda: device._plan.round_id == 5, "the retained plan 5 to reach the device")
    assert not device.will_answer(5) and device.will_answer(6)
    time.sleep(0.3)
    assert checked_in_rounds() == [1, 3, 4]
    publish(settings, topics.round, plan(6), retain=True)
    wait_for(lambda: checked_in_rounds() == [1, 3, 4, 6], "the check-in to round 6")
    assert device.stats.checkins == 4


# -- local DP ---------------------------------------------------------------------------------------------
def test_local_dp_noises_the_update_before_it_leaves_the_device(stack, bundle, keys, amqtt, tmp_path):
    """What reaches the aggregator is the clipped update plus N(0, sigma^2) per coordinate: with
    FedAvg (server lr 1) and one device, the model moves by exactly what the device sent."""
    from edge_client.local_dp import LocalDPConfig

    private_key, public_key = keys
    settings = settings_for(amqtt.address.port, 3)
    agg = start_aggregator(stack, bundle, settings, private_key, "ldp", codec="f32", server_optimizer="fedavg",
                           server_lr=1.0)
    before = agg.weights.copy()
    cfg = LocalDPConfig(clip=0.01, noise_multiplier=5.0)  # sigma 0.05 per coordinate
    store = TextStore(tmp_path / "texts.db")
    store.add_many(KEYBOARD * 5)
    stack.callback(store.close)
    windows = StoreWindows(store, Vocabulary.from_json(bundle.vocab_json), bundle.config.seq_len)
    device = DeviceClient(DeviceConfig(fleet="ldp", device_id=DEVICE, mqtt=settings, local_dp=cfg),
                          InterpreterPool(bundle), windows, ModelTrust(public_key, "ldp", bundle.model_id),
                          residuals=ResidualStore(tmp_path))
    stack.callback(device.stop)
    device.start()
    assert device.ready.wait(20)

    result = agg.run_round()
    assert result.committed and device.stats.local_dp_releases == 1
    moved = agg.weights - before
    expected_norm = cfg.sigma * np.sqrt(moved.size)  # the noise; the clipped signal adds at most 0.01
    assert abs(np.linalg.norm(moved) - expected_norm) < 0.05 * expected_norm + cfg.clip
    assert abs(float(moved.std()) - cfg.sigma) < 0.05 * cfg.sigma
