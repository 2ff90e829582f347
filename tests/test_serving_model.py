"""A device serves suggestions from the newest model it may fetch, not only the one it trained on.

Real Mosquitto (TLS, passwords), the aggregator publishing the int8 inference model every
version, a real `fedboard client` process that never trains (its policy keeps it out of every
round) and `fedboard predict --config`: after v2 is published the idle device serves v2, and a
forged or replayed inference model changes nothing. A client on a metered network fetches no
model only to serve it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import CallbackAPIVersion

from aggregator.publisher import build_inference_message, bundle_extra
from edge_client.app import ClientApp, load_trust_state
from edge_client.client_config import load_client_config
from edge_client.platform import StaticPlatform
from edge_client.serving import SERVING_FILE, SERVING_TRUST_FILE, load_serving_model
from edge_client.textstore import TextStore
from protocol.envelope import Kind, decode_envelope
from protocol.model_message import ModelMessage
from protocol.signing import SignedManifest, generate_keypair
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings, configure_client
from tests.test_app import KEYBOARD, PASSWORDS, bundle, client_toml, device_platform, keys, secure_broker  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FEDBOARD = [sys.executable, "-m", "device_sim.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def aggregator_with_int8(bundle, broker, private_key, fleet: str):
    from aggregator.server import Aggregator, AggregatorConfig

    settings = MqttSettings(host="127.0.0.1", port=broker.tls_port, username="aggregator",
                            password=PASSWORDS["aggregator"], tls_ca=str(broker.ca), keepalive_s=10)
    config = AggregatorConfig(fleet=fleet, clients_per_round=1, expected_checkins=1, checkin_window_s=30.0,
                              report_deadline_s=60.0, codec="q8", downlink="f32", local_epochs=1, int8_every=1)
    agg = Aggregator(config, bundle, settings, private_key, client_id=f"aggregator-{fleet}")
    agg.start()
    return agg


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def serving_version(state_dir: Path, fleet: str) -> int | None:
    state = load_trust_state(state_dir / SERVING_TRUST_FILE, fleet)
    return None if state is None else state.version


def publish_retained(broker, topic: str, data: bytes) -> None:
    """Publish as the aggregator's broker user would (a compromised broker or a man in the middle)."""
    settings = MqttSettings(host="127.0.0.1", port=broker.tls_port, username="aggregator",
                            password=PASSWORDS["aggregator"], tls_ca=str(broker.ca), keepalive_s=10)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{time.monotonic_ns()}")
    configure_client(client, settings)
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        client.publish(topic, data, qos=1, retain=True).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def predict(config_path: Path) -> str:
    proc = subprocess.run([*FEDBOARD, "predict", "i am going to", "--config", str(config_path)],
                          cwd=config_path.parent, capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, f"predict failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.mosquitto
def test_a_device_left_out_of_rounds_serves_the_newest_int8_model_and_refuses_forged_ones(
        tmp_path, bundle, secure_broker, keys):
    private_key, public_path = keys
    fleet = "serve"
    topics = FleetTopics(fleet)
    agg = aggregator_with_int8(bundle, secure_broker, private_key, fleet)
    trainer_app = idle = None
    try:
        # pi-1 trains (in process); round 1 makes v1 and its int8 model
        (tmp_path / "pi-1").mkdir()
        trainer = load_client_config(client_toml(tmp_path / "pi-1", secure_broker, public_path, fleet=fleet))
        with TextStore(trainer.device.data) as store:
            store.add_many(KEYBOARD * 5)
        trainer_app = ClientApp(trainer, platform=device_platform())
        trainer_app.start()
        assert agg.run_round().version == 1

        # pi-2 joins after v1 as a real `fedboard client` whose policy keeps it out of every round
        # (low_memory) while its network lets it fetch the suggestion model
        home = tmp_path / "pi-2"
        home.mkdir()
        path = client_toml(home, secure_broker, public_path, device="pi-2", fleet=fleet)
        path.write_text(path.read_text().replace("min_free_memory_mb = 0", "min_free_memory_mb = 100000000"))
        log = home / "client.log"
        with open(log, "w") as out:
            idle = subprocess.Popen([*FEDBOARD, "client", "--config", str(path)], cwd=home, stdout=out,
                                    stderr=subprocess.STDOUT, env=ENV)
        state = home / "state"
        wait_for(lambda: serving_version(state, fleet) == 1, 180, "pi-2 to keep the int8 model v1", idle, log)

        # round 2: only pi-1 trains; pi-2 keeps model.fbm v1 yet must serve v2
        result = agg.run_round()
        assert result.committed and result.version == 2 and result.participants == 1, result
        wait_for(lambda: serving_version(state, fleet) == 2, 180, "pi-2 to keep the int8 model v2", idle, log)
        assert "low_memory" in log.read_text()  # it was never in a round...
        config = load_client_config(path)
        assert load_trust_state(state / "trust.json", fleet).version == 1  # ...its training model is v1
        out = predict(path)
        print(out)
        assert "int8 model v2" in out and "'i am going to' -> " in out, out

        # a forged int8 model (another key, a newer version): refused, logged, nothing replaced
        genuine = decode_envelope((state / SERVING_FILE).read_bytes(), expect=Kind.INFERENCE_MODEL)
        message = ModelMessage.from_envelope(genuine)
        tflite = message.weights_payload
        other_private, _ = generate_keypair()
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        weights = agg.weights.copy()
        forged = build_inference_message(fleet=fleet, model_id=bundle.model_id, version=3, tflite=tflite,
                                         weights=weights, private_key=load_pem_private_key(other_private, None),
                                         extra=bundle_extra(bundle))
        publish_retained(secure_broker, topics.model_int8, forged)
        wait_for(lambda: "refused the inference model" in log.read_text(), 60, "the forged model's refusal", idle, log)
        assert "bad_signature" in log.read_text()
        # a genuine but older one (the aggregator's key, version 1): a replay, refused too
        stale = build_inference_message(fleet=fleet, model_id=bundle.model_id, version=1, tflite=tflite,
                                        weights=weights, private_key=private_key, extra=bundle_extra(bundle))
        publish_retained(secure_broker, topics.model_int8, stale)
        wait_for(lambda: log.read_text().count("refused the inference model") >= 2, 60, "the replay's refusal",
                 idle, log)
        assert "old_version" in log.read_text()
        assert serving_version(state, fleet) == 2
        served = load_serving_model(config)
        assert (served.kind, served.version) == ("int8", 2)
        assert SignedManifest.from_bytes(message.signed_manifest).manifest.version == 2
        assert "int8 model v2" in predict(path)
        assert idle.poll() is None  # no refusal stops the client

        # a serving file altered on disk does not verify: predict falls back to the trained model
        data = bytearray((state / SERVING_FILE).read_bytes())
        data[-1] ^= 0xFF
        (state / SERVING_FILE).write_bytes(bytes(data))
        served = load_serving_model(config)
        assert (served.kind, served.version) == ("float", 1)
        assert "float model v1" in predict(path)
    finally:
        if idle is not None and idle.poll() is None:
            idle.send_signal(signal.SIGTERM)
            try:
                idle.wait(30)
            except subprocess.TimeoutExpired:
                idle.kill()
                idle.wait(10)
        if trainer_app is not None:
            trainer_app.stop()
        agg.stop()


@pytest.mark.mosquitto
def test_a_device_on_a_metered_network_fetches_no_model_only_to_serve_it(tmp_path, bundle, secure_broker, keys):
    from aggregator.server import Aggregator, AggregatorConfig

    private_key, public_path = keys
    fleet = "metered"
    settings = MqttSettings(host="127.0.0.1", port=secure_broker.tls_port, username="aggregator",
                            password=PASSWORDS["aggregator"], tls_ca=str(secure_broker.ca), keepalive_s=10)
    agg = Aggregator(AggregatorConfig(fleet=fleet, clients_per_round=1), bundle, settings, private_key,
                     client_id=f"aggregator-{fleet}")
    agg.start()
    app = None
    try:
        # the inference model of v0, signed by the aggregator's key (its bytes are not run here)
        publish_retained(secure_broker, FleetTopics(fleet).model_int8, build_inference_message(
            fleet=fleet, model_id=bundle.model_id, version=0, tflite=b"int8 model bytes", weights=agg.weights,
            private_key=private_key, extra=bundle_extra(bundle)))
        path = client_toml(tmp_path, secure_broker, public_path, fleet=fleet)
        path.write_text(path.read_text().replace("require_unmetered = false", "require_unmetered = true"))
        phone = StaticPlatform(metered=True)
        app = ClientApp(load_client_config(path), platform=phone)
        app.serving_check_s = 0.2
        app.start()
        assert app.device.ready.wait(30)
        reads = phone.reads
        wait_for(lambda: phone.reads >= reads + 3, 30, "the follower to re-read the network")
        state = tmp_path / "state"
        assert not app.serving.following and not (state / SERVING_FILE).exists()
        assert app.device.stats.downlink_bytes == 0  # nothing fetched on the data plan
        phone.set(metered=False)  # home wifi
        wait_for(lambda: serving_version(state, fleet) == 0, 30, "the serving model on an unmetered network")
        assert app.serving.following and app.device.stats.downlink_bytes > 0
        phone.set(metered=True)
        wait_for(lambda: not app.serving.following, 30, "the follower to let go on a metered network")
    finally:
        if app is not None:
            app.stop()
        agg.stop()
