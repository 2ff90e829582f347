"""Metrics: a private Prometheus registry with its own endpoint, and strict JSON lines."""
import json
import urllib.request

import pytest

from aggregator.metrics import AggregatorMetrics, JsonLines


def test_two_aggregators_keep_separate_registries_and_endpoints():
    a, b = AggregatorMetrics("fleet-a"), AggregatorMetrics("fleet-a")
    a.rejected("norm_too_large")
    a.c(a.updates_accepted).inc(3)
    a.round_ended({"committed": True, "version": 4, "round": 5, "participants": 3, "cohort": 4, "wall_s": 1.5,
                   "eval": {"top3": 0.25}, "fed_eval": {}})
    port = a.serve(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        a.close()
    assert 'fedboard_updates_rejected_total{fleet="fleet-a",reason="norm_too_large"} 1.0' in text
    assert 'fedboard_updates_accepted_total{fleet="fleet-a"} 3.0' in text
    assert 'fedboard_rounds_total{fleet="fleet-a",outcome="committed"} 1.0' in text
    assert 'fedboard_eval{fleet="fleet-a",metric="top3",source="eval"} 0.25' in text
    assert b.updates_accepted.labels("fleet-a")._value.get() == 0  # nothing leaked into the other


def test_json_lines_are_strict_json(tmp_path):
    log = JsonLines(tmp_path / "sub" / "rounds.jsonl")
    log.write({"round": 1, "train_loss": float("nan"), "eval": {"top3": 0.5}, "ids": ("a", "b")})
    log.write({"round": 2, "train_loss": 1.25})
    lines = (tmp_path / "sub" / "rounds.jsonl").read_text().splitlines()
    first = json.loads(lines[0], parse_constant=pytest.fail)
    assert first["train_loss"] is None and first["eval"] == {"top3": 0.5} and first["ids"] == ["a", "b"]
    assert json.loads(lines[1])["train_loss"] == 1.25
