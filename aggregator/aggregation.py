"""Streaming aggregation of client updates, composable as layers (clip -> aggregate).

A round's client deltas (``w_client - w_global``, flat float32 vectors of ``dim`` values,
weighted by example count) flow into one `UpdateAggregator`; at the end of the round
`result()` gives the aggregated delta that a `ServerOptimizer` turns into new weights.

Why streaming: a round can take hundreds of updates of 3 MB each; `WeightedMean` keeps only
a running weighted sum, so its memory does not grow with the number of updates. The robust
statistics (`TrimmedMean`, `CoordinateMedian`) and the robust wrappers that need the whole
round before deciding (`MedianNormClip`, `MultiKrum`) cannot stream and must buffer every
update; their buffer is bounded by ``max_updates`` and overflowing it is an explicit error.

Why layers (as in TensorFlow Federated's aggregation factories): clipping is a wrapper around
any aggregator rather than a flag of each one, and presets are spec strings
(``"clip:10|mean"``) that `make_aggregator` turns into a composition.

Why `state()` / `load_state()`: the aggregator's state is plain data (numpy arrays, numbers,
strings) in a flat dict that `np.savez` can write without pickling, so the lead can checkpoint
the round's accepted-so-far contribution and resume it bit for bit after a crash. The state
also holds the ids of the clients already counted, so the checkpoint and the set of accepted
clients can never disagree (a redelivered update after a restart is recognisable).

Decoding straight into the sum: `WeightedMean.add_decoded_into(decode_into, weight)` hands
the running sum buffer to a codec's decoder, which adds ``weight * update`` into it without
ever materialising the dense update. See `UpdateAggregator.add_decoded_into` for the exact
contract.

Input validation (finite values, norm bounds, round ids, duplicates of the network kind) is the
intake's job; the aggregators check only what would corrupt their own arithmetic (shape,
dtype kind, weight > 0, a client counted twice).

Not thread-safe: call one aggregator from one thread at a time (the server holds its lock).
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar, Union

import numpy as np

logger = logging.getLogger(__name__)

StateValue = Union[np.ndarray, float, int, str]
State = dict[str, StateValue]
DecodeInto = Callable[[np.ndarray, float], None]
UpdateCheck = Callable[[np.ndarray], None]

#: Default bound on buffered updates for the robust aggregators: 100 x 781,068 float32
#: values is about 312 MB for the reference model.
DEFAULT_MAX_UPDATES = 100

# Elements per block when a norm or a robust statistic is computed block by block; keeps the
# temporaries of those passes small (a few MB) whatever the model size.
_BLOCK = 65536

SPEC_HELP = (
    "stages separated by '|', wrappers first and exactly one aggregator last: "
    "'clip:MAX_NORM' (wrapper), 'mean' or 'mean:float32', 'trimmed:FRACTION[,MAX_UPDATES]', "
    "'median[:MAX_UPDATES]'; 'normclip:median*K[,MAX_UPDATES]' (wrapper: clip to K times the round's "
    "median norm); 'krum:f=F[,m=M][,cosine][,MAX_UPDATES]' (wrapper: multi-Krum, keep the m "
    "(default n - f) updates nearest their n - f - 2 neighbours; 'cosine': by direction only); "
    "e.g. 'mean', 'clip:10|mean', 'trimmed:0.1', 'clip:5|median:50', 'normclip:median*2|mean', "
    "'krum:f=2|mean', 'normclip:median*2|krum:f=2,cosine|mean'"
)


class AggregationError(RuntimeError):
    """The aggregator cannot do what was asked in its present state."""


class EmptyAggregationError(AggregationError):
    """`result()` was asked for before any update was added."""


class CapacityExceededError(AggregationError):
    """A buffering aggregator already holds ``max_updates`` updates."""


class DuplicateUpdateError(AggregationError):
    """An update from a client id that this aggregator has already counted in this round."""


class PoisonedAggregatorError(AggregationError):
    """A decode into the running sum failed part-way; the sum can no longer be trusted."""


# --------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------


class UpdateAggregator(ABC):
    """Folds weighted client deltas of one round into one aggregated delta.

    Life cycle: ``reset(dim)`` at the start of a round, ``add(...)`` (or ``add_decoded_into``)
    once per accepted client, ``result()`` at the end. ``state()`` / ``load_state()`` may be
    called at any time in between to checkpoint and resume.
    """

    #: Name of the aggregator in its spec and in its state's ``kind`` field.
    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        self._dim: int | None = None
        self._scratch: np.ndarray | None = None  # dense decode target, reused across updates

    # --- the round -------------------------------------------------------------------

    @abstractmethod
    def reset(self, dim: int) -> None:
        """Forget everything and prepare for a round of updates of ``dim`` values."""

    @abstractmethod
    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        """Fold in one client's delta (1-D float array of ``dim`` values), weight > 0.

        The array is not kept nor modified; the caller may reuse it at once. A non-empty
        ``client_id`` already counted this round raises `DuplicateUpdateError`.
        """

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of updates folded in since the last reset."""

    @property
    @abstractmethod
    def total_weight(self) -> float:
        """Sum of the weights of the updates folded in since the last reset."""

    @property
    @abstractmethod
    def client_ids(self) -> tuple[str, ...]:
        """Ids passed with the updates, in arrival order ("" where none was given)."""

    @abstractmethod
    def result(self) -> np.ndarray:
        """The aggregated delta (new float32 array); `EmptyAggregationError` if count == 0.

        Does not change the aggregator: it may be called again, and more updates may follow.
        """

    # --- checkpoints -----------------------------------------------------------------

    @abstractmethod
    def state(self) -> State:
        """A flat dict of numpy arrays, numbers and strings (``np.savez`` writes it as is).

        Arrays in it are never written to again by the aggregator, so it is safe to hand the
        dict to a writer thread.
        """

    @abstractmethod
    def load_state(self, state: Mapping[str, StateValue]) -> None:
        """Restore what `state()` returned (also after an ``np.savez``/``np.load`` round trip,
        which turns numbers and strings into 0-d arrays). Continuing afterwards gives exactly
        the results of an uninterrupted run. Raises ValueError if the state belongs to a
        differently configured aggregator."""

    # --- description -----------------------------------------------------------------

    @property
    @abstractmethod
    def spec(self) -> str:
        """The spec string that `make_aggregator` turns back into an equal aggregator."""

    @property
    def dim(self) -> int | None:
        """Size of the updates of this round, or None before the first `reset`."""
        return self._dim

    @property
    def capacity(self) -> int | None:
        """How many updates this aggregator can hold in a round; None if unbounded."""
        return None

    def contains(self, client_id: str) -> bool:
        """Whether an update with this (non-empty) client id was already counted."""
        return bool(client_id) and client_id in self.client_ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, count={self.count})"

    # --- decode straight into the aggregate -------------------------------------------

    def accumulator(self) -> np.ndarray | None:
        """The running weighted-sum buffer a decoder may add into, or None if there is none.

        Only `WeightedMean` has one (float64 by default, shape ``(dim,)``). It is exposed so a
        codec can see its dtype and size; write into it ONLY through `add_decoded_into`,
        which also advances `count`, `total_weight` and `client_ids`.
        """
        return None

    def add_decoded_into(
        self,
        decode_into: DecodeInto,
        weight: float,
        *,
        client_id: str = "",
        check: UpdateCheck | None = None,
    ) -> None:
        """Fold in one update that ``decode_into`` decodes, without a dense copy if possible.

        ``decode_into(acc, w)`` must ADD ``w * update`` to ``acc`` in place
        (``acc[...] += w * update``, ``acc`` 1-D of ``dim`` values, float64 or float32) and
        return None: exactly the contract of ``codec.decode_accumulate(payload, acc, w)``::

            agg.add_decoded_into(
                lambda acc, w: codec.decode_accumulate(payload, acc, w),
                weight=example_count, client_id=device_id)

        Without ``check``, an aggregator with an `accumulator()` (`WeightedMean`) passes its
        running sum and the real weight: the update is never materialised. The decoder must
        then be all-or-nothing: raise before its first write to ``acc`` (parse and verify the
        whole payload first, write last). If it raises anyway, the aggregator cannot tell
        whether the sum was touched, becomes *poisoned* (every later call raises
        `PoisonedAggregatorError`) until `reset` or `load_state` from the last checkpoint.

        With ``check`` (e.g. the intake's finite / norm-bound validation, which raises to
        reject), or for aggregators without an accumulator (clip, trimmed, median), the update
        is decoded into a zeroed float32 scratch buffer (``decode_into(scratch, 1.0)``, one
        buffer reused for every update), ``check(scratch)`` is called, and only then is it
        added. Any exception from the decoder or the check leaves the aggregator unchanged.
        """
        dim = self._require_dim()
        _check_weight(weight)
        self._check_new_client(client_id)
        if self._scratch is None or self._scratch.shape != (dim,):
            self._scratch = np.zeros(dim, dtype=np.float32)
        else:
            self._scratch.fill(0.0)
        decode_into(self._scratch, 1.0)
        if check is not None:
            check(self._scratch)
        self._add_owned(self._scratch, weight, client_id)

    # --- helpers for subclasses -------------------------------------------------------

    def _add_owned(self, delta: np.ndarray, weight: float, client_id: str) -> None:
        """Like `add`, but ``delta`` is a scratch buffer the aggregator may overwrite."""
        self.add(delta, weight, client_id=client_id)

    def _require_dim(self) -> int:
        if self._dim is None:
            raise AggregationError(
                f"{type(self).__name__} has no round yet: call reset(dim) before adding updates"
            )
        return self._dim

    def _check_update(self, delta: np.ndarray, weight: float, client_id: str) -> None:
        dim = self._require_dim()
        if not isinstance(delta, np.ndarray):
            raise ValueError(f"update must be a numpy array, got {type(delta).__name__}")
        if delta.ndim != 1 or delta.shape[0] != dim:
            raise ValueError(
                f"update has shape {delta.shape}, expected ({dim},): flatten the weights "
                f"delta to one vector of the model's {dim} parameters"
            )
        if delta.dtype.kind != "f":
            raise ValueError(f"update must be a float array (float32), got dtype {delta.dtype}")
        _check_weight(weight)
        self._check_new_client(client_id)

    def _check_new_client(self, client_id: str) -> None:
        if self.contains(client_id):
            raise DuplicateUpdateError(
                f"client {client_id!r} is already counted in this round; "
                "drop the repeated update (acks say 'duplicate')"
            )


