import numpy as np
import pytest

from device_sim.compute import ComputeSpec, Thermal


def test_speed_factors_are_lognormal_around_the_median():
    spec = ComputeSpec(factor_median=3.0, factor_sigma=0.3)
    rng = np.random.default_rng(0)
    factors = np.array([spec.draw_factor(rng) for _ in range(4000)])
    assert np.median(factors) == pytest.approx(3.0, rel=0.03)
    assert np.std(np.log(factors)) == pytest.approx(0.3, rel=0.05)
    assert ComputeSpec(factor_sigma=0.0).draw_factor(rng) == 1.0


def test_training_heats_the_cpu_and_it_cools_down_afterwards():
    spec = ComputeSpec(temp_idle_c=30, temp_training_rise_c=40, heat_tau_s=100)
    thermal = Thermal(spec, 0.0)
    assert thermal.temp_at(0.0) == 30
    thermal.trained(100.0, 100.0)
    assert thermal.temp_at(100.0) == pytest.approx(30 + 40 * (1 - np.exp(-1)))
    thermal.trained(200.0, 100.0)  # back to back: keeps heating
    assert thermal.temp_at(200.0) == pytest.approx(30 + 40 * (1 - np.exp(-2)))
    assert thermal.temp_at(200.0 + 1000) < 30.01


def test_long_training_on_a_hot_device_crosses_the_policy_limit():
    spec = ComputeSpec(temp_idle_c=36, temp_training_rise_c=36, heat_tau_s=240)
    thermal = Thermal(spec, 0.0)
    thermal.trained(300.0, 300.0)
    assert thermal.temp_at(300.0) < 70
    thermal.trained(1200.0, 900.0)
    assert thermal.temp_at(1200.0) > 70


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match="factor_median"):
        ComputeSpec(factor_median=0)
    with pytest.raises(ValueError, match="heat_tau_s"):
        ComputeSpec(heat_tau_s=0)
