"""`fedboard simulate --scenario`: real DeviceClients on simulated platforms, end to end.

A tiny model and fleet through the embedded broker (amqtt): the scenarios are written here
so every number the assertions rely on is visible.
"""
import threading

import pytest

from device_sim.round_profile import PHASE_NAMES
from device_sim.simulate import SimConfig, config_from_scenario, parse_shard, run_simulation
from edge_client.platform import NetworkType

MODEL = dict(vocab_size=300, embed_dim=16, units=32, progress=False)

# Pis on a wired link, idle-or-not does not matter: every device is eligible all the time.
STEADY = """
name = "steady"
seed = 5
[fleet]
devices = {devices}
composition = {{ pi = 1.0 }}
[network.pi]
day = {{ wired = 1.0 }}
[failures]
crash_per_round = {crash}
[corpus]
n_users = 40
[rounds]
rounds = {rounds}
clients_per_round = {goal}
over_selection = {over}
deadline_s = 3600
checkin_window_s = 600
[clock]
speedup = 60
start = "tuesday 10:00"
[training]
base_step_s = 1.0
max_steps = 4
[eligibility]
require_idle = false
"""

PHONES = STEADY.replace("composition = { pi = 1.0 }", "composition = { phone = 1.0 }").replace(
    "[network.pi]\nday = { wired = 1.0 }\n", "")


def write(tmp_path, text, **values):
    path = tmp_path / "scenario.toml"
    path.write_text(text.format(**{"devices": 8, "crash": 0.0, "rounds": 2, "goal": 3, "over": 1.3, **values}))
    return str(path)


def test_scenario_run_reports_the_fleet(tmp_path, cache_dir):
    cfg = config_from_scenario(write(tmp_path, STEADY), out=str(tmp_path / "out"), **MODEL)
    report = run_simulation(cfg)
    fleet = report["fleet"]
    assert fleet["devices"] == 8 and fleet["devices_by_kind"] == {"pi": 8}
    assert [r["committed"] for r in report["per_round"]] == [True, True]
    assert fleet["participation"]["committed_rounds"] == 2
    for row in fleet["per_round"]:
        assert row["eligible"] == 8 and row["selected"] == 4 and row["reported"] >= 3
    # the window closed once the 8 eligible devices checked in, not after its 10 wall seconds
    assert all(r["round_wall_s"] < 9.0 for r in report["per_round"])
    assert 0.0 < report["per_round"][0]["pool_busy_s"] <= report["per_round"][0]["round_wall_s"] * 2
    for r in report["per_round"]:  # the idle interpreter time, split by phase, adds up to the whole
        idle = r["pool_size"] * r["round_wall_s"] - r["pool_busy_s"]
        assert sum(r["idle_by_phase"].values()) == pytest.approx(idle, abs=1e-3)
        assert list(r["idle_by_phase"]) == list(PHASE_NAMES) and min(r["idle_by_phase"].values()) >= 0.0
    assert fleet["uplink_bytes_per_device"]["all"]["total"] > 0
    out = tmp_path / "out"
    assert (out / "report.json").exists() and (out / "accuracy.png").exists()
    assert report["fleet_plots"] and all((out / name).stat().st_size > 1000 for name in report["fleet_plots"])


def test_device_unplugged_mid_training_stops_and_reports_nothing(tmp_path, cache_dir):
    """Phones held eligible by an override; the first to train is unplugged after its first step."""
    victim: dict[str, object] = {}
    lock = threading.Lock()

    def on_start(devices):
        for d in devices:
            d.platform.override(charging=True, idle=True, network=NetworkType.WIFI, metered=False, link_up=True,
                                battery_percent=80.0)
            d.client.eligibility = unplug_after_first_step(d, d.client.eligibility)

    def unplug_after_first_step(d, check):
        calls = [0]

        def eligibility(training):
            if training:
                calls[0] += 1
                with lock:
                    if calls[0] == 2 and not victim:  # one step done: pull the plug
                        victim["device"] = d
                        d.platform.override(charging=False)
            return check(training)

        return eligibility

    cfg = config_from_scenario(write(tmp_path, PHONES, rounds=1, goal=3, over=2.0), out=str(tmp_path), **MODEL)
    report = run_simulation(cfg, on_start=on_start)
    d = victim["device"]
    assert d.client.stats.updates_sent == 0 and d.client.stats.rounds_abandoned == 1
    assert d.platform.train_steps >= 1  # it did train before the plug was pulled
    row = report["fleet"]["per_round"][0]
    assert row["dropped_by_cause"].get("unplugged") == 1
    assert report["per_round"][0]["committed"]  # over-selection covered the loss


