"""No silent surprises: a cohort larger than the fleet is cut to the fleet, with one warning, and the
report says both what ran and what was asked."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from device_sim.simulate import SimConfig, fit_cohort, run_simulation

ROOT = Path(__file__).resolve().parents[1]
WARNING = "--clients-per-round 20 is more than the 3 device(s) of the fleet: running 3 per round"


def test_a_three_device_fleet_with_20_per_round_warns_once_and_reports_what_ran(tmp_path, cache_dir):
    """--devices 3 makes the fleet as small as a 3-user corpus does (the fleet is the users with
    training text, capped by --devices); the tiny model is the one tests/test_simulate.py exports."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "device_sim.cli", "simulate", "--devices", "3", "--clients-per-round", "20",
         "--rounds", "2", "--vocab-size", "300", "--embed-dim", "16", "--units", "32", "--seed", "3",
         "--no-progress", "--deadline-s", "120", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(WARNING) == 1, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["devices"] == 3
    assert report["clients_per_round"] == 3 and report["clients_per_round_requested"] == 20
    assert report["config"]["clients_per_round"] == 20  # the settings as asked
    assert [(r["participants"], r["committed"]) for r in report["per_round"]] == [(3, True), (3, True)]


def test_a_cohort_within_the_fleet_is_left_alone_and_the_report_says_so(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.WARNING, logger="device_sim.simulate")
    report = run_simulation(SimConfig(out=str(tmp_path), devices=6, rounds=1, clients_per_round=3, vocab_size=300,
                                      embed_dim=16, units=32, seed=3, progress=False, report_deadline_s=120.0))
    assert report["clients_per_round"] == report["clients_per_round_requested"] == 3
    assert report["partial"] is False and "stopped_by" not in report
    assert not [r for r in caplog.records if "clients-per-round" in r.getMessage()]


def test_fit_cohort_keeps_the_report_floor_within_the_fleet(caplog):
    caplog.set_level(logging.WARNING, logger="device_sim.simulate")
    cfg = SimConfig(clients_per_round=20, min_reports=15)
    fitted = fit_cohort(cfg, 3)
    assert (fitted.clients_per_round, fitted.min_reports) == (3, 3)
    assert [r.getMessage() for r in caplog.records] == [WARNING]
    assert fit_cohort(cfg, 20) is cfg and fit_cohort(cfg, 500) is cfg
