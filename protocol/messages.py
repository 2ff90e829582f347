"""Control messages of the round protocol, carried in an envelope's JSON metadata block.

Each is a frozen dataclass with a strict `from_dict`: unknown or missing fields and wrong
types are an EnvelopeError naming the field, because these arrive from the network.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from protocol.envelope import Envelope, Kind
from protocol.errors import EnvelopeError, Reason

T = TypeVar("T")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Type hints and fields of a message class, worked out once: `get_type_hints` evaluates the
    string annotations anew on every call (~0.2 ms), and a simulator parses 1,000s of plans,
    check-ins and assignments per round."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: Any, *, what: str | None = None) -> T:
    """Build dataclass `cls` from untrusted `data`, checking field names and scalar types."""
    name = what or cls.__name__
    if not isinstance(data, dict):
        raise EnvelopeError(Reason.BAD_FIELD, f"{name} must be a JSON object, got {type(data).__name__}")
    hints, fields = _schema(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise EnvelopeError(Reason.BAD_FIELD, f"{name}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for key, f in fields.items():
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise EnvelopeError(Reason.BAD_FIELD, f"{name}: missing field {key!r}")
            continue
        kwargs[key] = _check_type(name, key, data[key], hints[key])
    return cls(**kwargs)


def _check_type(name: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(name, key, value, option)
            except EnvelopeError:
                continue
        raise EnvelopeError(Reason.BAD_FIELD, f"{name}.{key}: {_show(value)} is not a {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # an int beyond float range (JSON allows any size) is refused, not an OverflowError
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str) and len(value) <= 4096:
            return value
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif origin in (list, tuple):
        if isinstance(value, list):
            return tuple(value) if origin is tuple else value
    raise EnvelopeError(Reason.BAD_FIELD, f"{name}.{key}: {_show(value)} is not a valid {getattr(hint, '__name__', hint)}")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any) -> str:
    """A short repr for error messages: untrusted values may be huge ints or nested 900 deep."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return reprlib.repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} that cannot be shown>"


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclass(frozen=True)
class RoundPlan:
    """What the aggregator asks of a round; retained on `round/current`.

    Times are durations, not wall-clock instants, so a device with a skewed clock still
    honours them (it measures them on its own monotonic clock from when it got the plan).
    """

    round_id: int
    base_version: int
    model_id: str
    codec: str
    target_count: int
    checkin_window_s: float
    report_deadline_s: float
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1.0
    mu: float = 0.0
    max_steps: int = 0
    downlink: str = "f32"
    clip_norm: float = 5.0  # local gradient clipping (global L2 norm per step); 0 = off
    # True when the aggregator also publishes the base version as a signed delta against the
    # version before it (`model/delta`): a device that still holds that version fetches the
    # small delta instead of the full model, and falls back to the full one if it cannot.
    delta_downlink: bool = False
    # Secure aggregation (aggregator/PRIVACY.md): devices answer with the four-phase protocol on
    # secagg/up/<device> instead of an UPDATE; its parameters travel in the KeyRoster.
    secure_aggregation: bool = False
    update_clip: float = 0.0  # L2 bound devices clip their whole update to before masking; 0 = none
    secure_weighted: bool = False  # devices mask (examples x update, examples): an example-weighted mean

    def to_envelope(self, fleet: str) -> Envelope:
        return Envelope(Kind.PLAN, fleet, round=self.round_id, base_version=self.base_version, meta=to_dict(self))

    @staticmethod
    def from_envelope(env: Envelope) -> "RoundPlan":
        plan = from_dict(RoundPlan, env.meta)
        if plan.round_id != env.round:
            raise EnvelopeError(Reason.BAD_FIELD, "round plan disagrees with its envelope's round")
        return plan


@dataclass(frozen=True)
class CheckIn:
    """A device says: I am eligible for this round and hold this model version."""

    round_id: int
    model_version: int
    train_examples: int
    platform: str = ""

    def to_envelope(self, fleet: str, device: str) -> Envelope:
        return Envelope(Kind.CHECKIN, fleet, device, round=self.round_id, base_version=self.model_version,
                        example_count=self.train_examples, meta=to_dict(self))

    @staticmethod
    def from_envelope(env: Envelope) -> "CheckIn":
        return from_dict(CheckIn, env.meta)


@dataclass(frozen=True)
class Assignment:
    """The aggregator's answer to a check-in: selected or not, and when to check in again (a
    selected device too: after its round; 0 = at the next round)."""

    round_id: int
    selected: bool
    retry_after_s: float = 0.0
    reason: str = ""
    # pace steering: the round this device is expected back for; it sits out the plans of earlier
    # rounds it hears (the retained one at its wake-up, one published just before). 0 = any.
    back_for_round: int = 0

    def to_envelope(self, fleet: str, device: str) -> Envelope:
        return Envelope(Kind.ASSIGN, fleet, device, round=self.round_id, meta=to_dict(self))

    @staticmethod
    def from_envelope(env: Envelope) -> "Assignment":
        return from_dict(Assignment, env.meta)


@dataclass(frozen=True)
class Ack:
    """Whether an update was accepted; a rejection carries the reason code and detail."""

    round_id: int
    accepted: bool
    reason: str = ""
    detail: str = ""

    def to_envelope(self, fleet: str, device: str) -> Envelope:
        return Envelope(Kind.ACK, fleet, device, round=self.round_id, meta=to_dict(self))

    @staticmethod
    def from_envelope(env: Envelope) -> "Ack":
        return from_dict(Ack, env.meta)


@dataclass(frozen=True)
class UpdateMeta:
    """Training metrics that ride along with an update (never any text)."""

    train_loss: float
    first_loss: float
    steps: int
    train_s: float
    residual_norm: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
