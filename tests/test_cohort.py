"""Cohort selection and pace steering."""
import numpy as np
import pytest

from aggregator.cohort import PaceSteering, select_cohort
from aggregator.config import AggregatorConfig


def test_selection_is_seeded_uniform_and_never_larger_than_asked():
    devices = [f"d{i:03d}" for i in range(100)]
    a = select_cohort(devices, 26, np.random.default_rng(1))
    assert a == select_cohort(list(reversed(devices)), 26, np.random.default_rng(1))  # order does not matter
    assert len(a) == len(set(a)) == 26 and set(a) <= set(devices)
    assert select_cohort(devices[:3], 26, np.random.default_rng(1)) == devices[:3]
    assert select_cohort([], 5, np.random.default_rng(1)) == []
    counts = dict.fromkeys(devices, 0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        for d in select_cohort(devices, 10, rng):
            counts[d] += 1
    assert 15 < min(counts.values()) and max(counts.values()) < 70  # expected 40 each


def test_over_selection_goal_and_needed_reports():
    cfg = AggregatorConfig(clients_per_round=20)
    assert cfg.cohort_size(100) == 26 and cfg.cohort_size(10) == 10
    assert cfg.goal(26) == 20 and cfg.goal(10) == 10
    assert cfg.needed_reports(26) == 20 and cfg.needed_reports(0) == 1
    assert AggregatorConfig(clients_per_round=20, min_reports=15).needed_reports(26) == 15
    assert AggregatorConfig(clients_per_round=3, over_selection=1.0).cohort_size(6) == 3
    with pytest.raises(ValueError, match="over_selection"):
        AggregatorConfig(over_selection=0.5)


def test_pace_steering_spreads_a_large_population_and_keeps_a_small_one_coming():
    pace = PaceSteering(checkins_per_slot=2.0, max_skip_rounds=8, seed=0)
    assert pace.retry_after(10, 0.0) == 0.0  # nothing learned yet: come back next round
    for d in range(20):
        pace.observe_checkin(f"d{d}")
    pace.observe_round(60.0)
    assert pace.spread_rounds(13) == 1.0  # 20 devices, 26 wanted per window: everyone, every round
    assert pace.retry_after(13, 10.0) == 0.0
    for d in range(1000):
        pace.observe_checkin(f"d{d}")
    assert pace.spread_rounds(13) == 8.0  # 1000 / 26 capped at 8 rounds
    retries = np.array([pace.retry_after(13, 10.0) for _ in range(2000)])
    assert retries.min() >= 50.0 and retries.max() <= 50.0 + 7 * 60.0  # from the next round on, over 7 more
    # spread evenly: about the same number of devices come back in each later round
    per_round = np.histogram((retries - 50.0) // 60.0, bins=7, range=(0, 7))[0]
    assert per_round.min() > 200


def test_period_is_a_moving_average_and_population_forgets_old_rounds():
    pace = PaceSteering(memory_rounds=2, smoothing=0.5)
    pace.observe_checkin("a")
    pace.observe_round(10.0)
    pace.observe_round(20.0)
    assert pace.period_s == 15.0
    assert pace.population == 0  # "a" was seen three rounds ago
