"""The aggregator's audit ledger and the full-disk hook: what the fault soak reads and relies on.

The ledger is written just after the checkpoint it describes, so a kill in between leaves it
one step behind; a restarted aggregator must complete it from the checkpoints (never writing
a line twice). The ENOSPC hook lets the soak fill "the disk" where no tmpfs can be mounted.
"""
import json
import threading

import numpy as np
import pytest

from aggregator.checkpoint import (FAULT_ENV, LEDGER_FILE, CheckpointError, Ledger, RoundEnd, atomic_savez, load_npz,
                                   read_ledger)
from aggregator_testkit import ScriptedFleet, dyadic_update, fake_bundle, keypair, update_bytes, wait_until


def test_ledger_writes_each_key_once_across_reopen(tmp_path):
    ledger = Ledger(tmp_path / LEDGER_FILE)
    assert ledger.record_accepted(1, {"a": "aa", "b": "bb"}) == 2
    assert ledger.record_accepted(1, {"a": "aa", "b": "bb", "c": "cc"}) == 1  # only the new one
    assert ledger.record_round_end(RoundEnd(1, 1, True, 3)) is True
    again = Ledger(tmp_path / LEDGER_FILE)  # a restart: what is there is not written again
    assert again.record_accepted(1, {"a": "aa", "c": "cc"}) == 0
    assert again.record_round_end(RoundEnd(1, 1, True, 3)) is False
    contents = read_ledger(tmp_path / LEDGER_FILE)
    assert contents.accepted == {(1, "a"): "aa", (1, "b"): "bb", (1, "c"): "cc"}
    assert contents.ends == [RoundEnd(1, 1, True, 3)] and not contents.repeated and contents.torn_lines == 0


def test_a_torn_last_line_is_dropped_and_a_repeated_key_is_reported(tmp_path):
    path = tmp_path / LEDGER_FILE
    line = json.dumps({"event": "accepted", "round": 2, "device": "x", "sha256": "s"})
    path.write_text(line + "\n" + line + "\n" + '{"event": "accep')  # a key twice, then a crash mid-append
    contents = read_ledger(path)
    assert contents.repeated == [(2, "x")] and contents.torn_lines == 1
    ledger = Ledger(path)  # opening it removes the torn line, so the next append starts a clean line
    ledger.record_round_end(RoundEnd(2, 1, True, 1))
    assert read_ledger(path).torn_lines == 0 and read_ledger(path).ends == [RoundEnd(2, 1, True, 1)]


def test_the_enospc_hook_fails_writes_clearly_and_keeps_the_last_good_file(tmp_path, monkeypatch):
    flag = tmp_path / "full"
    monkeypatch.setenv(FAULT_ENV, str(flag))
    atomic_savez(tmp_path / "model.npz", {"version": 3})
    ledger = Ledger(tmp_path / LEDGER_FILE)
    flag.write_text("")
    with pytest.raises(CheckpointError, match="No space left on device.*last good checkpoint"):
        atomic_savez(tmp_path / "model.npz", {"version": 4})
    with pytest.raises(CheckpointError, match="ledger"):
        ledger.record_accepted(1, {"a": "aa"})
    assert load_npz(tmp_path / "model.npz")["version"].item() == 3
    assert not list(tmp_path.glob(".*.tmp"))
    flag.unlink()  # space is back
    assert ledger.record_accepted(1, {"a": "aa"}) == 1


@pytest.mark.mosquitto
def test_a_restarted_aggregator_completes_the_ledger_from_its_checkpoints(tmp_path, mosquitto):
    """Regression: a kill between a checkpoint and its ledger line left the ledger short."""
    from aggregator.server import Aggregator, AggregatorConfig, AggregatorStopped
    from protocol.transport import MqttSettings

    bundle = fake_bundle()
    key, _ = keypair()
    devices = ["a", "b", "c"]
    config = AggregatorConfig(fleet="ledger", clients_per_round=3, over_selection=1.0, checkin_window_s=20,
                              expected_checkins=3, report_deadline_s=30, codec="f32", checkpoint_dir=str(tmp_path / "s"))
    ledger_path = tmp_path / "s" / LEDGER_FILE
    data = {d: update_bytes("ledger", d, 1, 0, dyadic_update(i, bundle.param_count)) for i, d in enumerate(devices)}
    fleet = ScriptedFleet(mosquitto.port, "ledger", devices, client_id="fleet-ledger")
    agg = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), key)
    agg.start()
    out = {}

    def run():
        try:
            out["r"] = agg.run_round()
        except AggregatorStopped:
            out["stopped"] = True

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(lambda: len(fleet.selected(1)) == 3, 30, "the cohort")
        for d in devices[:2]:
            fleet.send(d, data[d])
            wait_until(lambda: any(a.accepted for a in fleet.acks_for(d)), 10, f"ack of {d}")
        assert set(read_ledger(ledger_path).accepted) == {(1, "a"), (1, "b")}
    finally:
        agg.stop()
        thread.join(10)
    assert out.get("stopped")
    ledger_path.unlink()  # as if killed after the round checkpoint, before its ledger lines

    again = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), key)
    assert set(read_ledger(ledger_path).accepted) == {(1, "a"), (1, "b")}  # restored from round.npz
    again.start()
    try:
        thread = threading.Thread(target=lambda: out.setdefault("r", again.run_round()))
        thread.start()
        fleet.send("c", data["c"])
        thread.join(30)
        assert out["r"].committed and out["r"].participants == 3
    finally:
        again.stop()
        fleet.stop()
    contents = read_ledger(ledger_path)
    assert contents.ends == [RoundEnd(1, 1, True, 3)] and len(contents.accepted) == 3 and not contents.repeated
    ledger_path.write_text("".join(line + "\n" for line in ledger_path.read_text().splitlines()
                                   if '"round_end"' not in line))  # killed after model.npz, before round_end
    third = Aggregator(config, bundle, MqttSettings(port=mosquitto.port), key)
    try:
        assert read_ledger(ledger_path).ends == [RoundEnd(1, 1, True, 3)]  # restored from model.npz
        assert third.version == 1 and np.array_equal(third.weights, again.weights)
    finally:
        third.stop()
