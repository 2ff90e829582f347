"""No silent reset, no fork, no corrupt state used (issue 14, findings 5 and 6).

An aggregator that lost its state must not start afresh at v0 over the model the fleet trusts;
`--recover-from-broker` continues from the verified retained model. A damaged checkpoint or
ledger is refused with its file (and line) and exit 3, never a traceback, and is left as it is.
Process tests run the real `fedboard aggregator` against a real Mosquitto.
"""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import (LEDGER_FILE, CheckpointError, CheckpointStore, LedgerCorrupt, Ledger,
                                   RoundCheckpoint, read_ledger)
from aggregator_testkit import ScriptedFleet, dyadic_update, fake_bundle, update_bytes, wait_until
from protocol.signing import load_private_key, write_keypair

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["d0", "d1", "d2"]
GOOD = json.dumps({"event": "accepted", "round": 1, "device": "a", "sha256": "ab" * 32})


# -- damaged files, unit level ------------------------------------------------------------------------
def _model_and_round(directory: Path) -> None:
    """A real model.npz (from an Aggregator that never connects) and a round.npz with a running sum."""
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.transport import MqttSettings

    key_path, _ = write_keypair(directory.parent / "keys", overwrite=True)
    agg = Aggregator(AggregatorConfig(fleet="fork", checkpoint_dir=str(directory),
                                      server_optimizer="fedadam", server_lr=0.01), fake_bundle(), MqttSettings(),
                     load_private_key(key_path))
    agg.stop()
    store = CheckpointStore(directory)
    try:
        store.save_round(RoundCheckpoint(1, {"plan": {"base_version": 0}}, {"sum": np.arange(50_000, dtype=np.float32)}))
    finally:
        store.close()


