"""Server optimizers: turn a round's aggregated client delta into new global weights.

This is the ServerOpt of FedOpt (Reddi et al., 2021, "Adaptive Federated Optimization",
Algorithm 2): the aggregated delta ``Δ_t = mean_i (x_i - x_t)`` is the NEGATIVE of a
pseudo-gradient, and the server takes one optimizer step with it. With momentum/moments:

    m_t = β1 m_{t-1} + (1 - β1) Δ_t                                  (m_{-1} = 0)
    FedAdagrad: v_t = v_{t-1} + Δ_t²
    FedYogi:    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)
    FedAdam:    v_t = β2 v_{t-1} + (1 - β2) Δ_t²
    x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

exactly as in the paper: no bias correction; τ is the adaptivity (epsilon) term; the paper
requires ``v_{-1} >= τ²`` and we start at ``v_{-1} = τ²`` (the smallest allowed value;
``initial_v`` overrides it, e.g. ``initial_v=0.0`` reproduces Flower, which starts at zero).
FedAdagrad keeps the paper's momentum term but defaults to ``beta1 = 0`` (plain Adagrad, as
in Flower and TFF). FedAvg is ``x + η Δ``; FedAvgM (Hsu et al., 2019) is server SGD with
heavy-ball momentum on the pseudo-gradient: ``m = μ m + Δ; x = x + η m``.

Design (after FedJAX): each optimizer is a small dataclass of hyperparameters plus moment
buffers; its state is plain data (float32 arrays and numbers in a flat dict), so the lead can
checkpoint it with ``np.savez`` and resume exactly. Everything is float32 and in place: memory
is one buffer of the model's size per moment plus one or two scratch buffers.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)


class ServerOptimizer(ABC):
    """One server-side optimizer; `init` once, then `apply` once per round.

    Subclasses are dataclasses whose fields are the hyperparameters; they name their moment
    buffers in ``buffer_names`` and implement `_step`.
    """

    name: ClassVar[str] = ""
    buffer_names: ClassVar[tuple[str, ...]] = ()

    # Set by `init`; declared here so dataclass subclasses need not repeat them.
    _dim: int | None = None
    _step_count: int = 0
    _buffers: dict[str, np.ndarray]

    # --- public API ------------------------------------------------------------------

    def init(self, weights: np.ndarray) -> None:
        """Start from global weights ``weights`` (1-D float32): zero momentum, v = initial."""
        weights = _as_vector(weights, "weights")
        self._dim = int(weights.shape[0])
        self._step_count = 0
        self._buffers = {name: np.full(self._dim, self._initial(name), dtype=np.float32)
                         for name in self.buffer_names}

    def apply(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New global weights (a new float32 array) after one step with aggregated ``delta``.

        ``weights`` and ``delta`` are not modified. A non-finite delta raises ValueError before
        any state changes (one NaN would otherwise spread into the moments for good).
        """
        dim = self._require_init()
        weights = _as_vector(weights, "weights", dim)
        delta = _as_vector(delta, "delta", dim)
        if not np.isfinite(delta).all():
            raise ValueError(
                "aggregated delta has NaN or inf values: no step taken; "
                "find the update that slipped past intake validation"
            )
        new = self._step(weights, delta)
        self._step_count += 1
        return new

    @property
    def step(self) -> int:
        """How many rounds `apply` has been called for since `init`."""
        return self._step_count

    @property
    def dim(self) -> int | None:
        return self._dim

    def hyperparameters(self) -> dict[str, float]:
        """The dataclass fields (lr, momentum, betas, tau...) as plain floats."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: float(getattr(self, f.name))
                for f in fields if f.init and getattr(self, f.name) is not None}

    def state(self) -> dict[str, Any]:
        """Flat dict: name, dim, step, hyperparameters, and a float32 copy of each buffer."""
        dim = self._require_init()
        out: dict[str, Any] = {"name": self.name, "dim": dim, "step": self._step_count}
        out.update(self.hyperparameters())
        for name in self.buffer_names:
            out[name] = self._buffers[name].copy()
        return out

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore `state()` (also after an ``np.savez``/``np.load`` round trip).

        Hyperparameters are those of this object: if the checkpoint's differ (e.g. the lr was
        lowered on purpose for the resumed run) a warning is logged and this object's win.
        """
        saved_name = _scalar(state, "name", str)
        if saved_name != self.name:
            raise ValueError(
                f"checkpoint holds {saved_name!r} optimizer state, this optimizer is "
                f"{self.name!r}: build it with make_server_optimizer(state['name'], ...)"
            )
        dim = _scalar(state, "dim", int)
        step = _scalar(state, "step", int)
        buffers: dict[str, np.ndarray] = {}
        for name in self.buffer_names:
            if name not in state:
                raise ValueError(f"{self.name} state lacks buffer {name!r}")
            arr = np.asarray(state[name])
            if arr.shape != (dim,) or arr.dtype != np.float32:
                raise ValueError(
                    f"{self.name} state buffer {name!r} is {arr.dtype}{arr.shape}, "
                    f"expected float32({dim},)"
                )
            buffers[name] = arr.copy()
        for key, mine in self.hyperparameters().items():
            if key in state and _scalar(state, key, float) != mine:
                logger.warning("%s: checkpoint has %s=%r, continuing with %r",
                               self.name, key, _scalar(state, key, float), mine)
        self._dim, self._step_count, self._buffers = dim, step, buffers

    # --- for subclasses ----------------------------------------------------------------

    @abstractmethod
    def _step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Update the buffers in place and return the new weights (a new array)."""

    def _initial(self, buffer_name: str) -> float:
        """Initial value of a buffer (0 for momentum; v_{-1} for second moments)."""
        return 0.0

    def _require_init(self) -> int:
        if self._dim is None:
            raise RuntimeError(
                f"{type(self).__name__} is not initialised: call init(weights) at the start "
                "of training, or load_state(checkpoint) when resuming"
            )
        return self._dim

    def _check_range(self, field_name: str, low: float, high: float, *,
                     low_open: bool = False, high_open: bool = True) -> None:
        value = getattr(self, field_name)
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: {field_name} must be a number, got {value!r}") from None
        ok_low = x > low if low_open else x >= low
        ok_high = x < high if high_open else x <= high
        if not (math.isfinite(x) and ok_low and ok_high):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ValueError(
                f"{self.name}: {field_name} must be in {lo}{low}, {high}{hi}, got {value!r}"
            )
        setattr(self, field_name, x)


def _as_vector(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.dtype.kind != "f":
        desc = f"{x.dtype}{x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{what} must be a 1-D float32 array, got {desc}")
    if dim is not None and x.shape[0] != dim:
        raise ValueError(
            f"{what} has {x.shape[0]} values, the optimizer was initialised with {dim}"
        )
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _scalar(state: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in state:
        raise ValueError(f"server optimizer state lacks {key!r}: not a ServerOptimizer.state()")
    return kind(np.asarray(state[key]).item())


_INF = math.inf


@dataclass(eq=False)
class FedAvg(ServerOptimizer):
    """``x + lr * Δ``; with lr = 1 the new weights are the clients' weighted mean."""

    name: ClassVar[str] = "fedavg"
    lr: float = 1.0

    def __post_init__(self) -> None:
        self._check_range("lr", 0.0, _INF, low_open=True)

    def _step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        new = np.multiply(delta, np.float32(self.lr))
        np.add(weights, new, out=new)
        return new


