"""Local differential privacy on the device: clip the update, add Gaussian noise, THEN encode.

Why it exists: with local DP the device trusts nobody, not even the aggregator; what leaves
the device is already private. Why it is rarely the right choice: the noise must hide the
whole update on its own, where central DP (aggregator/dp.py) hides one device among the
cohort's sum. Per coordinate the local noise std is sigma = sensitivity x (about
sqrt(2 ln(1.25/delta)) / epsilon), with sensitivity 2C (any two updates in the C-ball may be
swapped); over the P = 781,068 coordinates of the reference model the noise vector has norm
about sigma sqrt(P), e.g. epsilon 8, delta 1e-5, C = 1: sigma ~ 1.1, noise norm ~ 1000 against
a signal of norm <= 1. Averaging n devices divides the noise only by sqrt(n). Expect no
learning at epsilons that mean anything; use it for tiny models, or where no server may be
trusted, and prefer central DP with secure aggregation otherwise (see aggregator/PRIVACY.md).

`clip_to_norm` is also what a device runs under central DP WITH secure aggregation: the
server cannot clip an update it cannot see, so the device clips to the announced bound and
reports the bit b = [norm <= clip] for adaptive clipping.

numpy and the standard library only (no scipy, no TensorFlow).

    cfg = LocalDPConfig(clip=1.0, epsilon=8.0, delta=1e-5)
    private = privatize_update(delta, cfg, rng).update     # then codec.encode(private, ...)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalDPConfig:
    """Clip bound and noise: either (epsilon, delta) per release, or a noise multiplier.

    ``noise_multiplier`` z gives sigma = z x clip directly (the central-DP convention);
    (epsilon, delta) gives the smallest sigma for which one release of a clipped update is
    (epsilon, delta)-DP against any change of this device's data (sensitivity 2 x clip),
    by the analytic Gaussian mechanism (Balle and Wang 2018).
    """

    clip: float
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be finite and > 0, got {self.clip!r}")
        by_budget = self.epsilon is not None or self.delta is not None
        if by_budget == (self.noise_multiplier is not None):
            raise ValueError("give either epsilon and delta, or noise_multiplier (not both, not neither)")
        if by_budget:
            if self.epsilon is None or self.delta is None:
                raise ValueError("local DP by budget needs both epsilon and delta")
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon!r}")
            if not 0 < self.delta < 1:
                raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        elif not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier!r}")

    @property
    def sensitivity(self) -> float:
        """L2 distance between any two clipped updates: 2 x clip."""
        return 2.0 * self.clip

    @property
    def sigma(self) -> float:
        """Noise std per coordinate."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier * self.clip
        assert self.epsilon is not None and self.delta is not None
        return gaussian_sigma(self.epsilon, self.delta, self.sensitivity)

    def epsilon_after(self, releases: int) -> float:
        """Epsilon at ``delta`` (or 1e-5 if none was given) after ``releases`` updates from this device."""
        return gaussian_epsilon(self.sigma, self.delta if self.delta is not None else 1e-5, self.sensitivity,
                                releases)


@dataclass(frozen=True)
class LocalDPResult:
    update: np.ndarray   # clipped + noised, float32
    norm: float          # L2 norm before clipping
    within_clip: bool    # b = [norm <= clip]
    sigma: float


def clip_to_norm(update: np.ndarray, clip: float) -> tuple[np.ndarray, float, bool]:
    """(``update`` scaled to L2 norm <= clip as a new float32 array, its norm, norm <= clip)."""
    x = np.asarray(update)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise ValueError(f"update must be a 1-D float array, got {x.dtype}{x.shape}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    norm = float(np.sqrt(np.dot(x.astype(np.float64), x.astype(np.float64))))
    if not math.isfinite(norm):
        raise ValueError("update holds NaN or infinite values: refuse to send it")
    out = x.astype(np.float32, copy=True)
    if norm > clip:
        out *= np.float32(clip / norm)
    return out, norm, norm <= clip


def privatize_update(update: np.ndarray, config: LocalDPConfig, rng: np.random.Generator) -> LocalDPResult:
    """Clip to ``config.clip`` and add N(0, sigma^2) to every coordinate; encode the result.

    Use a generator seeded from the OS (``np.random.default_rng()``), never a seed the
    server knows, or the noise can be subtracted.
    """
    clipped, norm, within = clip_to_norm(update, config.clip)
    sigma = config.sigma
    if sigma > 0:
        clipped += (rng.standard_normal(clipped.shape[0]) * sigma).astype(np.float32)
    log.debug("local dp: norm %.4g (clip %.4g), sigma %.4g", norm, config.clip, sigma)
    return LocalDPResult(clipped, norm, within, sigma)


# -- the Gaussian mechanism, exactly (Balle and Wang 2018) ---------------------------------------
def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, sigma: float, sensitivity: float, releases: int = 1) -> float:
    """Smallest delta for which ``releases`` Gaussian releases (std sigma) are (epsilon, delta)-DP.

    Gaussian releases compose exactly: k of them are one with std sigma / sqrt(k), i.e.
    mu = sensitivity sqrt(k) / sigma, and delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
    """
    if sigma <= 0:
        return 1.0
    mu = sensitivity * math.sqrt(releases) / sigma
    a = _phi(-epsilon / mu + mu / 2)
    tail = _phi(-epsilon / mu - mu / 2)
    b = math.exp(min(epsilon + math.log(tail), 700.0)) if tail > 0 else 0.0
    return max(0.0, a - b)


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float, releases: int = 1) -> float:
    """Smallest epsilon for which the releases are (epsilon, delta)-DP (bisection on `gaussian_delta`)."""
    if sigma <= 0:
        return math.inf
    if gaussian_delta(0.0, sigma, sensitivity, releases) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, sigma, sensitivity, releases) > delta:
        high *= 2
        if high > 1e6:
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if gaussian_delta(mid, sigma, sensitivity, releases) <= delta else (mid, high)
    return high


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma for which one Gaussian release of that sensitivity is (epsilon, delta)-DP."""
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}, {delta}, {sensitivity}")
    low, high = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(epsilon, high, sensitivity) > delta:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_delta(epsilon, mid, sensitivity) > delta else (low, mid)
    return high


def expected_noise_norm(dim: int, sigma: float) -> float:
    """E||N(0, sigma^2 I_dim)|| ~ sigma sqrt(dim): how loud the noise is against an update of norm <= clip."""
    return sigma * math.sqrt(dim)
