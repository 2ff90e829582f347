"""`fedboard aggregator` as a process: config file and flags, and kill -9 in the middle of a round."""
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import load_npz
from aggregator_testkit import PLAIN_FEDAVG, ScriptedFleet, dyadic_update, expected_fedavg, fake_bundle, keypair, update_bytes, wait_until
from protocol.codec import parse_codec
from protocol.envelope import decode_envelope
from protocol.model_message import ModelMessage
from protocol.signing import write_keypair

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [f"d{i}" for i in range(8)]


def parse(argv):
    import argparse

    from aggregator.commands import load_service_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return load_service_config(parser.parse_args(argv))


def test_config_file_and_flags(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "agg.toml").write_text("""
[broker]
host = "broker.example"
port = 8883
username = "aggregator"
password_file = "pw"
tls_ca = "ca.crt"

[aggregator]
fleet = "home"
bundle = "model.fbz"
key = "keys/aggregator.key"
checkpoint_dir = "state"
rounds = 5
clients_per_round = 30
server_optimizer = "fedadam"
server_lr = 0.1
mu = 0.01
downlink_delta = "q8"
""")
    service = parse(["aggregator", "--config", str(tmp_path / "agg.toml"), "--clients-per-round", "40",
                     "--no-pace-steering", "--metrics-port", "9100"])
    cfg = service.config
    assert (cfg.fleet, cfg.clients_per_round, cfg.server_optimizer, cfg.server_lr, cfg.mu) == \
        ("home", 40, "fedadam", 0.1, 0.01)
    assert cfg.pace_steering is False and cfg.metrics_port == 9100 and cfg.downlink_delta == "q8"
    assert cfg.checkpoint_dir == str(tmp_path / "state") and service.bundle == tmp_path / "model.fbz"
    assert service.rounds == 5 and service.mqtt.password == "s3cret" and service.mqtt.tls_ca == str(tmp_path / "ca.crt")
    assert service.mqtt.host == "broker.example" and service.mqtt.port == 8883
    (tmp_path / "bad.toml").write_text("[aggregator]\nbundle='b'\nkey='k'\nclients_per_rounds = 3\n")
    with pytest.raises(ValueError, match="clients_per_rounds"):
        parse(["aggregator", "--config", str(tmp_path / "bad.toml")])
    with pytest.raises(ValueError, match="--bundle"):
        parse(["aggregator", "--key", "k"])


# -- found by bench/fuzz_campaign.py: each of these was a TypeError, AttributeError,
# UnicodeDecodeError or RecursionError naming nothing ------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("[aggregator]\nbundle='b'\nkey='k'\nclients_per_round = 'x'\n", "clients_per_round: expected an integer"),
    ("[aggregator]\nbundle='b'\nkey='k'\nover_selection = '2'\n", "over_selection: expected a number"),
    ("[aggregator]\nbundle='b'\nkey='k'\nserver_options = 3\n", "server_options: expected a string"),
    ("[aggregator]\nbundle=5\nkey='k'\n", r"\[aggregator\] bundle: expected a path"),
    ("[aggregator]\nbundle='b'\nkey='k'\nrounds = inf\n", r"\[aggregator\] rounds: expected an integer"),
    ("[aggregator]\nbundle='b'\nkey='k'\n[broker]\nkeepalive_s = '30'\n", r"\[broker\] keepalive_s"),
    ("aggregator = 3\n", "aggregator must be a table"),
    ("[aggregator]\nbundle='b'\nkey='k'\ndownlink = 'zz'\n", "downlink: codec spec 'zz'"),
    ("[aggregator]\nbundle='b'\nkey='k'\nserver_lr = -1.0\n", "server_lr -1.0"),
    ("deep = " + "[" * 50_000 + "]" * 50_000 + "\n", "not valid TOML"),
])
def test_wrong_types_and_broken_toml_are_value_errors_naming_the_key(tmp_path, text, match):
    (tmp_path / "agg.toml").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        parse(["aggregator", "--config", str(tmp_path / "agg.toml")])
    assert type(info.value).__name__ in ("ValueError", "CodecError")


def test_a_config_that_is_not_utf8_is_a_value_error(tmp_path):
    (tmp_path / "agg.toml").write_bytes(b"[aggregator]\nfleet = '\xff'\n")
    with pytest.raises(ValueError, match="not UTF-8") as info:
        parse(["aggregator", "--config", str(tmp_path / "agg.toml")])
    assert not isinstance(info.value, UnicodeError)