def _check_weight(weight: float) -> None:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"weight must be a number, got {weight!r}") from None
    if not (math.isfinite(w) and w > 0.0):
        raise ValueError(
            f"weight must be finite and > 0 (the client's example count), got {weight!r}"
        )


# --------------------------------------------------------------------------------------
# Reading states back (np.load turns scalars into 0-d arrays)
# --------------------------------------------------------------------------------------


def _get(state: Mapping[str, StateValue], key: str) -> StateValue:
    try:
        return state[key]
    except KeyError:
        raise ValueError(
            f"aggregator state lacks {key!r}: not a state() of this aggregator"
        ) from None


def _as_int(state: Mapping[str, StateValue], key: str) -> int:
    return int(np.asarray(_get(state, key)).item())


def _as_float(state: Mapping[str, StateValue], key: str) -> float:
    return float(np.asarray(_get(state, key)).item())


def _as_str(state: Mapping[str, StateValue], key: str) -> str:
    return str(np.asarray(_get(state, key)).item())


def _ids_array(ids: list[str]) -> np.ndarray:
    return np.array(ids, dtype=np.str_) if ids else np.zeros(0, dtype="<U1")


def _ids_from_state(state: Mapping[str, StateValue], count: int) -> list[str]:
    ids = [str(x) for x in np.asarray(_get(state, "client_ids")).reshape(-1).tolist()]
    if len(ids) != count:
        raise ValueError(
            f"aggregator state is inconsistent: {len(ids)} client ids for {count} updates"
        )
    return ids


def _check_kind(state: Mapping[str, StateValue], expected: str, spec: str) -> None:
    kind = _as_str(state, "kind")
    if kind != expected:
        raise ValueError(
            f"checkpoint holds the state of a {kind!r} aggregator, this one is {spec!r}: "
            "build the aggregator from the spec the checkpoint was made with"
        )


