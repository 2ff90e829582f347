import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.local_dp import (
    LocalDPConfig, clip_to_norm, expected_noise_norm, gaussian_delta, gaussian_epsilon, gaussian_sigma,
    privatize_update,
)


def test_clip_to_norm():
    x = np.array([3.0, 4.0], np.float32)
    out, norm, within = clip_to_norm(x, 1.0)
    assert norm == 5.0 and not within
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)
    assert x.tolist() == [3.0, 4.0]  # input untouched
    out, norm, within = clip_to_norm(x, 10.0)
    assert within and out.tolist() == [3.0, 4.0]
    with pytest.raises(ValueError):
        clip_to_norm(np.array([np.nan], np.float32), 1.0)
    with pytest.raises(ValueError):
        clip_to_norm(x, 0.0)


def test_privatized_update_is_clipped_plus_noise_of_the_configured_std():
    cfg = LocalDPConfig(clip=0.5, noise_multiplier=2.0)
    x = np.full(100_000, 1.0, np.float32)
    res = privatize_update(x, cfg, np.random.default_rng(0))
    assert res.sigma == 1.0 and not res.within_clip and res.norm == pytest.approx(math.sqrt(1e5))
    noise = res.update - np.full(100_000, 0.5 / math.sqrt(1e5), np.float32)
    assert noise.std() == pytest.approx(1.0, rel=0.01)
    assert res.update.dtype == np.float32


def test_budget_gives_the_exact_gaussian_sigma():
    sigma = gaussian_sigma(1.0, 1e-5, 1.0)
    assert sigma == pytest.approx(3.7306, abs=1e-3)  # below the classic sqrt(2 ln(1.25/delta)) = 4.84
    assert gaussian_delta(1.0, sigma, 1.0) == pytest.approx(1e-5, rel=1e-6)
    assert gaussian_epsilon(2.0, 1e-5, 1.0) == pytest.approx(1.9931, abs=1e-3)
    cfg = LocalDPConfig(clip=1.0, epsilon=8.0, delta=1e-5)
    assert cfg.sensitivity == 2.0
    assert cfg.epsilon_after(1) == pytest.approx(8.0, rel=1e-6)
    assert cfg.epsilon_after(10) > 8.0 * 3  # repeated participation spends budget


def test_local_noise_swamps_a_reference_size_update():
    cfg = LocalDPConfig(clip=1.0, epsilon=8.0, delta=1e-5)
    noise = expected_noise_norm(781_068, cfg.sigma)
    assert noise > 1000 * cfg.clip  # the documented utility cost
    rng = np.random.default_rng(1)
    x = rng.standard_normal(20_000).astype(np.float32)
    x /= np.linalg.norm(x)
    private = [privatize_update(x, cfg, rng).update for _ in range(20)]
    mean = np.mean(private, axis=0)
    cosine = float(np.dot(mean, x) / np.linalg.norm(mean))
    assert cosine < 0.1  # 20 devices sending the SAME update still do not reveal its direction


def test_config_requires_one_kind_of_noise():
    for bad in (dict(clip=1.0), dict(clip=1.0, epsilon=1.0), dict(clip=1.0, epsilon=1.0, delta=1e-5,
                                                                    noise_multiplier=1.0),
                dict(clip=0.0, noise_multiplier=1.0), dict(clip=1.0, epsilon=-1.0, delta=1e-5),
                dict(clip=1.0, epsilon=1.0, delta=2.0)):
        with pytest.raises(ValueError):
            LocalDPConfig(**bad)


def test_local_dp_does_not_import_tensorflow_or_scipy():
    code = "import sys, edge_client.local_dp; print('tensorflow' in sys.modules, 'scipy' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
