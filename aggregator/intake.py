"""Update intake: every update is validated before it can touch the model.

The rules, in the order they are checked (cheapest first, so junk costs little):
envelope well-formed (done by the caller's decode_envelope), round open and matching,
device in the cohort, not a duplicate (QoS 1 redelivery counts once), base version current,
codec allowed and payload decoding to exactly the model size, all values finite, L2 norm
under the bound. A violation is a ValidationError whose reason travels back in the ack.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.codec import parse_codec
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


def validate_update(env: Envelope, state: RoundState, limits: IntakeLimits) -> np.ndarray:
    """Return the decoded delta of an acceptable update, else raise ValidationError."""
    if env.kind != Kind.UPDATE:
        raise ValidationError(Reason.BAD_KIND, f"expected an UPDATE, got {env.kind.name}")
    if env.round != state.round_id:
        raise ValidationError(Reason.WRONG_ROUND, f"update is for round {env.round}, round {state.round_id} is open")
    if not state.open:
        raise ValidationError(Reason.ROUND_CLOSED, f"round {state.round_id} is already closed")
    if env.device not in state.cohort:
        raise ValidationError(Reason.NOT_IN_COHORT, f"device {env.device!r} was not selected for round {state.round_id}")
    if env.device in state.accepted:
        raise ValidationError(Reason.DUPLICATE, f"an update from {env.device!r} was already accepted this round")
    if env.base_version != state.base_version:
        raise ValidationError(Reason.STALE_BASE, f"trained from version {env.base_version}, round uses {state.base_version}")
    if not 0 < env.example_count <= limits.max_examples:
        raise ValidationError(Reason.BAD_FIELD, f"example count {env.example_count} out of range")
    if env.codec != state.codec:
        raise ValidationError(Reason.BAD_CODEC, f"codec {env.codec!r}, the round asked for {state.codec!r}")
    try:
        delta = parse_codec(env.codec).decode(env.payload, limits.dim)
    except CodecError as exc:
        raise ValidationError(exc.reason, exc.detail) from None
    if delta.shape != (limits.dim,):
        raise ValidationError(Reason.WRONG_SIZE, f"update has {delta.size} values, model has {limits.dim}")
    if not np.all(np.isfinite(delta)):
        raise ValidationError(Reason.NOT_FINITE, "update contains NaN or infinite values")
    norm = float(np.linalg.norm(delta))
    if norm > limits.max_norm:
        raise ValidationError(Reason.NORM_TOO_LARGE, f"update L2 norm {norm:.3g} exceeds the bound {limits.max_norm:.3g}")
    return delta