def _fmt(x: float) -> str:
    """Shortest exact text for a number in a spec: 10.0 -> '10', 0.1 -> '0.1'."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


# --------------------------------------------------------------------------------------
# Weighted mean (streaming)
# --------------------------------------------------------------------------------------


class WeightedMean(UpdateAggregator):
    """FedAvg's weighted mean ``sum(w_i * d_i) / sum(w_i)``, streaming in O(dim) memory.

    Precision: each product ``w_i * d_i`` is formed in float32 (the update's own precision;
    exact for integer weights < 2**24 times values that need no extra bits, otherwise within
    one float32 rounding) and summed into a float64 buffer, so the sum does not lose the
    small updates once it has grown large, and the result (cast to float32) is independent of
    arrival order to well below float32 resolution. ``accumulator_dtype=np.float32`` halves
    the buffer (3 MB instead of 6 MB for the reference model) at the price of order-dependent
    rounding, about 1e-7 relative per addition.

    Memory: the sum buffer plus one float32 scratch buffer of ``dim`` values, whatever the
    number of updates.
    """

    kind = "mean"

    def __init__(self, accumulator_dtype: type[np.floating] | str = np.float64) -> None:
        super().__init__()
        dtype = np.dtype(accumulator_dtype)
        if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"accumulator_dtype must be float64 or float32, got {dtype}")
        self._dtype = dtype
        self._sum: np.ndarray | None = None
        self._product: np.ndarray | None = None  # float32 scratch for w * delta
        self._count = 0
        self._total_weight = 0.0
        self._ids: list[str] = []
        self._poisoned: str | None = None

    @property
    def accumulator_dtype(self) -> np.dtype:
        return self._dtype

    @property
    def spec(self) -> str:
        return "mean" if self._dtype == np.float64 else "mean:float32"

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    @property
    def client_ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    def contains(self, client_id: str) -> bool:
        return bool(client_id) and client_id in self._ids

    def reset(self, dim: int) -> None:
        dim = _check_dim(dim)
        self._dim = dim
        if self._sum is None or self._sum.shape != (dim,):
            self._sum = np.zeros(dim, dtype=self._dtype)
        else:
            self._sum.fill(0.0)
        self._count = 0
        self._total_weight = 0.0
        self._ids = []
        self._poisoned = None

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._check_healthy()
        self._check_update(delta, weight, client_id)
        assert self._sum is not None and self._dim is not None
        if self._product is None or self._product.shape != (self._dim,):
            self._product = np.empty(self._dim, dtype=np.float32)
        # Same speed as a bare `acc += w * delta`, without allocating a temporary per update.
        np.multiply(delta, np.float32(weight), out=self._product, casting="same_kind")
        np.add(self._sum, self._product, out=self._sum)
        self._count_in(weight, client_id)

    def accumulator(self) -> np.ndarray | None:
        self._require_dim()
        return self._sum

    def add_decoded_into(
        self,
        decode_into: DecodeInto,
        weight: float,
        *,
        client_id: str = "",
        check: UpdateCheck | None = None,
    ) -> None:
        self._check_healthy()
        if check is not None:
            super().add_decoded_into(decode_into, weight, client_id=client_id, check=check)
            return
        self._require_dim()
        _check_weight(weight)
        self._check_new_client(client_id)
        assert self._sum is not None
        try:
            decode_into(self._sum, float(weight))
        except BaseException as exc:
            self._poisoned = (
                f"decoding the update of client {client_id!r} straight into the sum raised "
                f"{type(exc).__name__}: {exc}"
            )
            logger.error("aggregator poisoned: %s", self._poisoned)
            raise
        self._count_in(weight, client_id)

    def result(self) -> np.ndarray:
        self._check_healthy()
        self._require_dim()
        if self._count == 0:
            raise EmptyAggregationError(
                "no update was added this round: there is nothing to average "
                "(skip the model update, or wait for more clients)"
            )
        assert self._sum is not None
        out = np.empty(self._sum.shape, dtype=np.float32)
        np.divide(self._sum, self._total_weight, out=out, casting="same_kind")
        return out

    def state(self) -> State:
        self._check_healthy()
        dim = self._require_dim()
        assert self._sum is not None
        return {
            "kind": self.kind,
            "spec": self.spec,
            "dim": dim,
            "count": self._count,
            "total_weight": self._total_weight,
            "client_ids": _ids_array(self._ids),
            "sum": self._sum.copy(),
        }

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        _check_kind(state, self.kind, self.spec)
        dim = _check_dim(_as_int(state, "dim"))
        count = _as_int(state, "count")
        total = _as_float(state, "total_weight")
        ids = _ids_from_state(state, count)
        acc = np.asarray(_get(state, "sum"))
        if acc.shape != (dim,):
            raise ValueError(f"aggregator state 'sum' has shape {acc.shape}, expected ({dim},)")
        if acc.dtype != self._dtype:
            raise ValueError(
                f"checkpoint sum is {acc.dtype}, this aggregator accumulates in {self._dtype}: "
                f"build it from spec {_as_str(state, 'spec')!r}"
            )
        self._dim = dim
        self._sum = np.array(acc, dtype=self._dtype, copy=True)
        self._count, self._total_weight, self._ids = count, total, ids
        self._poisoned = None

    def _count_in(self, weight: float, client_id: str) -> None:
        self._count += 1
        self._total_weight += float(weight)
        self._ids.append(client_id)

    def _check_healthy(self) -> None:
        if self._poisoned is not None:
            raise PoisonedAggregatorError(
                f"{self._poisoned}; the running sum may hold part of that update. "
                "Restore the last checkpoint with load_state() or reset() the round"
            )


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim must be a positive int (number of model parameters), got {dim!r}")
    return int(dim)


# --------------------------------------------------------------------------------------
# Clipping (a wrapper)
# --------------------------------------------------------------------------------------


def l2_norm(x: np.ndarray) -> float:
    """L2 norm of a float32 vector, block by block with float64 partial sums.

    One float32 BLAS dot over 781K values can drift by ~1e-5 relative; blocks keep it ~1e-7.
    """
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK):
        block = x[start : start + _BLOCK]
        total += float(np.dot(block, block))
    return math.sqrt(total)


class ClippedAggregator(UpdateAggregator):
    """Scales every update down to L2 norm ``max_norm`` (if above it), then passes it on.

    Why: it bounds what any single client can move the model (and is the first step of
    differentially private aggregation). Updates within the bound pass unchanged. It keeps
    no sum of its own: `count`, `total_weight`, `result()` are the inner aggregator's.

    `accumulator()` is None on purpose: a decoder writing straight into the inner sum would
    bypass the clip, so `add_decoded_into` always decodes into the scratch buffer first.
    """

    kind = "clip"

    def __init__(self, inner: UpdateAggregator, max_norm: float) -> None:
        super().__init__()
        if not isinstance(inner, UpdateAggregator):
            raise ValueError(f"inner must be an UpdateAggregator, got {type(inner).__name__}")
        max_norm = float(max_norm)
        if not (math.isfinite(max_norm) and max_norm > 0.0):
            raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
        self.inner = inner
        self.max_norm = max_norm
        self._clipped = 0
        self._max_seen = 0.0
        self._last_norm = 0.0
        self._clip_buffer: np.ndarray | None = None

    @property
    def spec(self) -> str:
        return f"clip:{_fmt(self.max_norm)}|{self.inner.spec}"

    @property
    def clipped_count(self) -> int:
        """How many updates of this round were scaled down."""
        return self._clipped

    @property
    def max_norm_seen(self) -> float:
        """The largest L2 norm of an update this round, before clipping (for tuning max_norm)."""
        return self._max_seen

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self.inner.client_ids

    @property
    def capacity(self) -> int | None:
        return self.inner.capacity

    def contains(self, client_id: str) -> bool:
        return self.inner.contains(client_id)

    def reset(self, dim: int) -> None:
        self._dim = _check_dim(dim)
        self.inner.reset(self._dim)
        self._clipped = 0
        self._max_seen = 0.0

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._check_update(delta, weight, client_id)
        scale = self._scale_for(delta, client_id)
        if scale is None:
            self.inner.add(delta, weight, client_id=client_id)
            self._max_seen = max(self._max_seen, self._last_norm)
            return
        if self._clip_buffer is None or self._clip_buffer.shape != delta.shape:
            self._clip_buffer = np.empty(delta.shape, dtype=np.float32)
        np.multiply(delta, np.float32(scale), out=self._clip_buffer, casting="same_kind")
        self.inner.add(self._clip_buffer, weight, client_id=client_id)
        self._note_clipped()

    def _add_owned(self, delta: np.ndarray, weight: float, client_id: str) -> None:
        self._check_update(delta, weight, client_id)
        scale = self._scale_for(delta, client_id)
        if scale is not None:
            np.multiply(delta, np.float32(scale), out=delta, casting="same_kind")
        self.inner.add(delta, weight, client_id=client_id)
        if scale is None:
            self._max_seen = max(self._max_seen, self._last_norm)
        else:
            self._note_clipped()

    def _scale_for(self, delta: np.ndarray, client_id: str) -> float | None:
        """The factor to clip ``delta`` by, or None if it is within the bound."""
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise ValueError(
                f"update of client {client_id!r} has a non-finite norm: "
                "reject non-finite updates at intake"
            )
        self._last_norm = norm
        if norm <= self.max_norm:
            return None
        logger.debug("clipping update of %r: norm %.4g > %.4g", client_id, norm, self.max_norm)
        return self.max_norm / norm

    def _note_clipped(self) -> None:
        # Called only after the inner add succeeded, so a refused update is not counted.
        self._clipped += 1
        self._max_seen = max(self._max_seen, self._last_norm)

    def result(self) -> np.ndarray:
        return self.inner.result()

    def state(self) -> State:
        dim = self._require_dim()
        out: State = {
            "kind": self.kind,
            "spec": self.spec,
            "dim": dim,
            "max_norm": self.max_norm,
            "clipped": self._clipped,
            "max_norm_seen": self._max_seen,
        }
        for key, value in self.inner.state().items():
            out[f"inner.{key}"] = value
        return out

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        _check_kind(state, self.kind, self.spec)
        saved = _as_float(state, "max_norm")
        if saved != self.max_norm:
            raise ValueError(
                f"checkpoint clips at {saved!r}, this aggregator at {self.max_norm!r}: "
                f"build it from spec {_as_str(state, 'spec')!r}"
            )
        inner = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
        self.inner.load_state(inner)
        self._dim = _check_dim(_as_int(state, "dim"))
        self._clipped = _as_int(state, "clipped")
        self._max_seen = _as_float(state, "max_norm_seen")


# --------------------------------------------------------------------------------------
# Robust statistics (buffering)
# --------------------------------------------------------------------------------------


class _BufferingAggregator(UpdateAggregator):
    """Keeps every update of the round (float32, at most ``max_updates``) for a statistic
    that needs all of them at once. Memory grows by ``4 * dim`` bytes per update."""

    def __init__(self, max_updates: int) -> None:
        super().__init__()
        if isinstance(max_updates, bool) or not isinstance(max_updates, (int, np.integer)):
            raise ValueError(f"max_updates must be an int, got {max_updates!r}")
        if max_updates < 1:
            raise ValueError(f"max_updates must be >= 1, got {max_updates}")
        self.max_updates = int(max_updates)
        self._buf: np.ndarray | None = None  # (max_updates, dim), rows [0, _n) filled
        self._n = 0
        self._weights: list[float] = []
        self._ids: list[str] = []

    @property
    def capacity(self) -> int | None:
        return self.max_updates

    @property
    def count(self) -> int:
        return self._n

    @property
    def total_weight(self) -> float:
        return math.fsum(self._weights)

    @property
    def client_ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    def contains(self, client_id: str) -> bool:
        return bool(client_id) and client_id in self._ids

    def reset(self, dim: int) -> None:
        self._dim = _check_dim(dim)
        self._buf = None
        self._n = 0
        self._weights = []
        self._ids = []

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._check_update(delta, weight, client_id)
        if self._n >= self.max_updates:
            assert self._dim is not None
            raise CapacityExceededError(
                f"{type(self).__name__} already holds max_updates={self.max_updates} updates "
                f"(about {self.max_updates * self._dim * 4 / 1e6:.0f} MB at dim {self._dim}); "
                f"raise it in the spec (e.g. {self._spec_with(2 * self.max_updates)!r}) or "
                "select fewer clients per round"
            )
        self._ensure_rows(self._n + 1)
        assert self._buf is not None
        self._buf[self._n] = delta  # casts to float32
        self._n += 1
        self._weights.append(float(weight))
        self._ids.append(client_id)

    def _ensure_rows(self, rows: int) -> None:
        """Make room for ``rows`` updates.

        The first call reserves all ``max_updates`` rows with `np.empty`: on Linux that is
        address space only, and a row becomes resident memory when it is written, so memory
        grows by exactly one update per `add` and rows are never copied. If the reservation
        itself fails (strict overcommit, ulimit -v) the buffer grows by doubling instead.
        """
        assert self._dim is not None
        have = 0 if self._buf is None else self._buf.shape[0]
        if rows <= have:
            return
        if self._buf is None:
            try:
                self._buf = np.empty((self.max_updates, self._dim), dtype=np.float32)
                return
            except MemoryError:
                logger.warning("cannot reserve %d x %d floats; growing the buffer by doubling",
                               self.max_updates, self._dim)
        new_rows = min(self.max_updates, max(8, 2 * have, rows))
        grown = np.empty((new_rows, self._dim), dtype=np.float32)
        if self._buf is not None:
            grown[: self._n] = self._buf[: self._n]
        self._buf = grown

    def _require_updates(self) -> int:
        """The dimension, once at least one update is buffered (else EmptyAggregationError)."""
        dim = self._require_dim()
        if self._n == 0:
            raise EmptyAggregationError(
                "no update was added this round: there is nothing to aggregate "
                "(skip the model update, or wait for more clients)"
            )
        assert self._buf is not None
        return dim

    def result(self) -> np.ndarray:
        dim = self._require_updates()
        rows = self._buf[: self._n]
        out = np.empty(dim, dtype=np.float32)
        for start in range(0, dim, _BLOCK // 4):
            stop = min(dim, start + _BLOCK // 4)
            # (block, n) contiguous, so the per-coordinate statistic runs along rows.
            block = np.ascontiguousarray(rows[:, start:stop].T)
            out[start:stop] = self._statistic(block)
        return out

    @abstractmethod
    def _statistic(self, block: np.ndarray) -> np.ndarray:
        """Per-row statistic of a (coordinates, updates) float32 block; may reorder it."""

    @abstractmethod
    def _spec_with(self, max_updates: int) -> str:
        """This aggregator's spec with another max_updates."""

    def state(self) -> State:
        dim = self._require_dim()
        if self._buf is None:
            updates = np.zeros((0, dim), dtype=np.float32)
        else:
            # Rows below _n are never written again (reset, load_state and growth make a new
            # array), so a read-only view is a consistent snapshot without copying them.
            updates = self._buf[: self._n]
            updates.flags.writeable = False
        return {
            "kind": self.kind,
            "spec": self.spec,
            "dim": dim,
            "count": self._n,
            "max_updates": self.max_updates,
            "client_ids": _ids_array(self._ids),
            "weights": np.array(self._weights, dtype=np.float64),
            "updates": updates,
            **self._config(),
        }

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        _check_kind(state, self.kind, self.spec)
        self._check_same_config(state)
        dim = _check_dim(_as_int(state, "dim"))
        count = _as_int(state, "count")
        ids = _ids_from_state(state, count)
        weights = np.asarray(_get(state, "weights"), dtype=np.float64).reshape(-1)
        updates = np.asarray(_get(state, "updates"))
        if updates.shape != (count, dim) or weights.shape != (count,):
            raise ValueError(
                f"aggregator state holds updates {updates.shape} and weights {weights.shape}, "
                f"expected ({count}, {dim}) and ({count},)"
            )
        if count > self.max_updates:
            raise ValueError(
                f"checkpoint holds {count} updates, more than max_updates={self.max_updates}"
            )
        self._dim = dim
        self._buf = None
        self._n = 0
        if count:
            self._ensure_rows(count)
            assert self._buf is not None
            self._buf[:count] = updates
        self._n = count
        self._weights = [float(w) for w in weights]
        self._ids = ids

    def _config(self) -> dict[str, float]:
        """Settings that change the statistic; a checkpoint must match them to be loaded.
        (max_updates may differ: resuming with a bigger buffer is fine.)"""
        return {}

    def _check_same_config(self, state: Mapping[str, StateValue]) -> None:
        for key, mine in self._config().items():
            saved = _as_float(state, key)
            if saved != mine:
                raise ValueError(
                    f"checkpoint was made by {_as_str(state, 'spec')!r} ({key}={saved!r}), "
                    f"this aggregator is {self.spec!r}: build it from the checkpoint's spec"
                )


