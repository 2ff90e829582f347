"""Update intake: every update is validated before it can touch the model.

The rules, in the order they are checked (cheapest first, so junk costs little):
envelope well-formed (done by the caller's decode_envelope), round matching and open,
device in the cohort, not a duplicate (QoS 1 redelivery counts once, also across a restart
because the accepted ids are in the checkpoint), base version current, example count sane,
codec the one the round asked for, payload no larger than that codec can produce for the
model, payload decoding to exactly the model size, all values finite, L2 norm under the
bound. A violation is a ValidationError whose reason travels back in the ack.

`check_header` runs the rules that need no decoding; `value_check` returns the check for
the decoded values, meant for `UpdateAggregator.add_decoded_into(..., check=...)`, which
decodes into one reused scratch buffer instead of a fresh array per update.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aggregator.aggregation import l2_norm
from protocol.codec import Codec, parse_codec
from protocol.envelope import Envelope, Kind
from protocol.errors import CodecError, Reason, ValidationError


@dataclass
class RoundState:
    """What intake needs to know about the open round."""

    round_id: int
    base_version: int
    codec: str
    cohort: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    open: bool = True


@dataclass(frozen=True)
class IntakeLimits:
    dim: int
    max_norm: float = 1e3
    max_examples: int = 10_000_000


def max_payload_bytes(codec: Codec, dim: int) -> int:
    """The largest payload `codec` can produce for `dim` values (zstd may add a little)."""
    body = codec.max_payload_body(dim)
    return body + body // 64 + 1024


def check_header(env: Envelope, state: RoundState, limits: IntakeLimits) -> Codec:
    """Every rule that needs no decoding; returns the round's codec. Raises ValidationError."""
    if env.kind != Kind.UPDATE:
        raise ValidationError(Reason.BAD_KIND, f"expected an UPDATE, got {env.kind.name}")
    if env.round < state.round_id:
        raise ValidationError(Reason.ROUND_CLOSED, f"update is for round {env.round}, which is closed "
                                                   f"(round {state.round_id} is the current one)")
    if env.round != state.round_id:
        raise ValidationError(Reason.WRONG_ROUND, f"update is for round {env.round}, round {state.round_id} is open")
    if env.device in state.accepted:
        raise ValidationError(Reason.DUPLICATE, f"an update from {env.device!r} was already accepted this round")
    if not state.open:
        raise ValidationError(Reason.ROUND_CLOSED, f"round {state.round_id} is already closed")
    if env.device not in state.cohort:
        raise ValidationError(Reason.NOT_IN_COHORT, f"device {env.device!r} was not selected for round {state.round_id}")
    if env.base_version != state.base_version:
        raise ValidationError(Reason.STALE_BASE, f"trained from version {env.base_version}, round uses {state.base_version}")
    if not 0 < env.example_count <= limits.max_examples:
        raise ValidationError(Reason.BAD_FIELD, f"example count {env.example_count} out of range 1..{limits.max_examples}")
    if env.codec != state.codec:
        raise ValidationError(Reason.BAD_CODEC, f"codec {env.codec!r}, the round asked for {state.codec!r}")
    codec = parse_codec(env.codec)
    limit = max_payload_bytes(codec, limits.dim)
    if len(env.payload) > limit:
        raise ValidationError(Reason.TOO_LARGE, f"payload of {len(env.payload)} bytes is more than codec "
                                                f"{codec.spec!r} can produce for {limits.dim} values ({limit})")
    return codec


def check_values(delta: np.ndarray, limits: IntakeLimits) -> None:
    """Exact size, finite values, L2 norm within the bound; ValidationError otherwise."""
    if delta.shape != (limits.dim,):
        raise ValidationError(Reason.WRONG_SIZE, f"update has {delta.size} values, model has {limits.dim}")
    norm = l2_norm(delta)  # NaN or inf in the update make the norm non-finite: one pass checks both
    if not math.isfinite(norm) and not np.isfinite(delta).all():
        raise ValidationError(Reason.NOT_FINITE, "update contains NaN or infinite values")
    if not norm <= limits.max_norm:
        raise ValidationError(Reason.NORM_TOO_LARGE, f"update L2 norm {norm:.3g} exceeds the bound {limits.max_norm:.3g}")


def value_check(limits: IntakeLimits) -> Callable[[np.ndarray], None]:
    """`check_values` bound to `limits`, in the shape `add_decoded_into(check=...)` wants."""
    return lambda delta: check_values(delta, limits)


def decode_into(codec: Codec, payload: bytes) -> Callable[[np.ndarray, float], None]:
    """The `decode_into(acc, w)` of `add_decoded_into`, with codec errors as ValidationError."""
    def run(acc: np.ndarray, weight: float) -> None:
        try:
            codec.decode_accumulate(payload, acc, weight)
        except CodecError as exc:
            raise ValidationError(exc.reason, exc.detail) from None
    return run


def validate_update(env: Envelope, state: RoundState, limits: IntakeLimits) -> np.ndarray:
    """Return the decoded delta of an acceptable update, else raise ValidationError."""
    codec = check_header(env, state, limits)
    try:
        delta = codec.decode(env.payload, limits.dim)
    except CodecError as exc:
        raise ValidationError(exc.reason, exc.detail) from None
    check_values(delta, limits)
    return delta
