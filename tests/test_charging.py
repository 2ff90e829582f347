import numpy as np
import pytest

from device_sim.charging import ChargingModel, ChargingSpec, merge
from device_sim.clock import DAY_S, DEFAULT_START_S, HOUR_S, local_hour

DAYS = 60


def plugged_share_by_hour(model, offset_s, days=DAYS):
    hours = np.zeros(24)
    for d in range(days):
        for h in range(24):
            t = DEFAULT_START_S + d * DAY_S + h * HOUR_S + 1800 - offset_s
            hours[h] += model.plugged_at(t)
    return hours / days


def test_phones_charge_overnight_in_their_own_time_zone():
    spec = ChargingSpec(overnight_prob=0.9, desk_prob=0.0)
    for offset_h in (0, 8, -5):
        model = ChargingModel(spec, seed=1, index=4, utc_offset_s=offset_h * HOUR_S)
        share = plugged_share_by_hour(model, offset_h * HOUR_S)
        assert share[3] > 0.8, share   # 03:30 local: on the charger
        assert share[15] == 0.0         # 15:30 local: never (no desk charging)
        assert share[9] < 0.1


def test_overnight_probability_is_respected():
    spec = ChargingSpec(overnight_prob=0.5, desk_prob=0.0)
    share = np.mean([plugged_share_by_hour(ChargingModel(spec, 0, i, 0.0), 0.0, days=40)[3] for i in range(10)])
    assert share == pytest.approx(0.5, abs=0.08)


def test_desk_charging_only_on_weekdays():
    spec = ChargingSpec(overnight_prob=0.0, desk_prob=1.0, desk_h=13.0, desk_jitter_h=0.0, desk_len_h=2.0)
    model = ChargingModel(spec, seed=0, index=0, utc_offset_s=0.0)
    for d in range(14):
        day = int(DEFAULT_START_S // DAY_S) + d
        sessions = model.sessions(day)
        weekend = d % 7 >= 5  # the start is a Monday
        assert (len(sessions) == 0) == weekend
        for a, _ in sessions:
            assert local_hour(a, 0.0) == pytest.approx(13.0)


def test_mains_powered_is_always_plugged():
    model = ChargingModel(ChargingSpec(mains_powered=True), 0, 0, 0.0)
    assert all(model.plugged_at(DEFAULT_START_S + k * 3571.0) for k in range(200))
    assert model.intervals(10.0, 20.0) == [(10.0, 20.0)]
    assert model.next_change(10.0) == float("inf")


def test_same_seed_same_sessions_and_intervals_match_point_queries():
    a = ChargingModel(ChargingSpec(), 3, 9, 3600.0)
    b = ChargingModel(ChargingSpec(), 3, 9, 3600.0)
    t0, t1 = DEFAULT_START_S, DEFAULT_START_S + 5 * DAY_S
    intervals = a.intervals(t0, t1)
    assert intervals == b.intervals(t0, t1)
    assert intervals != ChargingModel(ChargingSpec(), 4, 9, 3600.0).intervals(t0, t1)
    for t in np.linspace(t0, t1, 500):
        inside = any(x <= t < y for x, y in intervals)
        assert inside == a.plugged_at(t)
    first_change = a.next_change(t0)
    assert a.plugged_at(first_change - 1) != a.plugged_at(first_change + 1)


def test_merge_unions_overlaps():
    assert merge([(5, 7), (1, 3), (2, 4), (7, 8)]) == [(1, 4), (5, 8)]


@pytest.mark.parametrize("bad", [dict(overnight_prob=1.5), dict(plug_h=5.0), dict(desk_len_h=0.0),
                                 dict(unplug_jitter_h=-1.0)])
def test_bad_spec_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ChargingSpec(**bad)
