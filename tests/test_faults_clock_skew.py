"""Fault: devices whose wall clock is hours off, or jumps back and forth.

Round timing never depends on a device's wall clock (plans carry durations, measured on the
device's monotonic clock; the aggregator judges deadlines on its own). The one place a device
used its wall clock was the outbox's expiry: a clock jumping forward made it drop an update
whose round was still open. Regression test first, then the real thing: three devices in child
processes whose `time.time()` is shifted, one of them cut mid-upload every round so its outbox
must decide whether to re-send, in rounds that need every device.
"""
import time

import pytest

from benchkit import load_bench

from edge_client.outbox import Outbox



def _soak():
    return load_bench("soak_faults")


def test_outbox_expiry_ignores_wall_clock_jumps_for_items_it_stored(tmp_path, monkeypatch):
    """Regression: the device's wall clock jumped 3 h forward and the outbox dropped a live update."""
    outbox = Outbox(tmp_path / "outbox")
    real = time.time
    item_id = outbox.put("fedboard/f/update/d", 7, real() + 0.5, b"update")
    item = outbox.pending()[0]
    assert item.id == item_id
    monkeypatch.setattr(time, "time", lambda: real() + 3 * 3600)  # NTP, a dead RTC battery, the user
    assert item.expired() is True             # what the wall clock alone says (the old behaviour)
    assert outbox.expired(item) is False      # what the outbox says: 0.5 s on the monotonic clock
    monkeypatch.setattr(time, "time", lambda: real() - 86400)   # and backwards: still expires on time
    time.sleep(0.6)
    assert outbox.expired(item) is True
    # after a restart only the wall clock survives: a new Outbox falls back to it
    monkeypatch.setattr(time, "time", real)
    restored = Outbox(tmp_path / "outbox")
    assert restored.expired(restored.pending()[0]) is True
    outbox.mark_sent(item_id)
    assert len(outbox) == 0


@pytest.mark.mosquitto
@pytest.mark.slow
def test_skewed_and_jumping_device_clocks_change_nothing(tmp_path, cache_dir):
    soak = _soak()
    inv, faults, wall_s, notes = soak.scenario_skewed_clock(soak.SoakSettings(rounds=2, workdir=tmp_path, keep=True))
    assert inv.ok, (inv.problems, notes)
    assert inv.last_round == 2 and inv.final_version == 2 and inv.updates_lost == 0 and inv.version_gaps == 0
    assert {f.kind for f in faults} == {"clock-ahead-2h", "clock-behind-1d", "clock-jumping-3h"}
    for f in faults:  # goal = the whole fleet: every skewed device was accepted in every round
        assert {r for r, d in soak.read_ledger(tmp_path / "skewed-clock-seed0" / "state" / soak.LEDGER_FILE).accepted
                if d == f.detail} == {1, 2}, notes
    jumping = next(n for n in notes if n.startswith("jumping-3h"))
    assert "uploads cut 2" in jumping and "'passed' deadline 0" in jumping, jumping