def test_round_with_30_percent_dropouts_commits_thanks_to_over_selection(tmp_path, cache_dir):
    """crash_per_round = 0.3 with seed 14 crashes exactly 3 of the 10 selected Pis in each round
    (the draws are per (seed, device, round)); a goal of 5 with a cohort of 10 still commits."""
    cfg = config_from_scenario(write(tmp_path, STEADY, devices=10, crash=0.3, rounds=2, goal=5, over=2.0),
                               out=str(tmp_path), seed=14, **MODEL)
    report = run_simulation(cfg)
    fleet = report["fleet"]
    assert fleet["dropouts_by_cause"]["crash"] == 6
    for row, agg_row in zip(fleet["per_round"], report["per_round"]):
        assert row["selected"] == 10 and row["dropped_by_cause"]["crash"] == 3
        assert agg_row["committed"] and agg_row["participants"] == 5
    assert fleet["participation"]["committed_rounds"] == 2


def _timelines_and_cohorts(tmp_path, name):
    captured = {}

    def on_start(devices):
        captured["platforms"] = {d.device_id: d.platform for d in devices}

    cfg = config_from_scenario(write(tmp_path, STEADY.replace('deadline_s = 3600', 'deadline_s = 3600\nmin_reports = 1'),
                                     rounds=3, goal=3, over=1.5),
                               out=str(tmp_path / name), **MODEL)
    report = run_simulation(cfg, on_start=on_start)
    start = report["scenario"]["clock"]["start_s"]
    environment = {device: [(e.t, e.kind, e.detail) for e in p.timeline(start + 3 * 86400)
                            if e.kind not in ("training", "upload", "upload_lost", "app_killed", "crash", "override")]
                   for device, p in captured["platforms"].items()}
    return environment, report["fleet_cohorts"]


def test_same_seed_gives_the_same_simulated_timeline(tmp_path, cache_dir):
    first = _timelines_and_cohorts(tmp_path, "a")
    second = _timelines_and_cohorts(tmp_path, "b")
    assert first[0] == second[0] and any(len(events) > 3 for events in first[0].values())
    assert first[1] == second[1] and len(first[1]) == 3 and all(len(c) == 5 for c in first[1])


def test_shard_flag_is_checked():
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("4/4")
    with pytest.raises(ValueError, match="--broker"):
        SimConfig(shard=(0, 2))
    assert SimConfig(shard=(1, 2), broker="h:1").runs_aggregator is False
    assert SimConfig(shard=(0, 2), broker="h:1").runs_aggregator is True
    assert SimConfig(aggregator="only").runs_devices is False


@pytest.mark.mosquitto
def test_two_shards_share_one_fleet_through_one_broker(tmp_path, cache_dir, mosquitto):
    """Shard 1 runs devices only and stops when shard 0 (devices + aggregator) says the run is over."""
    path = write(tmp_path, STEADY, devices=12, goal=4, rounds=2, over=1.5)
    common = dict(out=str(tmp_path / "s"), broker=str(mosquitto.address), mqtt_version=5, checkin_window_s=2.0, **MODEL)
    reports = {}
    started = threading.Event()
    shard1 = threading.Thread(target=lambda: reports.setdefault(1, run_simulation(
        config_from_scenario(path, shard=(1, 2), **{**common, "out": str(tmp_path / "s1")}),
        on_start=lambda devices: started.set())))
    shard1.start()
    assert started.wait(60)
    reports[0] = run_simulation(config_from_scenario(path, shard=(0, 2), **{**common, "out": str(tmp_path / "s0")}))
    shard1.join(60)
    assert not shard1.is_alive()
    assert reports[0]["fleet"]["devices"] == 6 and reports[1]["fleet"]["devices"] == 6
    assert all(r["committed"] and r["checkins"] == 12 for r in reports[0]["per_round"])
    assert reports[1]["aggregator"] is False and reports[1]["fleet"]["participation"]["selected_total"] > 0


def test_lost_uploads_are_dropped_by_the_simulated_radio(tmp_path, cache_dir):
    """upload_loss = 1: every trained update is cut off on the link; nothing reaches the aggregator."""
    text = STEADY.replace("crash_per_round = {crash}", "upload_loss = 1.0")
    cfg = config_from_scenario(write(tmp_path, text, rounds=1), out=str(tmp_path), report_deadline_s=3.0, **MODEL)
    report = run_simulation(cfg)
    row, agg_row = report["fleet"]["per_round"][0], report["per_round"][0]
    assert row["selected"] == 4 and row["dropped_by_cause"] == {"upload_lost": 4} and row["reported"] == 0
    assert agg_row["participants"] == 0 and not agg_row["committed"] and agg_row["uplink_bytes"] == 0


def test_scenario_settings_apply_unless_overridden():
    cfg = config_from_scenario("flaky-network")
    assert (cfg.rounds, cfg.clients_per_round, cfg.over_selection, cfg.min_reports) == (10, 30, 2.0, 24)
    assert (cfg.local_epochs, cfg.client_lr, cfg.seed, cfg.fleet) == (2, 1.0, 2, "flaky-network")
    smaller = config_from_scenario("flaky-network", clients_per_round=10, rounds=3)
    assert (smaller.rounds, smaller.clients_per_round, smaller.min_reports) == (3, 10, 8)  # 24/30 of the goal
