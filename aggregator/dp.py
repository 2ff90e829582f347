"""DP-FedAvg: user-level differential privacy at the aggregator (McMahan et al. 2018).

`DPFedAvgAggregator` wraps a linear inner aggregator (``mean``), the way TensorFlow
Federated's DifferentiallyPrivateFactory and Flower's server-side fixed-clipping wrapper
do, and has the `UpdateAggregator` interface, so the server uses it like any other:

1. every device update is clipped to L2 norm C and given a weight w <= 1 (1 by default;
   ``weight_cap`` gives ``w = min(examples / cap, 1)``, the paper's bounded weights), so
   one device moves the weighted sum by at most C: the sensitivity;
2. ``result()`` adds Gaussian noise N(0, (z C)^2) ONCE to that sum and divides by a FIXED
   denominator, the expected number of devices (or expected total weight), not by the
   actual count, which would itself depend on who took part (the paper's f~_f estimator);
3. with ``adaptive=True`` the clip follows a quantile of the update norms (Andrew et al.
   2021): each device contributes b = [norm <= C]; the noised fraction
   b~ = (sum(b - 1/2) + N(0, sigma_b^2)) / expected + 1/2 moves the clip geometrically,
   C <- C exp(-clip_lr (b~ - target_quantile)), at the start of the next round. The noise on
   the updates is raised to z_upd = (z^-2 - (2 sigma_b)^-2)^-1/2 so that the round as a
   whole (updates and count) is exactly as private as a Gaussian with multiplier z, which
   is what `PrivacyAccountant(z, q, delta)` accounts.

The noise is the same for every call of ``result()`` in a round (it is drawn from a
per-round seed that the state holds), so asking twice does not average it away; the seed
is as secret as the updates themselves (central DP trusts the server, see PRIVACY.md).

With secure aggregation the server never sees single updates: devices clip (and report
b) themselves and the unmasked sum enters through `add_aggregate`.

Build one from a spec: ``make_dp_aggregator("dp:clip=1,noise=1,expected=20|mean")``.
"""
from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from aggregator.aggregation import (
    EmptyAggregationError, State, StateValue, UpdateAggregator, WeightedMean, l2_norm, make_aggregator,
)

logger = logging.getLogger(__name__)

DP_SPEC_HELP = (
    "'dp:clip=C,noise=Z,expected=N' then optional items 'adaptive', 'quantile=Q' (0..1, default 0.5), "
    "'clip_lr=ETA' (default 0.2), 'count_stddev=S' (default expected/20), 'weight_cap=W' (0 = unweighted), "
    "'expected_weight=X', 'seed=INT', then optionally '|mean' (the inner aggregator, default mean); "
    "e.g. 'dp:clip=1,noise=1,expected=20' or 'dp:clip=0.5,noise=1.1,expected=20,adaptive|mean'"
)