def test_fedprox_and_server_optimizer_flags_reach_the_config():
    service = parse(["aggregator", "--bundle", "b.fbz", "--key", "k", "--mu", "0.5", "--server-optimizer", "fedyogi",
                     "--server-options", "tau=0.01,beta2=0.9", "--aggregation", "clip:5|mean"])
    opt = service.config.make_server_optimizer()
    assert service.config.mu == 0.5 and opt.name == "fedyogi" and opt.tau == 0.01 and opt.beta2 == 0.9
    with pytest.raises(ValueError, match="lossless"):
        parse(["aggregator", "--bundle", "b", "--key", "k", "--downlink", "q8", "--downlink-delta", "q8"])


def _start(cmd, log_path):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _accepted_in_checkpoint(path: Path) -> int:
    try:
        data = load_npz(path)
    except Exception:
        return 0
    import json

    return len(json.loads(str(data["meta"].item()))["accepted"])


@pytest.mark.mosquitto
def test_kill_9_mid_round_and_restart_loses_and_doubles_nothing(tmp_path, mosquitto):
    bundle = fake_bundle()
    bundle.write(tmp_path / "model.fbz")
    key_path, _ = write_keypair(tmp_path / "keys")
    ckpt = tmp_path / "state"
    cmd = [sys.executable, "-m", "aggregator.commands", "aggregator", "--broker", f"127.0.0.1:{mosquitto.port}",
           "--bundle", str(tmp_path / "model.fbz"), "--key", str(key_path), "--checkpoint-dir", str(ckpt),
           "--rounds", "1", "--fleet", "kill", "--clients-per-round", "8", "--over-selection", "1.0",
           "--checkin-window-s", "10", "--expected-checkins", "8", "--report-deadline-s", "60", "--codec", "f32",
           "--server-optimizer", "fedavg", "--server-lr", "1.0"]
    fleet = ScriptedFleet(mosquitto.port, "kill", DEVICES)
    updates = {d: dyadic_update(i, bundle.param_count) for i, d in enumerate(DEVICES)}
    data = {d: update_bytes("kill", d, 1, 0, updates[d], examples=i + 1) for i, d in enumerate(DEVICES)}
    first = _start(cmd, tmp_path / "first.log")
    try:
        wait_until(lambda: len(fleet.selected(1)) == 8, 30, "the cohort")
        for d in DEVICES[:3]:  # three accepted and acknowledged (so they are in the checkpoint)
            fleet.send(d, data[d])
            wait_until(lambda: any(a.accepted for a in fleet.acks_for(d)), 10, f"ack of {d}")
        for d in DEVICES[3:6]:  # three more in flight: kill as soon as the checkpoint holds a fourth
            fleet.client.publish(fleet.topics.update(d), data[d], qos=1)
        wait_until(lambda: _accepted_in_checkpoint(ckpt / "round.npz") >= 4, 10, "a fourth checkpointed update")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    acked_before = {d for d, a in fleet.acks if a.accepted}
    for d in DEVICES[6:] + DEVICES[:2]:  # the rest while it is down, and two re-sends (a device's outbox)
        fleet.send(d, data[d])
    second = _start(cmd, tmp_path / "second.log")
    try:
        assert second.wait(60) == 0, (tmp_path / "second.log").read_text()
    finally:
        if second.poll() is None:
            second.kill()
    log = (tmp_path / "second.log").read_text()
    assert "resuming round 1 (reporting phase)" in log and "round 1: committed v1 8/8 reports" in log, log
    wait_until(lambda: fleet.model_version() == 1, 10, "the retained v1")
    message = ModelMessage.from_envelope(decode_envelope(fleet.models["current"]))
    published = parse_codec(message.codec).decode(message.weights_payload, bundle.param_count)
    expected = expected_fedavg(bundle.initial_weights, [(updates[d], i + 1) for i, d in enumerate(DEVICES)])
    np.testing.assert_array_equal(published, expected)  # every update exactly once
    assert load_npz(ckpt / "model.npz")["version"].item() == 1
    # every device is acknowledged as accepted; re-sends only ever as "duplicate"
    wait_until(lambda: {d for d, a in fleet.acks if a.accepted} == set(DEVICES), 10, "all accepted")
    assert all(a.accepted for _, a in fleet.acks)
    fleet.stop()

    # the same updates through an uninterrupted aggregator give the same model, bit for bit
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.signing import load_private_key
    from protocol.transport import MqttSettings

    config = AggregatorConfig(fleet="nokill", clients_per_round=8, over_selection=1.0, checkin_window_s=10,
                              expected_checkins=8, report_deadline_s=60, codec="f32", checkpoint_dir=str(tmp_path / "s2"),
                              **PLAIN_FEDAVG)
    agg = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), load_private_key(key_path))
    agg.start()
    fleet2 = ScriptedFleet(mosquitto.port, "nokill", DEVICES, client_id="fleet-nokill")
    try:
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("r", agg.run_round()))
        thread.start()
        wait_until(lambda: len(fleet2.selected(1)) == 8, 20, "the cohort")
        for i, d in enumerate(DEVICES):
            fleet2.send(d, update_bytes("nokill", d, 1, 0, updates[d], examples=i + 1))
        thread.join(30)
        assert out["r"].committed
        np.testing.assert_array_equal(agg.weights, published)
    finally:
        fleet2.stop()
        agg.stop()
    print(f"acknowledged before the kill: {sorted(acked_before)}")


