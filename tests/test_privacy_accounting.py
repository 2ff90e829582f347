import math

import numpy as np
import pytest
from scipy.stats import norm

from aggregator.privacy_accounting import (
    PrivacyAccountant, epsilon_for, noise_multiplier_for, sampling_probability,
)


def _analytic_gaussian_delta(eps, sigma):
    """Balle & Wang 2018, Theorem 8: the exact delta(eps) of one Gaussian release, sensitivity 1."""
    return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))


def _classic_rdp_epsilon(sigma, delta, rounds=1):
    """Mironov 2017: RDP(a) = a / (2 sigma^2) per round, eps = min_a RDP + log(1/delta) / (a - 1)."""
    return min(rounds * a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 4000))


def test_one_unsampled_round_matches_the_exact_gaussian_mechanism():
    sigma, delta = 2.0, 1e-5
    eps_pld = epsilon_for(1, sigma, 1.0, delta, accountant="pld")
    assert _analytic_gaussian_delta(eps_pld, sigma) == pytest.approx(delta, rel=1e-3)
    assert eps_pld == pytest.approx(1.9931, abs=1e-3)  # hand-checked with the formula above
    eps_rdp = epsilon_for(1, sigma, 1.0, delta)
    assert eps_pld <= eps_rdp <= _classic_rdp_epsilon(sigma, delta) + 1e-6


def test_rounds_compose_like_one_gaussian_with_sigma_over_sqrt_rounds():
    sigma, rounds, delta = 8.0, 16, 1e-6
    composed = epsilon_for(rounds, sigma, 1.0, delta, accountant="pld")
    single = epsilon_for(1, sigma / math.sqrt(rounds), 1.0, delta, accountant="pld")
    assert composed == pytest.approx(single, rel=5e-3)
    assert composed <= epsilon_for(rounds, sigma, 1.0, delta) <= _classic_rdp_epsilon(sigma, delta, rounds)


def test_sampling_amplifies_and_more_noise_or_fewer_rounds_help():
    q = sampling_probability(20, 309)
    assert q == pytest.approx(0.0647, abs=1e-4)
    full = epsilon_for(100, 1.0, 1.0, 1e-3)
    sampled = epsilon_for(100, 1.0, q, 1e-3)
    assert sampled < full / 5
    assert epsilon_for(50, 1.0, q, 1e-3) < sampled < epsilon_for(100, 0.8, q, 1e-3)
    assert epsilon_for(0, 1.0, q, 1e-3) == 0.0
    assert epsilon_for(3, 0.0, q, 1e-3) == math.inf
    pld = epsilon_for(100, 1.0, q, 1e-3, accountant="pld")
    assert pld <= sampled and pld > 0.7 * sampled  # RDP is the looser, both in the same place


def test_accountant_steps_reports_and_checkpoints():
    acc = PrivacyAccountant(noise_multiplier=1.0, sampling_probability=20 / 309, delta=1e-3)
    assert acc.epsilon() == 0.0
    eps = [acc.step() for _ in range(3)]
    assert eps[0] < eps[1] < eps[2] == acc.epsilon() == pytest.approx(acc.epsilon_for(3))
    report = acc.report()
    assert report["rounds"] == 3 and report["epsilon"] == eps[2]
    assert set(report) >= {"noise_multiplier", "delta", "epsilon", "sampling_probability", "accountant"}
    again = PrivacyAccountant(1.0, 20 / 309, 1e-3)
    again.load_state({k: np.asarray(v) for k, v in acc.state().items()})
    assert again.epsilon() == eps[2]
    with pytest.raises(ValueError):
        PrivacyAccountant(1.1, 20 / 309, 1e-3).load_state(acc.state())
    for bad in (dict(noise_multiplier=-1, sampling_probability=0.1, delta=1e-5),
                dict(noise_multiplier=1, sampling_probability=0.0, delta=1e-5),
                dict(noise_multiplier=1, sampling_probability=0.1, delta=1.0),
                dict(noise_multiplier=1, sampling_probability=0.1, delta=1e-5, accountant="moments")):
        with pytest.raises(ValueError):
            PrivacyAccountant(**bad)


def test_noise_multiplier_for_a_target_budget():
    q, rounds, delta, target = 20 / 309, 300, 1e-3, 5.0
    z = noise_multiplier_for(target, delta, rounds, q)
    assert epsilon_for(rounds, z, q, delta) <= target
    assert epsilon_for(rounds, z * 0.97, q, delta) > target
    assert 0.8 < z < 1.5
    with pytest.raises(ValueError):
        noise_multiplier_for(1e-4, 1e-9, 10_000, 1.0, max_noise=5.0)