def _damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # one bit flipped in the middle of the file (inside the arrays' data)
        data = bytearray(data)
        data[len(data) // 2] ^= 0x10
        data = bytes(data)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("name", ["model.npz", "round.npz"])
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_kept(tmp_path, name, how):
    state = tmp_path / "state"
    _model_and_round(state)
    damaged = _damage(state / name, how)
    store = CheckpointStore(state)
    try:
        with pytest.raises(CheckpointError, match=f"{state / name}.*(backup|move it away)"):
            store.load_model() if name == "model.npz" else store.load_round()
    finally:
        store.close()
    assert (state / name).read_bytes() == damaged


LEDGER_DAMAGE = {
    "torn middle line": (GOOD + "\n" + '{"event": "accep' + "\n" + GOOD.replace('"a"', '"b"') + "\n").encode(),
    "missing key": (GOOD + "\n" + json.dumps({"event": "round_end", "round": 1, "version": 1}) + "\n").encode(),
    "wrong type": (GOOD + "\n" + GOOD.replace('"round": 1', '"round": "1"') + "\n").encode(),
    "not utf-8": (GOOD + "\n").encode() + b'{"event": "accepted", "round": 1, "device": "\xff\xfe", "sha256": "x"}\n',
    "not a record": (GOOD + "\n[1, 2]\n").encode(),
}


@pytest.mark.parametrize("kind", sorted(LEDGER_DAMAGE))
def test_a_damaged_ledger_line_is_refused_with_file_and_line_and_kept(tmp_path, kind):
    path = tmp_path / LEDGER_FILE
    path.write_bytes(LEDGER_DAMAGE[kind])
    with pytest.raises(LedgerCorrupt, match=rf"{LEDGER_FILE}:2 is corrupt: .*left as it is"):
        read_ledger(path)
    with pytest.raises(LedgerCorrupt):
        Ledger(path)
    assert path.read_bytes() == LEDGER_DAMAGE[kind]  # the audit record is not "repaired" away


def test_only_a_torn_last_line_is_an_interrupted_append(tmp_path):
    path = tmp_path / LEDGER_FILE
    path.write_bytes((GOOD + "\n" + GOOD.replace('"a"', '"b"')).encode())  # whole, newline not yet written
    assert set(read_ledger(path).accepted) == {(1, "a"), (1, "b")}
    Ledger(path).record_accepted(1, {"c": "cc"})
    assert set(read_ledger(path).accepted) == {(1, "a"), (1, "b"), (1, "c")}
    path.write_bytes((GOOD + "\n").encode() + b'{"event": "accepted", "round": 2, "dev')  # torn mid-append
    assert read_ledger(path).torn_lines == 1
    Ledger(path)
    assert path.read_bytes() == (GOOD + "\n").encode()  # cut at the last whole line, nothing else touched


# -- the real `fedboard aggregator` -------------------------------------------------------------------
def _cmd(tmp_path: Path, port: int, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aggregator.commands", "aggregator", "--broker", f"127.0.0.1:{port}",
            "--bundle", str(tmp_path / "model.fbz"), "--key", str(tmp_path / "keys" / "aggregator.key"),
            "--checkpoint-dir", str(state), "--fleet", "fork", "--clients-per-round", "3", "--over-selection", "1.0",
            "--checkin-window-s", "20", "--expected-checkins", "3", "--report-deadline-s", "300", "--codec", "f32",
            "--server-optimizer", "fedadam", "--server-lr", "0.01", *extra]


def _run(cmd: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.mosquitto
@pytest.mark.parametrize("damage", ["model.npz truncated", "model.npz bit-flipped", "round.npz truncated",
                                    "round.npz bit-flipped", "ledger torn middle line"])
def test_the_aggregator_exits_3_on_damaged_state_without_a_traceback(tmp_path, mosquitto, damage):
    fake_bundle().write(tmp_path / "model.fbz")
    state = tmp_path / "state"
    _model_and_round(state)
    name, how = damage.split(" ", 1)
    if name == "ledger":
        path = state / LEDGER_FILE
        path.write_bytes(LEDGER_DAMAGE["torn middle line"])
        expected = f"{path}:2"
    else:
        path = state / name
        _damage(path, how)
        expected = str(path)
    before = path.read_bytes()
    proc = _run(_cmd(tmp_path, mosquitto.port, state, "--rounds", "1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert expected in out and "Traceback" not in out, out
    assert path.read_bytes() == before


def _fedadam_round(agg, fleet: ScriptedFleet, round_id: int, base: int, dim: int, senders: list[str]) -> dict:
    """Run one round of `agg` in a thread; the listed devices send; returns the outcome box."""
    from aggregator.server import AggregatorStopped

    out: dict = {}

    def run():
        try:
            out["r"] = agg.run_round()
        except AggregatorStopped:
            out["stopped"] = True

    thread = threading.Thread(target=run)
    thread.start()
    out["thread"] = thread
    wait_until(lambda: len(fleet.selected(round_id)) == 3, 60, f"the cohort of round {round_id}")
    for i, d in enumerate(senders):
        fleet.send(d, update_bytes("fork", d, round_id, base, dyadic_update(i + 10 * round_id, dim)))
        wait_until(lambda: any(a.accepted and a.round_id == round_id for a in fleet.acks_for(d)), 30, f"ack of {d}")
    return out


@pytest.mark.mosquitto
def test_a_lost_state_is_refused_and_recovered_from_the_broker(tmp_path, mosquitto):
    """model.npz lost (round and ledger kept), or the whole directory lost while the broker retains
    v1: exit 3 and nothing published; --recover-from-broker continues round 2 at v1 and commits v2."""
    from aggregator.server import AggregatorConfig

    bundle = fake_bundle()
    bundle.write(tmp_path / "model.fbz")
    key_path, _ = write_keypair(tmp_path / "keys")
    state = tmp_path / "state"
    config = AggregatorConfig(fleet="fork", clients_per_round=3, over_selection=1.0, checkin_window_s=20,
                              expected_checkins=3, report_deadline_s=300, codec="f32", server_optimizer="fedadam",
                              server_lr=0.01, checkpoint_dir=str(state))
    fleet = ScriptedFleet(mosquitto.port, "fork", DEVICES, client_id="fleet-fork")
    try:
        _lose_and_recover(tmp_path, mosquitto.port, config, bundle, key_path, fleet)
    finally:
        fleet.stop()


def _lose_and_recover(tmp_path, port, config, bundle, key_path, fleet) -> None:
    from aggregator.server import Aggregator
    from protocol.transport import MqttSettings

    state = Path(config.checkpoint_dir)
    mosquitto_port = port
    with contextlib.ExitStack() as stack:
        agg = Aggregator(config, bundle, MqttSettings(port=mosquitto_port), load_private_key(key_path))
        agg.start()
        stack.callback(agg.stop)
        first = _fedadam_round(agg, fleet, 1, 0, bundle.param_count, DEVICES)
        first["thread"].join(60)
        assert first["r"].committed and first["r"].version == 1
        second = _fedadam_round(agg, fleet, 2, 1, bundle.param_count, DEVICES[:1])  # one accepted, then a crash
        agg.stop()
        second["thread"].join(30)
        assert second.get("stopped")
    wait_until(lambda: fleet.model_version() == 1, 10, "the retained v1")
    retained_v1 = fleet.models["current"]

    # the whole state directory lost: the broker's v1 is the evidence
    proc = _run(_cmd(tmp_path, mosquitto_port, tmp_path / "empty", "--rounds", "1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "retains model v1" in out and "signed by this key" in out and "--recover-from-broker" in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "empty" / "model.npz").exists()  # nothing saved either, so a retry is refused again

    # model.npz lost, round.npz and the ledger kept
    (state / "model.npz").rename(tmp_path / "model.npz.lost")
    proc = _run(_cmd(tmp_path, mosquitto_port, state, "--rounds", "1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "no model.npz" in out and "round.npz" in out and "ledger.jsonl" in out and "--recover-from-broker" in out
    assert "Traceback" not in out
    assert fleet.models["current"] == retained_v1 and fleet.model_version() == 1  # v0 was never published

    # the explicit way back: the broker's v1, verified; round 2 (planned on v1) goes on and commits v2
    for i, d in enumerate(DEVICES[1:], 1):  # the rest report while the aggregator is down
        fleet.send(d, update_bytes("fork", d, 2, 1, dyadic_update(i + 20, bundle.param_count)))
    proc = _run(_cmd(tmp_path, mosquitto_port, state, "--rounds", "1", "--recover-from-broker"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "recovered model v1" in out and "moments restart" in out and "the next model is v2" in out, out
    assert "resuming round 2" in out and "round 2: committed v2 3/3 reports" in out, out
    wait_until(lambda: fleet.model_version() == 2, 20, "the retained v2")
    ends = read_ledger(state / LEDGER_FILE).ends
    assert [(e.round, e.version, e.committed) for e in ends] == [(1, 1, True), (2, 2, True)]

    # and an ordinary restart now runs from the checkpoint recovery wrote (round 3 builds on v2)
    fleet.checkin = True
    proc_thread_out: dict = {}
    restart = subprocess.Popen(_cmd(tmp_path, mosquitto_port, state, "--rounds", "1"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: 3 in fleet.plans, 60, "round 3's plan")
        assert fleet.plans[3].base_version == 2
        wait_until(lambda: len(fleet.selected(3)) == 3, 60, "the cohort of round 3")
        for i, d in enumerate(DEVICES):
            fleet.send(d, update_bytes("fork", d, 3, 2, dyadic_update(i + 30, bundle.param_count)))
        proc_thread_out["rc"] = restart.wait(120)
    finally:
        if restart.poll() is None:
            restart.kill()
    text = restart.stdout.read() if restart.stdout else ""
    assert proc_thread_out["rc"] == 0 and "round 3: committed v3 3/3 reports" in text, text


# -- the device: a plan it cannot use is sat out, and said so once ---------------------------------------
@pytest.mark.mosquitto
def test_a_device_says_once_why_it_ignores_plans_older_than_its_model(tmp_path, mosquitto, cache_dir, caplog):
    from edge_client.device import DeviceClient, DeviceConfig
    from edge_client.residuals import ResidualStore
    from edge_client.text_windows import StoreWindows
    from edge_client.textstore import TextStore
    from edge_client.trainer import InterpreterPool
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import Vocabulary, build_vocabulary
    from protocol.messages import RoundPlan
    from protocol.signing import ModelTrust, generate_keypair
    from protocol.topics import FleetTopics
    from protocol.transport import MqttSettings
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    texts = ["the quick brown fox jumps over the lazy dog"] * 40
    vocab = build_vocabulary(texts, size=50)
    bundle = get_or_export_bundle(ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16),
                                  vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")
    _, public_pem = generate_keypair()
    settings = MqttSettings(port=mosquitto.port)
    store = TextStore(tmp_path / "texts.db")
    store.add_many(texts)
    seen: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def on_event(name, fields):
        with lock:
            seen.append((name, fields))

    def named(name):
        with lock:
            return [f for n, f in seen if n == name]

    trust = ModelTrust(load_pem_public_key(public_pem), "stale", bundle.model_id, last_version=3)  # it holds v3
    device = DeviceClient(DeviceConfig(fleet="stale", device_id="dev", mqtt=settings), InterpreterPool(bundle),
                          StoreWindows(store, Vocabulary.from_json(bundle.vocab_json), bundle.config.seq_len), trust,
                          residuals=ResidualStore(tmp_path), on_event=on_event)
    fleet = ScriptedFleet(mosquitto.port, "stale", [], client_id="plans-stale")  # publishes plans, checks nobody in
    topics = FleetTopics("stale")

    def plan(round_id, base, model_id=bundle.model_id):
        data = RoundPlan(round_id, base, model_id, "f32", 1, 60.0, 60.0).to_envelope("stale").encode()
        fleet.client.publish(topics.round, data, qos=1, retain=True).wait_for_publish(10)

    caplog.set_level(logging.WARNING, logger="edge_client.device")
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        stack.callback(fleet.stop)
        stack.callback(device.stop)
        device.start()
        assert device.ready.wait(20)
        for round_id in (1, 2, 3):  # a reset aggregator: v0, v1, v2 are all older than the v3 it trusts
            plan(round_id, round_id - 1)
            wait_until(lambda: len(named("stale_plan")) == round_id, 20, f"plan {round_id} sat out")
        warnings = [r.getMessage() for r in caplog.records if "older than v4" in r.getMessage()]
        assert len(warnings) == 1 and "ignoring round 1" in warnings[0] and "builds on v0" in warnings[0], warnings
        assert not named("checkin")  # it never took a cohort slot it could not use
        plan(4, 4)  # a plan on a model it can load: checked in, and the warning is re-armed
        wait_until(lambda: named("checkin"), 20, "a check-in to round 4")
        plan(5, 1)
        wait_until(lambda: len(named("stale_plan")) == 4, 20, "plan 5 sat out")
        assert len([r for r in caplog.records if "older than v4" in r.getMessage()]) == 2
        plan(6, 9, "another-model")  # a plan for a model this device does not run: also said once
        plan(7, 9, "another-model")
        wait_until(lambda: len(named("model_mismatch")) == 2, 20, "the other model's plans sat out")
        assert len([r for r in caplog.records if "is for model another-model" in r.getMessage()]) == 1


# -- what the broker retains: adopted only when this aggregator's key verifies all of it ----------------
def test_a_retained_model_is_adopted_only_when_this_key_verifies_it(tmp_path):
    from aggregator.publisher import build_model_message
    from aggregator.recovery import inspect_retained_model
    from aggregator_testkit import keypair

    bundle = fake_bundle()
    ours, theirs = keypair()[0], keypair()[0]
    weights = bundle.initial_weights + np.float32(0.5)
    message = build_model_message(fleet="fork", model_id=bundle.model_id, version=7, weights=weights, codec_spec="f32",
                                  private_key=ours, extra={"round": 9})
    args = ("fork", bundle.model_id, bundle.param_count, 1 << 30)
    good = inspect_retained_model(message.envelope_bytes, ours.public_key(), *args)
    assert good.verified and (good.version, good.round) == (7, 9)
    np.testing.assert_array_equal(good.weights, weights)
    foreign = inspect_retained_model(message.envelope_bytes, theirs.public_key(), *args)
    assert not foreign.verified and foreign.version == 7 and "signature" in foreign.problem
    import dataclasses

    from protocol.envelope import decode_envelope
    from protocol.model_message import ModelMessage

    parsed = ModelMessage.from_envelope(decode_envelope(message.envelope_bytes, max_payload=1 << 30))
    payload = bytearray(parsed.weights_payload)
    payload[-1] ^= 1  # a weight changed after signing, in a well-formed envelope (as an attacker would)
    forged = dataclasses.replace(parsed, weights_payload=bytes(payload)).to_envelope().encode()
    bad = inspect_retained_model(forged, ours.public_key(), *args)
    assert not bad.verified and "sha256" in bad.problem
    junk = inspect_retained_model(b"junk", ours.public_key(), *args)
    assert junk.version is None and not junk.verified


# -- the same with exactly the `fedboard broker-config` output and devices with their own passwords -----
@pytest.mark.mosquitto
def test_with_the_generated_broker_config_a_lost_directory_is_refused_then_recovered(tmp_path):
    """The whole checkpoint directory lost while the broker retains v1: exit 3, v1 stays retained;
    --recover-from-broker continues at v1 and the devices' next round commits v2."""
    import shutil

    from device_sim.adversary import LiveBroker, ScriptedDevice, start_aggregator, stand_in_bundle
    from device_sim.adversary import wait_until as wait

    bundle = stand_in_bundle()
    bundle.write(tmp_path / "model.fbz")
    key, _ = write_keypair(tmp_path / "keys")
    state = tmp_path / "state"
    flags = ("--checkpoint-dir", str(state), "--clients-per-round", "3", "--over-selection", "1.0",
             "--expected-checkins", "3", "--checkin-window-s", "60", "--report-deadline-s", "60", "--codec", "f32")
    broker = LiveBroker(tmp_path, "lost", 3)
    devices: list = []
    try:
        devices.extend(ScriptedDevice(broker, u) for u in broker.devices)

        def run_round(name: str, round_id: int, base: int, *extra: str) -> str:
            agg = start_aggregator(broker, tmp_path, name, tmp_path / "model.fbz", key, *flags,
                                   "--until-round", str(round_id), *extra)
            try:
                wait(lambda: all(d.selected(round_id) for d in devices), 90, f"the cohort of round {round_id}")
                for i, d in enumerate(devices):
                    d.send_update(round_id, base, np.random.default_rng(i + 10 * round_id).normal(0, 0.01,
                                                                                               bundle.param_count))
                assert agg.proc.wait(90) == 0, agg.text()
            finally:
                agg.stop()
            return agg.text()

        assert "round 1: committed v1 3/3 reports" in run_round("first", 1, 0)
        wait(lambda: (devices[0].weights(bundle.param_count) or (0,))[0] == 1, 30, "the retained v1")
        shutil.rmtree(state)  # the whole directory lost

        refused = start_aggregator(broker, tmp_path, "refused", tmp_path / "model.fbz", key, *flags, "--rounds", "1")
        assert refused.proc.wait(90) == 3, refused.text()
        text = refused.text()
        assert "retains model v1" in text and "--recover-from-broker" in text and "Traceback" not in text, text
        assert devices[0].weights(bundle.param_count)[0] == 1  # nothing was published over v1

        log = run_round("recovered", 2, 1, "--recover-from-broker")
        assert "recovered model v1" in log and "round 2: committed v2 3/3 reports" in log, log
    finally:
        for d in devices:
            d.close()
        broker.stop()


def test_a_round_planned_on_another_model_than_model_npz_is_refused(tmp_path):
    """The bug behind the fork: updates trained on v3 were added to another model's weights."""
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.transport import MqttSettings

    state = tmp_path / "state"
    _model_and_round(state)  # model.npz at v0
    store = CheckpointStore(state)
    try:
        store.save_round(RoundCheckpoint(4, {"plan": {"base_version": 3}}))
    finally:
        store.close()
    with pytest.raises(CheckpointError, match=r"round 4 planned on model v3, but the model is v0.*move round.npz away"):
        Aggregator(AggregatorConfig(fleet="fork", checkpoint_dir=str(state), server_optimizer="fedadam",
                                    server_lr=0.01), fake_bundle(), MqttSettings(),
                   load_private_key(tmp_path / "keys" / "aggregator.key"))
    CheckpointStore(state).close()  # the refused aggregator released its directory


@pytest.mark.mosquitto
def test_a_newer_retained_model_is_found_before_anything_is_published(tmp_path, mosquitto):
    """Fresh directory, a checkpoint restored from an older backup, and a model this key did not
    sign: each refused at start; the broker keeps exactly what it had (no bundle, no plan, no v0)."""
    from aggregator.publisher import build_model_message
    from aggregator.server import Aggregator, AggregatorConfig
    from aggregator_testkit import keypair
    from protocol.transport import MqttSettings

    bundle = fake_bundle()
    key, other = keypair()[0], keypair()[0]
    fleet = ScriptedFleet(mosquitto.port, "newer", [], client_id="watch-newer")
    try:
        def retain(version, signer):
            data = build_model_message(fleet="newer", model_id=bundle.model_id, version=version,
                                       weights=bundle.initial_weights, codec_spec="f32", private_key=signer).envelope_bytes
            fleet.client.publish(fleet.topics.model, data, qos=1, retain=True).wait_for_publish(10)
            wait_until(lambda: fleet.models.get("current") == data, 10, "the retained model")
            return data

        def start(directory):
            agg = Aggregator(AggregatorConfig(fleet="newer", checkpoint_dir=str(directory)), bundle,
                             MqttSettings(port=mosquitto.port), key)
            try:
                agg.start()
            finally:
                agg.stop()

        v5 = retain(5, key)
        with pytest.raises(CheckpointError, match="retains model v5 of this fleet.*signed by this key.*holds no model"):
            start(tmp_path / "fresh")
        assert not (tmp_path / "fresh" / "model.npz").exists()

        Aggregator(AggregatorConfig(fleet="newer", checkpoint_dir=str(tmp_path / "old")), bundle, MqttSettings(),
                   key).stop()  # a model.npz at v0: as if restored from an old backup
        with pytest.raises(CheckpointError, match=r"retains model v5.*at v0 \(restored from an older backup\?\).*"
                                                  r"move model.npz away first"):
            start(tmp_path / "old")
        assert (tmp_path / "old" / "model.npz").exists()  # the operator's file is not touched

        retain(7, other)
        with pytest.raises(CheckpointError, match="claiming v7.*does not verify"):
            start(tmp_path / "fresh")
        with fleet._lock:
            assert set(fleet.models) == {"current"} and not fleet.plans  # no bundle, delta, int8 or plan published
        assert fleet.model_version() == 7
        del v5
    finally:
        fleet.stop()