@pytest.mark.mosquitto
def test_restart_republishes_the_retained_model_and_round(tmp_path, mosquitto):
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.transport import MqttSettings

    bundle = fake_bundle()
    key, _ = keypair()
    config = AggregatorConfig(fleet="again", clients_per_round=2, over_selection=1.0, checkin_window_s=30, expected_checkins=2,
                              report_deadline_s=30, codec="f32", checkpoint_dir=str(tmp_path / "s"),
                              downlink_delta="q8")
    agg = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), key)
    agg.start()
    fleet = ScriptedFleet(mosquitto.port, "again", ["a", "b"], client_id="fleet-again")
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", agg.run_round()))
    thread.start()
    wait_until(lambda: len(fleet.selected(1)) == 2, 40, "the cohort")
    for i, d in enumerate(("a", "b")):
        fleet.send(d, update_bytes("again", d, 1, 0, dyadic_update(i, bundle.param_count)))
    thread.join(20)
    committed = agg.weights.copy()
    agg.stop()
    fleet.stop()
    # the broker forgets the retained state (e.g. restored without persistence): the restart publishes it again
    import paho.mqtt.client as mqtt

    wipe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    wipe.connect("127.0.0.1", mosquitto.port)
    wipe.loop_start()
    for topic in ("model/current", "model/delta", "model/bundle", "round/current"):
        wipe.publish(f"fedboard/again/{topic}", b"", qos=1, retain=True).wait_for_publish(5)
    wipe.loop_stop()
    wipe.disconnect()
    again = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), key)
    again.start()
    try:
        assert again.version == 1 and np.array_equal(again.weights, committed)
        late = ScriptedFleet(mosquitto.port, "again", [], checkin=False, client_id="late-subscriber")
        wait_until(lambda: late.model_version("current") == 1 and late.model_version("delta") == 1, 10,
                   "retained model and delta")
        late.stop()
    finally:
        again.stop()


@pytest.mark.mosquitto
def test_worker_process_runs_until_sigterm(tmp_path, mosquitto):
    bundle = fake_bundle()
    bundle.write(tmp_path / "model.fbz")
    cmd = [sys.executable, "-m", "aggregator.commands", "aggregator", "--worker", "w1", "--bundle",
           str(tmp_path / "model.fbz"), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "scale"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "intake worker w1 of fleet scale running" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "worker w1 stopped" in rest, "".join(lines) + rest


def test_export_bundle_from_a_vocabulary_file(tmp_path, cache_dir):
    from aggregator.commands import main
    from models.bundle import read_bundle
    from models.tokenizer import build_vocabulary

    keyboard = ["i am going to the park", "see you at the station at six", "we are at home now",
                "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]
    vocab = build_vocabulary(keyboard, size=100)  # the tiny model of test_app.py: usually cached already
    vocab.save(tmp_path / "vocab.json")
    assert main(["export-bundle", "--vocab", str(tmp_path / "vocab.json"), "--embed-dim", "8", "--units", "16",
                 "--out", str(tmp_path / "model.fbz")]) == 0
    bundle = read_bundle(tmp_path / "model.fbz")
    assert bundle.config.vocab_size == vocab.size and bundle.config.units == 16
    assert main(["export-bundle", "--out", str(tmp_path / "x.fbz")]) == 2  # neither corpus nor vocabulary


@pytest.mark.parametrize("flags", [["--corpus", "builtin"], ["--corpus", "builtin", "--format", "builtin"]])
def test_export_bundle_from_the_builtin_corpus(tmp_path, cache_dir, flags):
    """A Pi fleet can start from the built-in corpus (it used to refuse: "takes no path")."""
    from aggregator.commands import main
    from models.bundle import read_bundle

    out = tmp_path / "model.fbz"
    assert main(["export-bundle", *flags, "--vocab-size", "60", "--embed-dim", "8", "--units", "16",
                 "--seq-len", "8", "--out", str(out)]) == 0
    bundle = read_bundle(out)
    assert bundle.config.vocab_size == 64 and len(bundle.vocab_json["words"]) == 64