@dataclass(eq=False)
class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): ``m = momentum * m + Δ; x + lr * m``."""

    name: ClassVar[str] = "fedavgm"
    buffer_names: ClassVar[tuple[str, ...]] = ("m",)
    lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        self._check_range("lr", 0.0, _INF, low_open=True)
        self._check_range("momentum", 0.0, 1.0)

    def _step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m = self._buffers["m"]
        m *= np.float32(self.momentum)
        m += delta
        new = np.multiply(m, np.float32(self.lr))
        np.add(weights, new, out=new)
        return new


@dataclass(eq=False)
class _AdaptiveOptimizer(ServerOptimizer):
    """Shared part of FedAdam, FedYogi, FedAdagrad: first moment, v, and the step."""

    buffer_names: ClassVar[tuple[str, ...]] = ("m", "v")
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    initial_v: float | None = None  # None: tau ** 2, the paper's lower bound on v_{-1}

    def __post_init__(self) -> None:
        self._check_range("lr", 0.0, _INF, low_open=True)
        self._check_range("beta1", 0.0, 1.0)
        self._check_range("beta2", 0.0, 1.0)
        self._check_range("tau", 0.0, _INF, low_open=True)
        if self.initial_v is not None:
            self._check_range("initial_v", 0.0, _INF)

    def _initial(self, buffer_name: str) -> float:
        if buffer_name == "v":
            return self.tau ** 2 if self.initial_v is None else float(self.initial_v)
        return 0.0

    def hyperparameters(self) -> dict[str, float]:
        out = super().hyperparameters()
        out["initial_v"] = self._initial("v")
        return out

    @abstractmethod
    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update v in place from Δ² (``delta_sq`` is scratch and may be overwritten)."""

    def _step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m, v = self._buffers["m"], self._buffers["v"]
        scratch = np.multiply(delta, np.float32(1.0 - self.beta1))
        m *= np.float32(self.beta1)
        m += scratch                                   # m_t = b1 m + (1 - b1) Δ
        np.square(delta, out=scratch)                  # Δ²
        self._update_v(v, scratch)
        np.sqrt(v, out=scratch)
        scratch += np.float32(self.tau)                # sqrt(v_t) + τ
        np.divide(m, scratch, out=scratch)
        scratch *= np.float32(self.lr)
        scratch += weights                             # x + η m / (sqrt(v) + τ)
        return scratch


