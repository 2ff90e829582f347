import math

import numpy as np
import pytest

from device_sim.failures import FailureModel, FailureSpec

N = 20000


def test_crash_rate_matches_the_configured_probability():
    model = FailureModel(FailureSpec(crash_per_round=0.07), seed=0, index=3)
    rate = np.mean([model.crashes(r) for r in range(N)])
    assert rate == pytest.approx(0.07, abs=4 * math.sqrt(0.07 * 0.93 / N))


def test_kill_probability_per_training_minute_matches():
    p = 0.02
    models = [FailureModel(FailureSpec(kill_per_train_min=p), seed=1, index=i) for i in range(200)]
    one_minute = np.mean([m.killed_during(r, 0.0, 60.0) for m in models for r in range(100)])
    assert one_minute == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / N))
    ten_minutes = np.mean([m.killed_during(r, 0.0, 600.0) for m in models for r in range(100)])
    expected = 1 - (1 - p) ** 10
    assert ten_minutes == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / N))


def test_asking_step_by_step_gives_the_same_kill_as_asking_once():
    model = FailureModel(FailureSpec(kill_per_train_min=0.3), seed=2, index=0)
    for round_id in range(50):
        whole = model.killed_during(round_id, 0.0, 300.0)
        stepwise = any(model.killed_during(round_id, k * 7.5, 7.5) for k in range(40))
        assert whole == stepwise
        kill = model.kill_after_s(round_id)
        assert whole == (kill <= 300.0)


def test_upload_loss_rate_and_cut_position():
    model = FailureModel(FailureSpec(upload_loss=0.1), seed=0, index=0)
    cuts = [model.upload_cut_at(r) for r in range(N)]
    lost = [c for c in cuts if c is not None]
    assert len(lost) / N == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / N))
    assert 0.0 <= min(lost) and max(lost) < 1.0 and np.mean(lost) == pytest.approx(0.5, abs=0.03)
    assert model.upload_cut_at(5, attempt=0) == model.upload_cut_at(5, attempt=0)


def test_zero_rates_never_fail_and_draws_are_deterministic():
    quiet = FailureModel(FailureSpec(kill_per_train_min=0, crash_per_round=0, upload_loss=0), 0, 0)
    assert not any(quiet.crashes(r) or quiet.killed_during(r, 0, 1e6) or quiet.upload_cut_at(r) for r in range(100))
    assert quiet.kill_after_s(1) == math.inf
    a, b = FailureModel(FailureSpec(), 9, 9), FailureModel(FailureSpec(), 9, 9)
    assert [a.kill_after_s(r) for r in range(20)] == [b.kill_after_s(r) for r in range(20)]


def test_probabilities_are_checked():
    with pytest.raises(ValueError, match="crash_per_round"):
        FailureSpec(crash_per_round=1.5)
