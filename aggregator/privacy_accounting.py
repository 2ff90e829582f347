"""Privacy accounting for DP-FedAvg with Google's `dp-accounting` library.

Each committed round of `DPFedAvgAggregator` is one Poisson-subsampled Gaussian mechanism:
every device of the population takes part with probability ``q = cohort / population``, its
clipped update has L2 sensitivity C, and the sum gets N(0, (z C)^2) noise, so the round's
privacy depends only on (z, q); rounds compose. `PrivacyAccountant` tracks the rounds and
answers epsilon at a fixed delta, with the RDP accountant (fast, a slightly loose upper
bound) or the PLD accountant (tight, about 100x slower: 0.5 s for 300 rounds here).

The unit of privacy is the DEVICE (user-level DP, add-or-remove one device's whole data),
not one typed sentence. What the guarantee assumes, and fedboard does not enforce: devices
are sampled by Poisson sampling with probability q (fedboard picks a fixed-size cohort from
the devices that check in, which depends on availability); the noise multiplier and the
expected cohort are fixed for the run; the server is trusted to add the noise (central DP).

    accountant = PrivacyAccountant(noise_multiplier=1.0, sampling_probability=20 / 309, delta=1e-3)
    accountant.step()            # after each committed round
    accountant.epsilon()         # epsilon so far at delta
    noise_multiplier_for(target_epsilon=5.0, delta=1e-3, rounds=300, sampling_probability=20 / 309)
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting

logger = logging.getLogger(__name__)
# dp-accounting's RDP code warns (through absl) for every low order whose series does not
# converge and is left out of the bound: dozens of lines per call, nothing the user can act on.
logging.getLogger("absl").setLevel(logging.ERROR)

ACCOUNTANTS = ("rdp", "pld")


def _check_probability(q: float) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sampling probability must be in (0, 1] (cohort / population), got {q!r}")
    return q


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), usually below 1 / population, got {delta!r}")
    return delta


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return name


def sampling_probability(cohort: int, population: int) -> float:
    """q = expected cohort size / number of devices that could be sampled."""
    if population < 1 or not 1 <= cohort <= population:
        raise ValueError(f"need 1 <= cohort <= population, got cohort={cohort}, population={population}")
    return cohort / population


def _dp_accounting():
    """dp-accounting pulls scipy: about 1 s of CPU, paid only by a run that uses DP, not by every
    aggregator start (a restart after a crash should be quick)."""
    import dp_accounting

    return dp_accounting


def round_event(noise_multiplier: float, sampling_probability: float, rounds: int = 1) -> "dp_accounting.DpEvent":
    dp_accounting = _dp_accounting()
    """The DpEvent of ``rounds`` DP-FedAvg rounds: a Poisson-subsampled Gaussian, self-composed."""
    event = dp_accounting.PoissonSampledDpEvent(_check_probability(sampling_probability),
                                                dp_accounting.GaussianDpEvent(float(noise_multiplier)))
    return dp_accounting.SelfComposedDpEvent(event, int(rounds))


def _fresh(accountant: str) -> "dp_accounting.PrivacyAccountant":
    from dp_accounting import pld, rdp

    return rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()


def epsilon_for(rounds: int, noise_multiplier: float, sampling_probability: float, delta: float,
                accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds; 0 for no rounds, inf without noise."""
    _check_accountant(accountant)
    _check_delta(delta)
    _check_probability(sampling_probability)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if rounds == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    acc = _fresh(accountant)
    acc.compose(round_event(noise_multiplier, sampling_probability, rounds))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int, sampling_probability: float,
                         accountant: str = "rdp", *, tol: float = 1e-3, max_noise: float = 1000.0) -> float:
    """The smallest noise multiplier (within ``tol``) whose epsilon after ``rounds`` is <= the target.

    Uses dp_accounting's calibration (Brent's method) on the same event as `epsilon_for`.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    q = _check_probability(sampling_probability)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if epsilon_for(rounds, max_noise, q, delta, accountant) > target_epsilon:
        raise ValueError(f"even noise multiplier {max_noise} gives more than epsilon {target_epsilon} "
                         f"after {rounds} rounds: allow more epsilon or fewer rounds")
    dp_accounting = _dp_accounting()
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh(accountant), lambda noise: round_event(noise, q, rounds), float(target_epsilon),
        float(delta), dp_accounting.ExplicitBracketInterval(1e-2, max_noise), tol=tol)
    return float(z)


@dataclass
class PrivacyAccountant:
    """Epsilon spent so far by a DP-FedAvg run; call `step()` once per committed round.

    State is plain data (`state()` / `load_state()`), so it rides in the aggregator's
    checkpoint and a resumed run keeps counting from where it stopped.
    """

    noise_multiplier: float
    sampling_probability: float
    delta: float
    accountant: str = "rdp"
    rounds: int = field(default=0, init=False)
    _cached: tuple[int, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        z = float(self.noise_multiplier)
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier!r}")
        self.noise_multiplier = z
        self.sampling_probability = _check_probability(self.sampling_probability)
        self.delta = _check_delta(self.delta)
        _check_accountant(self.accountant)

    def step(self, rounds: int = 1) -> float:
        """Count ``rounds`` more committed rounds; returns epsilon after them."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        self.rounds += rounds
        return self.epsilon()

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the rounds counted so far."""
        if self._cached is None or self._cached[0] != self.rounds:
            eps = epsilon_for(self.rounds, self.noise_multiplier, self.sampling_probability, self.delta,
                              self.accountant)
            self._cached = (self.rounds, eps)
        return self._cached[1]

    def epsilon_for(self, rounds: int) -> float:
        """Epsilon this configuration would reach after ``rounds`` rounds in total."""
        return epsilon_for(rounds, self.noise_multiplier, self.sampling_probability, self.delta, self.accountant)

    def report(self) -> dict[str, Any]:
        """The run report's ``dp`` block (see aggregator/PRIVACY.md)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_probability": self.sampling_probability,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "rounds": self.rounds,
            "accountant": self.accountant,
        }

    def state(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sampling_probability": self.sampling_probability,
                "delta": self.delta, "accountant": self.accountant, "rounds": self.rounds}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore the round count; refuses a state made with other privacy parameters."""
        for key in ("noise_multiplier", "sampling_probability", "delta"):
            saved = float(_item(state, key))
            if saved != getattr(self, key):
                raise ValueError(f"accountant state has {key}={saved!r}, this accountant {getattr(self, key)!r}: "
                                 "epsilon of a run with changed parameters needs a new accounting")
        self.rounds = int(_item(state, "rounds"))
        self._cached = None


def _item(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise ValueError(f"accountant state lacks {key!r}")
    value = state[key]
    return value.item() if hasattr(value, "item") else value


__all__ = [
    "ACCOUNTANTS", "PrivacyAccountant", "epsilon_for", "noise_multiplier_for", "round_event", "sampling_probability",
]
