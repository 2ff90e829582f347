"""Fault: `kill -9` of `fedboard aggregator` during the check-in window.

Found by bench/soak_faults.py (sigkill, 1 round in 30 abandoned): the aggregator was killed
right after opening a round; restarted after the window's end, it re-published the plan but
resumed the check-in phase with the window already over and closed it at once, before any
device could answer the plan (or the broker redeliver queued check-ins): an empty cohort and
an abandoned round. A resumed check-in phase now opens its window again.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.checkpoint import LEDGER_FILE, RoundEnd, read_ledger
from aggregator_testkit import ScriptedFleet, dyadic_update, fake_bundle, update_bytes, wait_until
from protocol.signing import write_keypair

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["p", "q", "r", "s"]


@pytest.mark.mosquitto
def test_kill_9_in_the_checkin_window_keeps_the_queued_checkins(tmp_path, mosquitto):
    bundle = fake_bundle()
    bundle.write(tmp_path / "model.fbz")
    key_path, _ = write_keypair(tmp_path / "keys")
    cmd = [sys.executable, "-m", "aggregator.commands", "aggregator", "--broker", f"127.0.0.1:{mosquitto.port}",
           "--bundle", str(tmp_path / "model.fbz"), "--key", str(key_path), "--checkpoint-dir", str(tmp_path / "state"),
           "--until-round", "1", "--fleet", "ckill", "--clients-per-round", "4", "--over-selection", "1.0",
           "--checkin-window-s", "3", "--expected-checkins", "4", "--report-deadline-s", "30", "--codec", "f32"]
    fleet = ScriptedFleet(mosquitto.port, "ckill", DEVICES, checkin=False, client_id="fleet-ckill")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: 1 in fleet.plans, 30, "the plan of round 1")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    time.sleep(3.5)  # down for longer than the check-in window
    second = subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp_path / "second.log", "w"), stderr=subprocess.STDOUT)
    try:
        # the devices answer the plan the restarted aggregator publishes again (some while it was
        # down, queued for its session; the rest once it is back)
        fleet.check_in(DEVICES[0], fleet.plans[1])
        wait_until(lambda: "aggregator of fleet ckill running" in (tmp_path / "second.log").read_text(), 30,
                   "the restarted aggregator")
        for device in DEVICES[1:]:
            fleet.check_in(device, fleet.plans[1])
        wait_until(lambda: len(fleet.selected(1)) == 4, 30, "the cohort of the resumed round")
        for i, device in enumerate(DEVICES):
            fleet.send(device, update_bytes("ckill", device, 1, 0, dyadic_update(i, bundle.param_count)))
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            second.kill()
        fleet.stop()
    log = (tmp_path / "second.log").read_text()
    assert "resuming round 1 (checkin phase)" in log and "round 1: committed v1 4/4 reports" in log, log
    assert read_ledger(tmp_path / "state" / LEDGER_FILE).ends == [RoundEnd(1, 1, True, 4)]
