"""The weight bound (aggregator/weights.py) and the report floor (AggregatorConfig.report_floor)."""
import math

import pytest

from aggregator.config import AggregatorConfig, report_floor
from aggregator.weights import WeightBound, allowance


def test_allowance_is_windows_times_epochs_within_the_step_cap():
    assert allowance(10, local_epochs=1) == 10
    assert allowance(10, local_epochs=3) == 30
    assert allowance(10, local_epochs=3, max_steps=2, batch_size=4) == 8  # 2 steps of 4 windows
    assert allowance(-5, local_epochs=2) == 0


def test_a_device_weighs_at_most_its_declaration_and_k_times_the_cohort_median():
    declared = {"a": 10, "b": 12, "c": 8, "liar": 10_000_000}
    bound = WeightBound.for_cohort(declared, factor=2.0, local_epochs=1)
    assert bound.cap == 2.0 * 11  # median of 8, 10, 12, 10,000,000
    assert bound.weight("a", 10) == (10.0, "")                    # honest: untouched
    weight, why = bound.weight("a", 10_000_000)                   # claims more than it declared
    assert weight == 10.0 and "check-in allows 10" in why
    weight, why = bound.weight("liar", 10_000_000)                # declared the lie too: the cohort cap
    assert weight == 22.0 and "cohort cap" in why
    assert bound.weight("stranger", 5)[0] == 0.0                  # no check-in, no weight
    # a lie about its own declaration is logged as such; meeting the cohort cap is not a lie
    assert bound.exceeds_declaration("a", 11) and not bound.exceeds_declaration("liar", 10_000_000)


def test_no_cohort_cap_when_weight_cap_is_zero():
    bound = WeightBound.for_cohort({"a": 1, "b": 1000}, factor=0.0, local_epochs=2)
    assert bound.cap == math.inf and bound.weight("b", 2000) == (2000.0, "")


def test_report_floor_is_half_the_goal_at_least_two_and_min_reports_when_set():
    assert report_floor(20, 0) == 10 and report_floor(3, 0) == 2 and report_floor(2, 0) == 2
    assert report_floor(1, 0) == 1  # a goal of one device is a deliberate choice
    assert report_floor(20, 16) == 16
    assert AggregatorConfig(clients_per_round=20).report_floor() == 10
    assert AggregatorConfig(clients_per_round=4).cohort_target() == 6  # ceil(4 x 1.3)


@pytest.mark.parametrize("settings, match", [
    ({"weight_cap": 0.5}, "weight_cap"), ({"weight_cap": math.inf}, "weight_cap"),
    ({"checkin_patience_s": -1.0}, "checkin_patience_s"),
])
def test_bad_settings_name_the_key(settings, match):
    with pytest.raises(ValueError, match=match):
        AggregatorConfig(**settings)


def test_patience_may_be_infinite():
    assert AggregatorConfig(checkin_patience_s=math.inf).checkin_patience_s == math.inf