class TrimmedMean(_BufferingAggregator):
    """Coordinate-wise trimmed mean: per parameter, drop the ``floor(trim_fraction * n)``
    smallest and as many largest values of the n updates, and average the rest.

    Robust to a minority of arbitrary (scaled, sign-flipped) updates as long as fewer than
    ``trim_fraction * n`` are bad. Weights are IGNORED by the statistic (each update counts
    once): weighting by a client-reported example count would let one liar dominate, which
    defeats the purpose. `total_weight` still sums them for reporting.
    """

    kind = "trimmed"

    def __init__(self, trim_fraction: float, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates)
        trim_fraction = float(trim_fraction)
        if not (0.0 <= trim_fraction < 0.5):
            raise ValueError(
                "trim_fraction must be in [0, 0.5) (the share cut at EACH end), "
                f"got {trim_fraction!r}"
            )
        self.trim_fraction = trim_fraction

    @property
    def spec(self) -> str:
        return self._spec_with(self.max_updates)

    def _spec_with(self, max_updates: int) -> str:
        return f"trimmed:{_fmt(self.trim_fraction)},{max_updates}"

    def _config(self) -> dict[str, float]:
        return {"trim_fraction": self.trim_fraction}

    def trimmed_per_side(self, n: int) -> int:
        """How many values are cut at each end of n."""
        return int(math.floor(self.trim_fraction * n))

    def _statistic(self, block: np.ndarray) -> np.ndarray:
        n = block.shape[1]
        k = self.trimmed_per_side(n)
        if k:
            block.partition((k, n - k - 1), axis=1)
            block = block[:, k : n - k]
        return block.sum(axis=1, dtype=np.float64) / (n - 2 * k)


