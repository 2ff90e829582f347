import numpy as np
import pytest

from device_sim.availability import UsageModel, UsageSpec
from device_sim.clock import DAY_S, DEFAULT_START_S, HOUR_S


def test_users_are_idle_at_night_and_active_a_share_of_the_waking_day():
    spec = UsageSpec(wake_h=7, wake_jitter_h=0.5, sleep_h=23, sleep_jitter_h=0.5, active_mean_min=5, idle_mean_min=15)
    night, day = [], []
    for index in range(20):
        model = UsageModel(spec, seed=0, index=index, utc_offset_s=-5 * HOUR_S)
        for d in range(10):
            base = DEFAULT_START_S + d * DAY_S + 5 * HOUR_S  # local midnight in UTC-5
            night.extend(model.active_at(base + h * HOUR_S + 60 * m) for h in (2, 3, 4) for m in range(0, 60, 10))
            day.extend(model.active_at(base + h * HOUR_S + 60 * m) for h in range(10, 20) for m in range(0, 60, 10))
    assert np.mean(night) == 0.0
    assert np.mean(day) == pytest.approx(spec.active_share_awake, abs=0.04)


def test_weekend_wakes_later():
    spec = UsageSpec(wake_h=7, wake_jitter_h=0.0, weekend_shift_h=2.0)
    model = UsageModel(spec, 0, 0, 0.0)
    monday = int(DEFAULT_START_S // DAY_S)
    wake_mon = model.awake(monday)[0] - monday * DAY_S
    wake_sat = model.awake(monday + 5)[0] - (monday + 5) * DAY_S
    assert wake_mon == pytest.approx(7 * HOUR_S)
    assert wake_sat == pytest.approx(9 * HOUR_S)


def test_intervals_agree_with_point_queries_and_are_deterministic():
    a = UsageModel(UsageSpec(), 5, 2, 3600.0)
    b = UsageModel(UsageSpec(), 5, 2, 3600.0)
    t0, t1 = DEFAULT_START_S, DEFAULT_START_S + 2 * DAY_S
    intervals = a.intervals(t0, t1)
    assert intervals == b.intervals(t0, t1) and len(intervals) > 20
    assert all(x < y for x, y in intervals)
    assert all(y1 <= x2 for (_, y1), (x2, _) in zip(intervals, intervals[1:]))
    for t in np.linspace(t0, t1, 2000):
        assert a.active_at(t) == any(x <= t < y for x, y in intervals)


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match="sleep_h"):
        UsageSpec(wake_h=9, sleep_h=8)
    with pytest.raises(ValueError, match="active_mean_min"):
        UsageSpec(active_mean_min=0)