@dataclass(frozen=True)
class DPConfig:
    """Settings of DP-FedAvg; every one of them changes the privacy guarantee or the estimate."""

    clip: float                      # C, the L2 bound (the initial bound if adaptive)
    noise_multiplier: float          # z: noise std on the sum is z * C (z_upd * C if adaptive)
    expected_clients: int            # the fixed denominator: the expected cohort size
    adaptive: bool = False
    target_quantile: float = 0.5     # adaptive: fraction of updates that should be under the clip
    clip_lr: float = 0.2             # adaptive: geometric learning rate of the clip
    count_stddev: float | None = None  # adaptive: sigma_b, noise on the count; None = expected / 20
    weight_cap: float = 0.0          # 0: every device weighs 1; > 0: w = min(examples / cap, 1)
    expected_weight: float | None = None  # denominator in weighted mode; None = expected_clients
    seed: int | None = None          # None: noise seeds from the OS; an int makes runs repeatable

    def __post_init__(self) -> None:
        _positive("clip", self.clip)
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier!r}")
        if isinstance(self.expected_clients, bool) or not isinstance(self.expected_clients, int) \
                or self.expected_clients < 1:
            raise ValueError(f"expected_clients must be an int >= 1, got {self.expected_clients!r}")
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        _positive("clip_lr", self.clip_lr)
        if self.count_stddev is not None:
            _positive("count_stddev", self.count_stddev)
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 0):
            raise ValueError(f"weight_cap must be finite and >= 0, got {self.weight_cap!r}")
        if self.expected_weight is not None:
            _positive("expected_weight", self.expected_weight)
        if self.adaptive and self.noise_multiplier > 0 and 2 * self.sigma_b <= self.noise_multiplier:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {self.noise_multiplier} needs count_stddev > "
                f"{self.noise_multiplier / 2} (it is {self.sigma_b}): the noised count would spend the whole "
                "privacy budget; raise count_stddev or expected_clients")

    @property
    def sigma_b(self) -> float:
        """Std of the noise on the count of unclipped updates (adaptive clipping)."""
        return self.count_stddev if self.count_stddev is not None else self.expected_clients / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """z_upd: the multiplier applied to the update sum (z itself without adaptive clipping)."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        return (z ** -2 - (2.0 * self.sigma_b) ** -2) ** -0.5

    @property
    def denominator(self) -> float:
        if self.weight_cap > 0 and self.expected_weight is not None:
            return float(self.expected_weight)
        return float(self.expected_clients)

    @property
    def spec(self) -> str:
        items = [f"clip={_fmt(self.clip)}", f"noise={_fmt(self.noise_multiplier)}",
                 f"expected={self.expected_clients}"]
        if self.adaptive:
            items += ["adaptive", f"quantile={_fmt(self.target_quantile)}", f"clip_lr={_fmt(self.clip_lr)}"]
            if self.count_stddev is not None:
                items.append(f"count_stddev={_fmt(self.count_stddev)}")
        if self.weight_cap > 0:
            items.append(f"weight_cap={_fmt(self.weight_cap)}")
            if self.expected_weight is not None:
                items.append(f"expected_weight={_fmt(self.expected_weight)}")
        if self.seed is not None:
            items.append(f"seed={self.seed}")
        return "dp:" + ",".join(items)


class DPFedAvgAggregator(UpdateAggregator):
    """Clip -> weighted sum -> Gaussian noise once -> fixed denominator. See the module docstring.

    ``accumulator()`` is None on purpose (a decoder writing straight into the inner sum would
    bypass the clip): `add_decoded_into` decodes into the scratch buffer, then clips.
    """

    kind = "dp"

    def __init__(self, inner: UpdateAggregator, config: DPConfig) -> None:
        super().__init__()
        if not isinstance(inner, UpdateAggregator):
            raise ValueError(f"inner must be an UpdateAggregator, got {type(inner).__name__}")
        if inner.kind != WeightedMean.kind:
            raise ValueError(f"DP-FedAvg needs a sum with bounded sensitivity: the inner aggregator must be "
                             f"'mean', got {inner.spec!r}")
        self.inner = inner
        self.config = config
        self.clip = float(config.clip)          # the bound of the current round
        self._round_seed = 0
        self._rounds_started = 0
        self._pending_clip: float | None = None  # the adaptive clip for the next round, once released
        self._clipped = 0
        self._unclipped = 0.0                    # sum of b over this round's updates
        self._max_norm_seen = 0.0
        self._extra_sum: np.ndarray | None = None  # pre-summed updates (secure aggregation)
        self._extra_count = 0
        self._extra_ids: list[str] = []
        self._clip_buffer: np.ndarray | None = None
        self._last_report: dict[str, Any] = {}

    # -- description ---------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return f"{self.config.spec}|{self.inner.spec}"

    @property
    def count(self) -> int:
        return self.inner.count + self._extra_count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight + float(self._extra_count)

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self.inner.client_ids + tuple(self._extra_ids)

    def contains(self, client_id: str) -> bool:
        return bool(client_id) and (self.inner.contains(client_id) or client_id in self._extra_ids)

    @property
    def noise_std(self) -> float:
        """Std of the noise per coordinate of `result()` (the averaged update), this round."""
        return self.config.update_noise_multiplier * self.clip / self.config.denominator

    @property
    def clipped_count(self) -> int:
        return self._clipped

    @property
    def next_clip(self) -> float:
        """The clip the next round will use: persist it with the model between rounds (adaptive)."""
        return self._pending_clip if self._pending_clip is not None else self.clip

    def set_clip(self, clip: float) -> None:
        """Restore the clip after a restart (from `next_clip` saved with the model); before `reset`."""
        _positive("clip", clip)
        self.clip, self._pending_clip = float(clip), None

    # -- the round -----------------------------------------------------------------------------
    def reset(self, dim: int) -> None:
        """Start a round: apply the adaptive clip released by the last round, draw a noise seed."""
        if self._pending_clip is not None:
            logger.info("dp: clip %.4g -> %.4g", self.clip, self._pending_clip)
            self.clip = self._pending_clip
        self._pending_clip = None
        self.inner.reset(dim)
        self._dim = self.inner.dim
        self._rounds_started += 1
        if self.config.seed is None:
            self._round_seed = secrets.randbits(128)
        else:
            words = np.random.SeedSequence([self.config.seed, self._rounds_started]).generate_state(2, np.uint64)
            self._round_seed = int(words[0]) | (int(words[1]) << 64)
        self._clipped = 0
        self._unclipped = 0.0
        self._max_norm_seen = 0.0
        self._extra_sum = None
        self._extra_count = 0
        self._extra_ids = []

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._check_update(delta, weight, client_id)
        scale, within = self._clip_scale(delta, client_id)
        data = delta
        if scale != 1.0:
            if self._clip_buffer is None or self._clip_buffer.shape != delta.shape:
                self._clip_buffer = np.empty(delta.shape, dtype=np.float32)
            np.multiply(delta, np.float32(scale), out=self._clip_buffer, casting="same_kind")
            data = self._clip_buffer
        self.inner.add(data, self._dp_weight(weight), client_id=client_id)
        self._note(within)

    def _add_owned(self, delta: np.ndarray, weight: float, client_id: str) -> None:
        self._check_update(delta, weight, client_id)
        scale, within = self._clip_scale(delta, client_id)
        if scale != 1.0:
            np.multiply(delta, np.float32(scale), out=delta, casting="same_kind")
        self.inner.add(delta, self._dp_weight(weight), client_id=client_id)
        self._note(within)

    def add_aggregate(self, total: np.ndarray, count: int, *, unclipped_count: float | None = None,
                      client_ids: Sequence[str] = ()) -> None:
        """Fold in the SUM of ``count`` updates the devices clipped themselves (secure aggregation).

        The devices must clip to `clip` (announce it in the round plan) and weigh 1 each; the
        server cannot check either (see PRIVACY.md). With adaptive clipping, ``unclipped_count``
        is the secure sum of the devices' b = [norm <= clip] bits.
        """
        dim = self._require_dim()
        total = np.asarray(total)
        if total.shape != (dim,) or total.dtype.kind != "f" or not np.isfinite(total).all():
            raise ValueError(f"aggregate must be {dim} finite floats, got {total.dtype}{total.shape}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if self.config.adaptive and unclipped_count is None:
            raise ValueError("adaptive clipping needs unclipped_count: have devices add b = [norm <= clip] "
                             "to the secure sum")
        ids = list(client_ids)
        if ids and len(ids) != count:
            raise ValueError(f"{len(ids)} client ids for {count} updates")
        for cid in ids:
            self._check_new_client(cid)
        if self._extra_sum is None:
            self._extra_sum = np.zeros(dim, dtype=np.float64)
        self._extra_sum += total
        self._extra_count += count
        self._extra_ids += ids or [""] * count
        self._unclipped += float(unclipped_count) if unclipped_count is not None else 0.0

    def result(self) -> np.ndarray:
        """(clipped weighted sum + N(0, (z_upd C)^2)) / denominator, float32; the same all round."""
        dim = self._require_dim()
        if self.count == 0:
            raise EmptyAggregationError("no update was added this round: there is nothing to release")
        total = self._sum()
        update_rng, count_rng = (np.random.Generator(np.random.PCG64(s))
                                 for s in np.random.SeedSequence(self._round_seed).spawn(2))
        sigma = self.config.update_noise_multiplier * self.clip
        if sigma > 0:
            total += update_rng.standard_normal(dim) * sigma
        total /= self.config.denominator
        report: dict[str, Any] = {
            "clip": self.clip, "noise_multiplier": self.config.noise_multiplier,
            "update_noise_multiplier": self.config.update_noise_multiplier, "noise_std": self.noise_std,
            "denominator": self.config.denominator, "participants": self.count, "clipped": self._clipped,
            "max_norm_seen": self._max_norm_seen,
        }
        if self.config.adaptive:
            m = self.config.expected_clients
            noised = (self._unclipped - self.count / 2.0 + count_rng.normal(0.0, self.config.sigma_b)) / m + 0.5
            self._pending_clip = self.clip * math.exp(-self.config.clip_lr * (noised - self.config.target_quantile))
            report.update(unclipped_fraction=noised, next_clip=self._pending_clip)
        self._last_report = report
        return total.astype(np.float32)

    def round_report(self) -> dict[str, Any]:
        """What the last `result()` released: clip, noise, participants, clipped, next clip."""
        return dict(self._last_report)

    def _sum(self) -> np.ndarray:
        acc = self.inner.accumulator() if self.inner.count else None
        if acc is not None:
            total = np.array(acc, dtype=np.float64, copy=True)
        elif self.inner.count:
            total = self.inner.result().astype(np.float64) * self.inner.total_weight
        else:
            total = np.zeros(self._require_dim(), dtype=np.float64)
        if self._extra_sum is not None:
            total += self._extra_sum
        return total

    def _clip_scale(self, delta: np.ndarray, client_id: str) -> tuple[float, bool]:
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise ValueError(f"update of client {client_id!r} has a non-finite norm: reject it at intake")
        self._last_norm = norm
        if norm <= self.clip:
            return 1.0, True
        return self.clip / norm, False

    def _note(self, within: bool) -> None:
        # after the inner add succeeded, so a refused update is not counted
        self._unclipped += 1.0 if within else 0.0
        self._clipped += 0 if within else 1
        self._max_norm_seen = max(self._max_norm_seen, self._last_norm)

    def _dp_weight(self, weight: float) -> float:
        if self.config.weight_cap > 0:
            return min(float(weight) / self.config.weight_cap, 1.0)
        return 1.0

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> State:
        dim = self._require_dim()
        out: State = {
            "kind": self.kind, "spec": self.spec, "dim": dim, "clip": self.clip,
            "round_seed": format(self._round_seed, "x"), "rounds_started": self._rounds_started,
            "pending_clip": -1.0 if self._pending_clip is None else self._pending_clip,
            "clipped": self._clipped, "unclipped": self._unclipped, "max_norm_seen": self._max_norm_seen,
            "extra_count": self._extra_count,
            "extra_ids": np.array(self._extra_ids, dtype=np.str_) if self._extra_ids else np.zeros(0, dtype="<U1"),
            "extra_sum": (self._extra_sum.copy() if self._extra_sum is not None else np.zeros(0, dtype=np.float64)),
        }
        for key, value in self.inner.state().items():
            out[f"inner.{key}"] = value
        return out

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        kind = _scalar(state, "kind", str)
        if kind != self.kind:
            raise ValueError(f"checkpoint holds the state of a {kind!r} aggregator, this one is {self.spec!r}")
        saved_spec = _scalar(state, "spec", str)
        if saved_spec != self.spec:
            raise ValueError(f"checkpoint was made by {saved_spec!r}, this aggregator is {self.spec!r}: "
                             "privacy parameters must not change in the middle of a round")
        inner = {k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")}
        self.inner.load_state(inner)
        self._dim = _scalar(state, "dim", int)
        self.clip = _scalar(state, "clip", float)
        self._round_seed = int(_scalar(state, "round_seed", str), 16)
        self._rounds_started = _scalar(state, "rounds_started", int)
        pending = _scalar(state, "pending_clip", float)
        self._pending_clip = None if pending < 0 else pending
        self._clipped = _scalar(state, "clipped", int)
        self._unclipped = _scalar(state, "unclipped", float)
        self._max_norm_seen = _scalar(state, "max_norm_seen", float)
        self._extra_count = _scalar(state, "extra_count", int)
        self._extra_ids = [str(x) for x in np.asarray(state["extra_ids"]).reshape(-1).tolist()]
        extra = np.asarray(state["extra_sum"], dtype=np.float64)
        self._extra_sum = extra.copy() if extra.size else None


def _scalar(state: Mapping[str, StateValue], key: str, kind: type) -> Any:
    if key not in state:
        raise ValueError(f"DP aggregator state lacks {key!r}: not a DPFedAvgAggregator.state()")
    return kind(np.asarray(state[key]).item())


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


# -- specs ---------------------------------------------------------------------------------------
_KEYS = {"clip": "clip", "noise": "noise_multiplier", "expected": "expected_clients", "quantile": "target_quantile",
         "clip_lr": "clip_lr", "count_stddev": "count_stddev", "weight_cap": "weight_cap",
         "expected_weight": "expected_weight", "seed": "seed"}
_INTS = {"expected_clients", "seed"}


def parse_dp_config(stage: str) -> DPConfig:
    """The `DPConfig` of one ``dp:...`` stage; ValueError naming the bad item."""
    name, _, args = stage.strip().partition(":")
    if name.strip().lower() != "dp":
        raise ValueError(f"not a dp stage: {stage!r}. {DP_SPEC_HELP}")
    values: dict[str, Any] = {}
    for item in (a.strip() for a in args.split(",") if a.strip()):
        key, eq, text = item.partition("=")
        key = key.strip().lower()
        if key == "adaptive" and not eq:
            values["adaptive"] = True
            continue
        field_name = _KEYS.get(key)
        if field_name is None or not eq:
            raise ValueError(f"bad dp item {item!r}. {DP_SPEC_HELP}")
        if field_name in values:
            raise ValueError(f"dp item {key!r} given twice in {stage!r}")
        try:
            values[field_name] = int(text) if field_name in _INTS else float(text)
        except ValueError:
            raise ValueError(f"dp item {item!r}: {text!r} is not a number. {DP_SPEC_HELP}") from None
    missing = [k for k, f in (("clip", "clip"), ("noise", "noise_multiplier"), ("expected", "expected_clients"))
               if f not in values]
    if missing:
        raise ValueError(f"dp stage {stage!r} lacks {', '.join(missing)}. {DP_SPEC_HELP}")
    return DPConfig(**values)


def make_dp_aggregator(spec: str | None = None, *, inner: UpdateAggregator | None = None,
                       **config: Any) -> DPFedAvgAggregator:
    """A DP-FedAvg aggregator from a spec (``"dp:clip=1,noise=1,expected=20|mean"``) or keywords.

    ``make_dp_aggregator(clip=1.0, noise_multiplier=1.0, expected_clients=20)`` is the same
    as the spec ``"dp:clip=1,noise=1,expected=20"``. The inner aggregator defaults to ``mean``.
    """
    if spec is not None:
        if config:
            raise ValueError("give either a spec or keyword settings, not both")
        head, bar, rest = spec.partition("|")
        cfg = parse_dp_config(head)
        if bar:
            if inner is not None:
                raise ValueError("the spec names an inner aggregator and inner= was given too")
            inner = make_aggregator(rest)
    else:
        known = {f.name for f in fields(DPConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"DPConfig does not take {unknown}; it takes {sorted(known)}")
        cfg = DPConfig(**config)
    return DPFedAvgAggregator(inner if inner is not None else WeightedMean(), cfg)


def is_dp_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.strip().lower().partition("|")[0].strip().startswith("dp:")


def make_any_aggregator(spec: str) -> UpdateAggregator:
    """`make_dp_aggregator` for a ``dp:`` spec, `make_aggregator` for anything else."""
    return make_dp_aggregator(spec) if is_dp_spec(spec) else make_aggregator(spec)


__all__ = [
    "DPConfig", "DPFedAvgAggregator", "DP_SPEC_HELP", "is_dp_spec", "make_any_aggregator", "make_dp_aggregator",
    "parse_dp_config",
]