class CoordinateMedian(_BufferingAggregator):
    """Coordinate-wise median of the updates (mean of the two middle values for even n).

    The most robust of the three (up to half the updates may be arbitrary), and the noisiest
    on honest data. Weights are IGNORED, as in `TrimmedMean`.
    """

    kind = "median"

    def __init__(self, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates)

    @property
    def spec(self) -> str:
        return self._spec_with(self.max_updates)

    def _spec_with(self, max_updates: int) -> str:
        return f"median:{max_updates}"

    def _statistic(self, block: np.ndarray) -> np.ndarray:
        return np.median(block, axis=1, overwrite_input=True)


class _BufferingWrapper(_BufferingAggregator):
    """A buffering stage in front of another aggregator (normclip, krum): it sees the whole
    round's updates at `result()`, decides what each one becomes, and feeds ``inner``.

    Shared here: the inner aggregator's check, the spec, finite-norm refusal at `add`, the
    empty-round error, and the checkpoint's inner-spec check. Subclasses write `_feed_inner`
    (the round's decision) and `_clear` (their per-round report).
    """

    def __init__(self, inner: UpdateAggregator, max_updates: int) -> None:
        super().__init__(max_updates)
        if not isinstance(inner, UpdateAggregator):
            raise ValueError(f"inner must be an UpdateAggregator, got {type(inner).__name__}")
        self.inner = inner

    @property
    def spec(self) -> str:
        return self._spec_with(self.max_updates)

    def _clear(self) -> None:
        """Forget the last round's report (a new round starts, or a checkpoint was loaded)."""

    def reset(self, dim: int) -> None:
        super().reset(dim)
        self.inner.reset(self._require_dim())
        self._clear()

    def _add_finite(self, delta: np.ndarray, weight: float, client_id: str) -> float:
        """Buffer the update; returns its L2 norm (refusing a non-finite one)."""
        self._check_update(delta, weight, client_id)
        norm = l2_norm(np.asarray(delta, dtype=np.float32))
        if not math.isfinite(norm):
            raise ValueError(
                f"update of client {client_id!r} has a non-finite norm: "
                "reject non-finite updates at intake"
            )
        super().add(delta, weight, client_id=client_id)
        return norm

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._add_finite(delta, weight, client_id)

    def result(self) -> np.ndarray:
        dim = self._require_updates()
        self.inner.reset(dim)
        self._feed_inner(dim)
        return self.inner.result()

    def _feed_inner(self, dim: int) -> None:
        raise NotImplementedError

    def _statistic(self, block: np.ndarray) -> np.ndarray:
        raise AssertionError(f"{type(self).__name__} overrides result(); no per-coordinate statistic")

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        saved_inner = _as_str(state, "spec").split("|", 1)[-1]
        if saved_inner != self.inner.spec:
            raise ValueError(
                f"checkpoint was made by {_as_str(state, 'spec')!r}, this aggregator is {self.spec!r}: "
                "build it from the checkpoint's spec"
            )
        super().load_state(state)
        self._clear()
        self.inner.reset(self._require_dim())


