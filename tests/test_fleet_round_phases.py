"""Round phases: the idle-time split of device_sim/round_profile.py, and the aggregator's phase
marks and late "not selected" answers that it relies on (against a real Mosquitto)."""
import threading

import pytest

from aggregator.server import STEER_DELAY_S, Aggregator, AggregatorConfig
from aggregator_testkit import ScriptedFleet, dyadic_update, fake_bundle, keypair, update_bytes, wait_until
from device_sim.round_profile import PHASE_NAMES, idle_by_phase, overhead_table
from protocol.transport import MqttSettings


def busy_from(intervals):
    """Leased interpreter-seconds inside [a, b], as TimedPool.busy_s computes them."""
    return lambda a, b: sum(max(0.0, min(e, b) - max(s, a)) for s, e in intervals)


def test_idle_time_is_split_by_phase_and_adds_up():
    # two interpreters, round [0, 10]: the plan at 1, window closed at 3, cohort told at 3.5,
    # first lease at 4, last report at 9; one interpreter trains 4-9, the other 4.5-8
    leases = [(4.0, 9.0), (4.5, 8.0)]
    marks = {"opened": 1.0, "window_closed": 3.0, "assigned": 3.5, "reports_closed": 9.0, "published": 9.5}
    idle = idle_by_phase(busy_from(leases), 2, 0.0, 10.0, marks, first_lease=4.0)
    assert list(idle) == list(PHASE_NAMES)
    assert idle == pytest.approx({"prepare": 2.0, "checkin": 4.0, "assign": 1.0, "first_model": 1.0,
                                  "training": 10.0 - 8.5, "commit": 2.0})
    assert sum(idle.values()) == pytest.approx(2 * 10.0 - busy_from(leases)(0.0, 10.0))


def test_a_missing_mark_merges_its_phase_into_the_next():
    # a resumed round has no "opened" or "window_closed": their idle time lands in "assign"
    idle = idle_by_phase(busy_from([(5.0, 8.0)]), 1, 0.0, 8.0, {"assigned": 2.0, "reports_closed": 8.0}, 5.0)
    assert idle["prepare"] == idle["checkin"] == 0.0
    assert idle["assign"] == pytest.approx(2.0) and idle["first_model"] == pytest.approx(3.0)
    assert sum(idle.values()) == pytest.approx(5.0)


def test_overhead_table_shares_add_up_to_the_overall_overhead():
    rows = [{"pool_size": 2, "round_wall_s": 10.0, "pool_busy_s": 15.0,
             "idle_by_phase": {"checkin": 3.0, "training": 2.0}},
            {"pool_size": 2, "round_wall_s": 5.0, "pool_busy_s": 9.0, "idle_by_phase": {"checkin": 1.0}}]
    table = overhead_table(rows)
    assert table["checkin"] == {"idle_s": 4.0, "share": round(4.0 / 30.0, 4)}
    overall = 1 - (15.0 + 9.0) / 30.0
    assert sum(v["share"] for v in table.values()) == pytest.approx(overall, abs=1e-3)


@pytest.mark.mosquitto
def test_the_cohort_hears_first_and_the_others_once_it_trains(mosquitto):
    """The devices not selected get their answer after the cohort's: when the first update is
    in, or after STEER_DELAY_S when none comes; the round's phase marks come in order."""
    devices = [f"d{i}" for i in range(6)]
    key, _ = keypair()
    config = AggregatorConfig(fleet="phases", clients_per_round=2, over_selection=1.0, checkin_window_s=5.0,
                              expected_checkins=len(devices), report_deadline_s=20.0, codec="f32")
    agg = Aggregator(config, fake_bundle(), MqttSettings(port=mosquitto.port), key)
    agg.start()
    fleet = ScriptedFleet(mosquitto.port, "phases", devices, client_id="phases-fleet")
    try:
        for round_id in (1, 2):
            results = []
            runner = threading.Thread(target=lambda: results.append(agg.run_round()))
            runner.start()
            wait_until(lambda: len(fleet.selected(round_id)) == 2, 10, "the cohort's assignments")
            cohort = fleet.selected(round_id)
            if round_id == 1:  # nobody reports yet: the others hear after STEER_DELAY_S
                wait_until(lambda: len(fleet.assignments[round_id]) == len(devices), STEER_DELAY_S + 5, "answers")
            for i, device in enumerate(cohort):
                fleet.send(device, update_bytes("phases", device, round_id, round_id - 1,
                                                dyadic_update(i, agg.dim)))
            runner.join(20)
            assert results and results[0].committed
            # sent before the round returned; give the last ones time to arrive
            wait_until(lambda: len(fleet.assignments[round_id]) == len(devices), 5, "every answer")
            with fleet._lock:
                order = list(fleet.assignments[round_id])  # one connection: arrival order
                answers = dict(fleet.assignments[round_id])
            assert order[:2] == cohort and len(order) == len(devices)
            others = [answers[d] for d in order[2:]]
            assert all(not a.selected and a.reason == "not_selected" for a in others)
            if round_id == 2:  # one round observed: pace steering spreads the 4 others over later rounds
                assert all(a.retry_after_s > 0 for a in others)
            marks = results[0].phase_marks
            names = ["opened", "window_closed", "assigned", "steered", "reports_closed", "published"]
            assert list(sorted(marks, key=marks.get)) == names
    finally:
        fleet.stop()
        agg.stop()
