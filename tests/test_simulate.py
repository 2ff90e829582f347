"""End to end: a small fleet, the aggregator and a real broker speaking MQTT in one process."""
import json

import pytest

from device_sim.simulate import SimConfig, run_simulation

TINY = dict(devices=6, rounds=2, clients_per_round=3, vocab_size=300, embed_dim=16, units=32, seed=3,
            progress=False, report_deadline_s=120.0)

REQUIRED = ["task", "model", "params", "rounds", "clients_per_round", "local_epochs", "batch_size", "codec", "top1",
            "top3", "per_round", "uplink_bytes_total", "downlink_bytes_total", "uplink_bytes_per_update",
            "float32_bytes_per_update", "wall_s", "peak_rss_mb", "platform", "cpu_count"]


def check_report(report, out):
    for key in REQUIRED:
        assert key in report, key
    assert len(report["per_round"]) == 2
    for row in report["per_round"]:
        assert row["committed"] and row["participants"] == 3 and row["dropped"] == 0
        assert row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0
        assert 0.0 <= row["top3"] <= 1.0
    # q8 sends about a quarter of float32
    assert report["uplink_bytes_per_update"] < 0.3 * report["float32_bytes_per_update"]
    assert json.loads((out / "report.json").read_text())["rounds"] == 2
    assert (out / "accuracy.png").stat().st_size > 1000


def test_small_fleet_through_embedded_amqtt(tmp_path, cache_dir):
    report = run_simulation(SimConfig(out=str(tmp_path), **TINY))
    check_report(report, tmp_path)


@pytest.mark.mosquitto
def test_small_fleet_through_mosquitto(tmp_path, cache_dir, mosquitto):
    report = run_simulation(SimConfig(out=str(tmp_path), broker=str(mosquitto.address), mqtt_version=5, **TINY))
    check_report(report, tmp_path)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="--rounds"):
        SimConfig(rounds=0)


def test_dp_fedavg_epsilon_lands_in_the_report(tmp_path, cache_dir):
    report = run_simulation(SimConfig(out=str(tmp_path), **{**TINY, "clients_per_round": 3},
                                      aggregation="dp:clip=0.5,noise=1.0,expected=3", over_selection=1.0))
    eps = [row["privacy"]["epsilon"] for row in report["per_round"]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]  # epsilon grows with every DP round
    assert report["per_round"][0]["privacy"]["noise_multiplier"] == 1.0
    assert report["per_round"][0]["privacy"]["delta"] == pytest.approx(1 / 60)  # default: 1 / (10 x 6 devices)


def test_dp_delta_is_the_users_choice(tmp_path, cache_dir):
    """A smaller delta costs a larger epsilon for the same noise: the flag reaches the accountant."""
    common = dict(aggregation="dp:clip=0.5,noise=1.0,expected=3", over_selection=1.0, rounds=1)
    loose = run_simulation(SimConfig(out=str(tmp_path / "a"), **{**TINY, **common}, dp_delta=1e-2))
    strict = run_simulation(SimConfig(out=str(tmp_path / "b"), **{**TINY, **common}, dp_delta=1e-6))
    assert strict["per_round"][0]["privacy"]["delta"] == 1e-6
    assert strict["per_round"][0]["privacy"]["epsilon"] > loose["per_round"][0]["privacy"]["epsilon"]