class MedianNormClip(_BufferingWrapper):
    """Scales every update down to ``factor`` times the median L2 norm of the round's updates,
    then hands them all to ``inner`` (a wrapper, e.g. ``"normclip:median*2|mean"``).

    Why relative to the median: a fixed bound (`ClippedAggregator`) must be tuned to the honest
    norms, which shrink as training converges and differ between models; the median norm of
    the cohort tracks them by itself, and a minority of attackers (fewer than half the updates)
    cannot move it. A scaled update then counts at most ``factor`` median-sized updates, while
    honest updates, mostly below the bound, pass unchanged and keep their example-count weights
    (unlike `TrimmedMean` and `CoordinateMedian`, which drop the weights).

    The median is known only once the round's updates are in, so the updates are buffered
    (``4 * dim`` bytes each, at most ``max_updates``) and fed to ``inner`` at `result()`.
    `clipped_ids` says which updates the last `result()` scaled down.
    """

    kind = "normclip"

    def __init__(self, inner: UpdateAggregator, factor: float,
                 max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(inner, max_updates)
        factor = float(factor)
        if not (math.isfinite(factor) and factor > 0.0):
            raise ValueError(f"factor (times the median norm) must be finite and > 0, got {factor!r}")
        self.factor = factor
        self._norms: list[float] = []
        self._clipped_ids: tuple[str, ...] = ()
        self._bound = 0.0

    def _spec_with(self, max_updates: int) -> str:
        return f"normclip:median*{_fmt(self.factor)},{max_updates}|{self.inner.spec}"

    def _config(self) -> dict[str, float]:
        return {"factor": self.factor}

    @property
    def clipped_ids(self) -> tuple[str, ...]:
        """Client ids of the updates the last `result()` scaled down."""
        return self._clipped_ids

    @property
    def clipped_count(self) -> int:
        return len(self._clipped_ids)

    @property
    def bound(self) -> float:
        """The L2 bound the last `result()` clipped to (factor x median norm)."""
        return self._bound

    def _clear(self) -> None:
        self._norms = [l2_norm(self._buf[i]) for i in range(self._n)] if self._buf is not None else []
        self._clipped_ids = ()
        self._bound = 0.0

    def add(self, delta: np.ndarray, weight: float, *, client_id: str = "") -> None:
        self._norms.append(self._add_finite(delta, weight, client_id))

    def _feed_inner(self, dim: int) -> None:
        norms = np.array(self._norms, dtype=np.float64)
        self._bound = self.factor * float(np.median(norms))
        scaled = np.empty(dim, dtype=np.float32)
        clipped: list[str] = []
        for i in range(self._n):
            row = self._buf[i]
            if norms[i] > self._bound:
                np.multiply(row, np.float32(self._bound / norms[i]), out=scaled)
                row = scaled
                clipped.append(self._ids[i])
            self.inner.add(row, self._weights[i], client_id=self._ids[i])
        self._clipped_ids = tuple(clipped)
        if clipped:
            logger.debug("normclip: %d of %d updates scaled down to %.4g", len(clipped), self._n, self._bound)


class MultiKrum(_BufferingWrapper):
    """Multi-Krum (Blanchard et al. 2017): keeps the ``m`` updates closest to their neighbours,
    drops the rest, and hands the kept ones, with their example-count weights, to ``inner``
    (a wrapper, e.g. ``"krum:f=2|mean"``).

    Score of an update = sum of squared L2 distances to its ``n - f - 2`` nearest other
    updates; the ``m`` (default ``n - f``) lowest scores are kept. Why, beside `MedianNormClip`:
    a sign-flipped update with an honest norm passes any norm bound, but it lies far from the
    honest cluster, so its score is high and it is dropped whatever its norm. The price: up to
    ``f`` honest updates a round are dropped even when nobody attacks, and the guarantee needs
    ``n > 2f + 2`` (fewer updates still aggregate, with a warning, on ``max(1, n - f - 2)``
    neighbours).

    Updates are buffered (``4 * dim`` bytes each, at most ``max_updates``) and fed to ``inner``
    at `result()`, in arrival order; ties in score keep the earlier update. Pairwise distances
    are accumulated block by block in float64 (a Gram matrix per block), so the temporaries
    stay a few MB whatever the model size. `selected_ids` / `dropped_ids` / `scores` describe
    the last `result()`.

    ``cosine=True`` (spec ``krum:f=2,cosine``) scores directions only: the distance of two
    updates is ``2 - 2 cos(angle)``, as if both had norm 1. Why: with Euclidean distances
    small updates (clients with little data) sit near the origin and near each other whatever
    their direction, so a sign-flipped small update scores as well as an honest one and large
    honest updates are dropped instead. Magnitude is then left to a norm bound in front
    (``normclip:median*2|krum:f=2,cosine|mean``).
    """

    kind = "krum"

    def __init__(self, inner: UpdateAggregator, f: int, m: int | None = None,
                 max_updates: int = DEFAULT_MAX_UPDATES, *, cosine: bool = False) -> None:
        super().__init__(inner, max_updates)
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
            raise ValueError(f"f (the number of Byzantine updates to tolerate) must be an int >= 0, got {f!r}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
            raise ValueError(f"m (how many updates to keep) must be an int >= 1 or None (n - f), got {m!r}")
        self.f = int(f)
        self.m = None if m is None else int(m)
        self.cosine = bool(cosine)
        self._selected_ids: tuple[str, ...] = ()
        self._dropped_ids: tuple[str, ...] = ()
        self._scores: dict[str, float] = {}

    def _spec_with(self, max_updates: int) -> str:
        keep = "" if self.m is None else f",m={self.m}"
        cosine = ",cosine" if self.cosine else ""
        return f"krum:f={self.f}{keep}{cosine},{max_updates}|{self.inner.spec}"

    def _config(self) -> dict[str, float]:
        return {"f": float(self.f), "m": float(-1 if self.m is None else self.m),
                "cosine": float(self.cosine)}

    @property
    def selected_ids(self) -> tuple[str, ...]:
        """Client ids the last `result()` passed to the inner aggregator, in arrival order."""
        return self._selected_ids

    @property
    def dropped_ids(self) -> tuple[str, ...]:
        """Client ids the last `result()` dropped as outliers, in arrival order."""
        return self._dropped_ids

    @property
    def scores(self) -> dict[str, float]:
        """Krum score of every update of the last `result()`, by client id (higher = farther)."""
        return dict(self._scores)

    @property
    def clipped_ids(self) -> tuple[str, ...]:
        """Ids an inner clipping stage scaled down (e.g. ``krum:f=2|normclip:median*2|mean``)."""
        return tuple(getattr(self.inner, "clipped_ids", ()))

    def neighbours(self, n: int) -> int:
        """How many nearest neighbours make up the score of each of n updates."""
        return max(0, min(n - 1, max(1, n - self.f - 2)))

    def kept(self, n: int) -> int:
        """How many of n updates are kept."""
        return max(1, min(n, n - self.f if self.m is None else self.m))

    def _clear(self) -> None:
        self._selected_ids = ()
        self._dropped_ids = ()
        self._scores = {}

    def pairwise_sq_distances(self) -> np.ndarray:
        """(n, n) float64 squared L2 distances between the buffered updates (between their
        unit vectors, ``2 - 2 cos``, with ``cosine``; a zero update stays at the origin, at
        distance 1 from every direction)."""
        self._require_dim()
        n = self._n
        if n == 0 or self._buf is None:
            return np.zeros((0, 0), dtype=np.float64)
        rows = self._buf[:n]
        gram = np.zeros((n, n), dtype=np.float64)
        step = max(1, _BLOCK // 4)
        for start in range(0, rows.shape[1], step):
            block = rows[:, start : start + step].astype(np.float64)
            gram += block @ block.T
        sq = np.diag(gram).copy()
        if self.cosine:
            norms = np.sqrt(sq)
            inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
            gram = gram * inv[:, None] * inv[None, :]
            sq = (norms > 0).astype(np.float64)
        dist = sq[:, None] + sq[None, :] - 2.0 * gram
        np.maximum(dist, 0.0, out=dist)  # rounding may leave tiny negatives
        np.fill_diagonal(dist, 0.0)
        return dist

    def krum_scores(self) -> np.ndarray:
        """Score of each buffered update: sum of squared distances to its nearest neighbours."""
        n = self._n
        dist = self.pairwise_sq_distances()
        k = self.neighbours(n)
        if n == 0 or k == 0:
            return np.zeros(n, dtype=np.float64)
        others = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, :k]  # self excluded
        return others.sum(axis=1)

    def _feed_inner(self, dim: int) -> None:
        n = self._n
        if n <= 2 * self.f + 2:
            logger.warning("krum: %d updates for f=%d; its guarantee needs more than 2f + 2 = %d",
                           n, self.f, 2 * self.f + 2)
        scores = self.krum_scores()
        keep = np.sort(np.argsort(scores, kind="stable")[: self.kept(n)])
        chosen = set(keep.tolist())
        for i in keep:
            self.inner.add(self._buf[i], self._weights[i], client_id=self._ids[i])
        self._selected_ids = tuple(self._ids[i] for i in keep)
        self._dropped_ids = tuple(self._ids[i] for i in range(n) if i not in chosen)
        self._scores = {self._ids[i]: float(scores[i]) for i in range(n)}
        if self._dropped_ids:
            logger.debug("krum: dropped %d of %d updates: %s", len(self._dropped_ids), n, self._dropped_ids)


def make_aggregator(spec: str) -> UpdateAggregator:
    """Build an aggregator from a short spec, e.g. ``"clip:10|mean"`` (see `SPEC_HELP`).

    Stages are applied left to right to each update: wrappers (``clip``, ``normclip``,
    ``krum``) first, in any order and number, then exactly one aggregator (``mean``,
    ``trimmed``, ``median``) last. Raises ValueError naming the
    stage that is wrong and what was expected.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty aggregator spec {spec!r}: {SPEC_HELP}")
    stages = [s.strip().lower() for s in spec.split("|")]
    if "" in stages:
        raise ValueError(
            f"bad aggregator spec {spec!r}: empty stage (two '|' in a row, or a '|' at an end). "
            f"{SPEC_HELP}"
        )
    # Each wrapper stage becomes a function that wraps the aggregator built from the stages after it.
    wrappers: list[Callable[[UpdateAggregator], UpdateAggregator]] = []
    for position, stage in enumerate(stages):
        name, _, arg_text = stage.partition(":")
        name = name.strip()
        args = [a.strip() for a in arg_text.split(",")] if arg_text.strip() else []
        last = position == len(stages) - 1

        def fail(problem: str, stage: str = stage) -> ValueError:
            return ValueError(
                f"bad aggregator spec {spec!r}, stage {stage!r}: {problem}. {SPEC_HELP}"
            )

        if name == "normclip":
            if last:
                raise fail("'normclip' wraps an aggregator and cannot be the last stage; add e.g. '|mean'")
            factor, max_updates = _median_factor(args, fail)
            wrappers.append(lambda inner, k=factor, cap=max_updates: MedianNormClip(inner, k, cap))
            continue
        if name == "krum":
            if last:
                raise fail("'krum' wraps an aggregator and cannot be the last stage; add e.g. '|mean'")
            f, m, max_updates, cosine = _krum_args(args, fail)
            wrappers.append(lambda inner, f=f, m=m, cap=max_updates, cos=cosine:
                            MultiKrum(inner, f, m, cap, cosine=cos))
            continue
        if name == "clip":
            if last:
                raise fail(
                    "'clip' wraps an aggregator and cannot be the last stage; add e.g. '|mean'"
                )
            if len(args) != 1:
                raise fail("'clip' takes exactly one argument, the L2 bound, e.g. 'clip:10'")
            bound = _positive_float(args[0], "clip max_norm", fail)
            wrappers.append(lambda inner, c=bound: ClippedAggregator(inner, c))
            continue
        if name not in ("mean", "trimmed", "median"):
            raise fail(f"unknown stage {name!r}; known: clip, normclip, krum, mean, trimmed, median")
        if not last:
            raise fail(f"{name!r} is an aggregator and must be the last stage")
        agg = _terminal(name, args, fail)
        for wrap in reversed(wrappers):
            agg = wrap(agg)
        return agg
    raise AssertionError("unreachable")  # the loop always returns or raises on the last stage


def _terminal(name: str, args: list[str], fail: Callable[[str], ValueError]) -> UpdateAggregator:
    if name == "mean":
        if not args:
            return WeightedMean()
        if len(args) == 1 and args[0] in ("float64", "float32"):
            return WeightedMean(np.float64 if args[0] == "float64" else np.float32)
        raise fail("'mean' takes no argument or the accumulator dtype, 'mean:float32'")
    if name == "trimmed":
        if len(args) not in (1, 2):
            raise fail(
                "'trimmed' takes the fraction cut at each end and optionally max_updates, "
                "e.g. 'trimmed:0.1' or 'trimmed:0.1,50'"
            )
        try:
            fraction = float(args[0])
        except ValueError:
            raise fail(f"trim fraction {args[0]!r} is not a number") from None
        if not (0.0 <= fraction < 0.5):
            raise fail(f"trim fraction must be in [0, 0.5) (cut at EACH end), got {args[0]}")
        max_updates = DEFAULT_MAX_UPDATES
        if len(args) == 2:
            max_updates = _positive_int(args[1], "max_updates", fail)
        return TrimmedMean(fraction, max_updates)
    # median
    if len(args) > 1:
        raise fail("'median' takes at most one argument, max_updates, e.g. 'median:50'")
    max_updates = _positive_int(args[0], "max_updates", fail) if args else DEFAULT_MAX_UPDATES
    return CoordinateMedian(max_updates)


def _median_factor(args: list[str], fail: Callable[[str], ValueError]) -> tuple[float, int]:
    """'normclip:median*K[,MAX_UPDATES]' (or 'normclip:K') -> (K, max_updates)."""
    if len(args) not in (1, 2):
        raise fail("'normclip' takes the bound as a multiple of the median norm and optionally "
                   "max_updates, e.g. 'normclip:median*2' or 'normclip:median*2,50'")
    text = args[0].replace(" ", "")
    if text.startswith("median*"):
        text = text[len("median*"):]
    factor = _positive_float(text, "normclip factor", fail)
    max_updates = _positive_int(args[1], "max_updates", fail) if len(args) == 2 else DEFAULT_MAX_UPDATES
    return factor, max_updates


def _krum_args(args: list[str], fail: Callable[[str], ValueError]) -> tuple[int, int | None, int, bool]:
    """'krum:f=F[,m=M][,cosine][,MAX_UPDATES]' -> (f, m or None, max_updates, cosine)."""
    usage = ("'krum' takes f=F (Byzantine updates to tolerate), optionally m=M (updates to keep, "
             "default n - f), 'cosine' (compare directions only) and max_updates, "
             "e.g. 'krum:f=2', 'krum:f=2,cosine' or 'krum:f=2,m=15,50'")
    f: int | None = None
    m: int | None = None
    cosine = False
    max_updates = DEFAULT_MAX_UPDATES
    for arg in args:
        key, eq, value = arg.partition("=")
        key, value = key.strip(), value.strip()
        if not eq and key == "cosine":
            cosine = True
        elif not eq:
            max_updates = _positive_int(key, "max_updates", fail)
        elif key == "f":
            f = _positive_int(value, "krum f", fail, low=0)
        elif key == "m":
            m = _positive_int(value, "krum m", fail)
        else:
            raise fail(f"unknown krum argument {key!r}; {usage}")
    if f is None:
        raise fail(usage)
    return f, m, max_updates, cosine


def _positive_float(text: str, what: str, fail: Callable[[str], ValueError]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise fail(f"{what} {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0.0):
        raise fail(f"{what} must be finite and > 0, got {text}")
    return value


def _positive_int(text: str, what: str, fail: Callable[[str], ValueError], *, low: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise fail(f"{what} {text!r} is not an integer") from None
    if value < low:
        raise fail(f"{what} must be >= {low}, got {text}")
    return value


__all__ = [
    "AggregationError",
    "CapacityExceededError",
    "ClippedAggregator",
    "CoordinateMedian",
    "DEFAULT_MAX_UPDATES",
    "DecodeInto",
    "DuplicateUpdateError",
    "EmptyAggregationError",
    "MedianNormClip",
    "MultiKrum",
    "PoisonedAggregatorError",
    "SPEC_HELP",
    "State",
    "TrimmedMean",
    "UpdateAggregator",
    "UpdateCheck",
    "WeightedMean",
    "l2_norm",
    "make_aggregator",
]
