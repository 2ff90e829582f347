import json
import threading

import pytest

from device_sim.clock import DEFAULT_START_S, HOUR_S, ManualClock
from device_sim.fleet_report import (DropCause, FleetRecorder, FleetRun, drop_cause, plot_device_timelines, plot_fleet,
                                     run_to_dict, summarize, timeline_summary)
from device_sim.profiles import LOW_END_PHONE, PHONE, RASPBERRY_PI
from device_sim.sim_platform import ClientAdapter, SimulatedPlatform
from device_sim.timeline import Event


@pytest.mark.parametrize("reasons, cause", [
    (["not_charging"], DropCause.UNPLUGGED), (["metered_network", "not_charging"], DropCause.WENT_METERED),
    (["no_network"], DropCause.WENT_OFFLINE), ("deadline", DropCause.DEADLINE), (["app_killed"], DropCause.APP_KILLED),
    (["crash"], DropCause.CRASH), (["upload_lost"], DropCause.UPLOAD_LOST), (["client_stopped"], DropCause.OTHER),
    ([], DropCause.OTHER), (["unplugged"], DropCause.UNPLUGGED),
])
def test_drop_causes_from_client_reasons(reasons, cause):
    assert drop_cause(reasons) is cause


def scripted_run():
    """Three rounds of six devices, as DeviceClient events and simulator calls would report them."""
    clock = ManualClock(DEFAULT_START_S + 22 * HOUR_S)
    profiles = [PHONE, PHONE, RASPBERRY_PI, RASPBERRY_PI, LOW_END_PHONE, PHONE]
    platforms = {f"d{i}": SimulatedPlatform(p, clock, 0, i) for i, p in enumerate(profiles)}
    recorder = FleetRecorder("scripted")
    for device, platform in platforms.items():
        recorder.register(device, platform.kind, platform)
    adapters = {d: ClientAdapter(p, device_id=d, on_eligibility=recorder.eligibility) for d, p in platforms.items()}
    for round_id in (1, 2, 3):
        recorder.round_started(round_id, clock.now())
        for device, adapter in adapters.items():
            adapter.eligibility(False)
        recorder.on_event("ineligible", {"device": "d5", "round": round_id, "reasons": ["not_charging", "not_idle"]})
        for device in ("d0", "d1", "d2", "d3", "d4"):
            recorder.on_event("selected", {"device": device, "round": round_id})
        platforms["d0"].on_training_steps(20)
        recorder.on_event("sent", {"device": "d0", "round": round_id, "bytes": 1000})
        recorder.on_event("abandoned", {"device": "d1", "round": round_id, "reasons": ["not_charging"]})
        recorder.on_event("sent", {"device": "d2", "round": round_id, "bytes": 2000})
        if round_id == 2:
            recorder.on_event("ack", {"device": "d2", "round": round_id, "accepted": False, "reason": "norm"})
        recorder.dropped(round_id, "d3", "upload_lost")
        if round_id == 3:
            recorder.on_event("sent", {"device": "d5", "round": round_id, "bytes": 10})
            recorder.on_event("ack", {"device": "d5", "round": round_id, "accepted": False, "reason": "round_closed"})
        clock.advance(1800)
        recorder.round_ended(round_id, clock.now(), committed=round_id != 3)   # d4: never heard of
    return recorder, platforms, clock


def test_summary_counts_participation_reasons_and_causes():
    recorder, platforms, clock = scripted_run()
    run = recorder.finish(timelines_for=["d0", "d2"])
    s = summarize(run)
    json.dumps(s)
    assert s["devices"] == 6 and s["devices_by_kind"] == {"lowend": 1, "phone": 3, "pi": 2}
    assert s["rounds"] == 3 and s["participation"]["committed_rounds"] == 2
    assert [r["selected"] for r in s["per_round"]] == [5, 5, 5]
    assert [r["reported"] for r in s["per_round"]] == [2, 1, 2]
    assert s["per_round"][1]["dropped_by_cause"] == {"unplugged": 1, "rejected": 1, "upload_lost": 1, "no_report": 1}
    assert s["dropouts_by_cause"]["no_report"] == 3 and s["dropouts_by_cause"]["unplugged"] == 3
    assert s["per_round"][2]["dropped_by_cause"]["round_closed"] == 1
    assert s["eligibility_reasons"]["not_charging"] >= 3 and s["eligibility_reasons"]["not_idle"] >= 3
    assert s["participation"]["dropout_rate"] == pytest.approx(1 - 5 / 15)
    d0 = next(d for d in run.devices if d.device == "d0")
    assert d0.rounds_reported == 3 and d0.battery_spent_mah > 0 and d0.uplink_bytes == 0
    assert s["battery_spent"]["by_kind"]["pi"]["devices_with_battery"] == 0
    assert s["battery_spent"]["by_kind"]["phone"]["spent_mah"]["max"] == pytest.approx(platforms["d0"].battery_spent_mah)
    assert set(run.timelines) == {"d0", "d2"} and s["timelines"]["pi"]["devices"] == 1
    json.dumps(run_to_dict(run))


def test_plots_are_written(tmp_path):
    recorder, _, _ = scripted_run()
    paths = plot_fleet(recorder.finish(timelines_for=["d0", "d1", "d2"]), tmp_path)
    assert [p.name for p in paths] == ["fleet_participation.png", "fleet_eligibility.png", "fleet_battery.png",
                                       "fleet_device_timelines.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_timeline_summary_shares_add_up():
    clock = ManualClock()
    phone = SimulatedPlatform(PHONE, clock, 0, 1)
    t1 = DEFAULT_START_S + 48 * HOUR_S
    summary = timeline_summary({"p": phone.timeline(t1)}, {"p": "phone"}, DEFAULT_START_S, t1)["phone"]
    links = sum(summary[f"share_{k}"] for k in ("wired", "wifi", "cellular", "offline"))
    assert links == pytest.approx(1.0)
    assert 0.0 < summary["share_plugged"] < 0.7 and 0.0 < summary["share_in_use"] < 0.5
    assert summary["unplugged"] >= 1 and summary["link_changes"] > 5


def test_device_timelines_plot_needs_events(tmp_path):
    with pytest.raises(ValueError, match="no events"):
        plot_device_timelines({"x": []}, tmp_path / "t.png")
    path = plot_device_timelines({"x": [Event(0.0, "plugged"), Event(3600.0, "unplugged")]}, tmp_path / "t.png")
    assert path.exists()


def test_recorder_is_safe_under_concurrent_events():
    recorder = FleetRecorder()
    recorder.round_started(1)
    def worker(k):
        for i in range(500):
            device = f"d{k}-{i}"
            recorder.on_event("selected", {"device": device, "round": 1})
            recorder.on_event("sent", {"device": device, "round": 1, "bytes": 10})
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.round_ended(1, committed=True)
    s = summarize(recorder.finish())
    assert s["per_round"][0]["reported"] == 2000 and s["per_round"][0]["uplink_bytes"] == 20000


def test_empty_run_summarizes_and_plots(tmp_path):
    run = FleetRun("empty", [], [])
    assert summarize(run)["participation"]["dropout_rate"] == 0.0
    assert len(plot_fleet(run, tmp_path)) == 3
