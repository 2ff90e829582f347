"""The burst-load bench in small: 100 devices publish their update at once; none may be lost.

bench/burst_load.py runs 1,000 devices by hand; this runs the same code path (real Mosquitto,
a real `fedboard aggregator` process with checkpoints, one MQTT connection per device) with
100, so a change that drops updates under a burst, or that makes the aggregator's memory
follow the backlog instead of its bounded inbox, fails in CI.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.burst_load import main  # noqa: E402

pytestmark = pytest.mark.mosquitto


def test_a_burst_of_100_updates_is_counted_whole_with_bounded_aggregator_memory(tmp_path):
    out = tmp_path / "burst.json"
    # --cold-heap: do not retune this pytest process's malloc for the rest of the session
    assert main(["--devices", "100", "--cold-heap", "--intake-buffer-mb", "8", "--timeout-s", "120",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["publish_errors"] == {} and report["aggregator_exit"] == 0
    assert report["acked_accepted"] == 100 and report["acked_rejected"] == 0 and report["updates_lost"] == 0
    assert report["ack_messages"] == 100  # one ack per update, no duplicates
    assert "committed v1 100/100 reports" in " ".join(report["aggregator_output_tail"])
    rss = report["aggregator_rss_mb"]
    # 100 updates of 0.8 MB = 80 MB went through; the aggregator holds an 8 MB inbox and one
    # decode buffer, so its growth stays far below the 80 MB it received
    assert rss["peak_during_burst"] - rss["before_burst"] < 60, rss