@dataclass(eq=False)
class FedAdam(_AdaptiveOptimizer):
    """``v = β2 v + (1 - β2) Δ²`` (Reddi et al., Algorithm 2; no bias correction)."""

    name: ClassVar[str] = "fedadam"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v *= np.float32(self.beta2)
        delta_sq *= np.float32(1.0 - self.beta2)
        v += delta_sq


@dataclass(eq=False)
class FedYogi(_AdaptiveOptimizer):
    """``v = v - (1 - β2) Δ² sign(v - Δ²)``: v moves towards Δ² additively, never jumps."""

    name: ClassVar[str] = "fedyogi"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        sign = np.subtract(v, delta_sq)
        np.sign(sign, out=sign)
        delta_sq *= np.float32(1.0 - self.beta2)
        delta_sq *= sign
        v -= delta_sq


@dataclass(eq=False)
class FedAdagrad(_AdaptiveOptimizer):
    """``v = v + Δ²``; beta2 is unused; beta1 defaults to 0 (no momentum)."""

    name: ClassVar[str] = "fedadagrad"
    lr: float = 0.1
    beta1: float = 0.0

    def hyperparameters(self) -> dict[str, float]:
        out = super().hyperparameters()
        out.pop("beta2", None)
        return out

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def make_server_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """Build a server optimizer by name (fedavg, fedavgm, fedadam, fedyogi, fedadagrad).

    Raises ValueError for an unknown name, an unknown keyword (listing the accepted ones), or
    a value out of range.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    cls = SERVER_OPTIMIZERS.get(key)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(
            f"unknown server optimizer {name!r}; known: {', '.join(SERVER_OPTIMIZERS)}"
        )
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    if cls is FedAdagrad:
        accepted.remove("beta2")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{key} does not take {', '.join(map(repr, unknown))}; it takes {', '.join(accepted)}"
        )
    return cls(**kwargs)


def server_optimizer_from_state(state: Mapping[str, Any]) -> ServerOptimizer:
    """Rebuild an optimizer, hyperparameters and buffers, from its `state()` alone."""
    name = _scalar(state, "name", str)
    cls = SERVER_OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"state names unknown server optimizer {name!r}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    kwargs = {f.name: _scalar(state, f.name, float) for f in fields if f.init and f.name in state}
    if cls is FedAdagrad:
        kwargs.pop("beta2", None)
    opt = cls(**kwargs)
    opt.load_state(state)
    return opt


__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "SERVER_OPTIMIZERS",
    "ServerOptimizer",
    "make_server_optimizer",
    "server_optimizer_from_state",
]
