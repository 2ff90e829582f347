"""Typed errors for everything a network peer can send us.

Every parser in `protocol/` raises a subclass of `ProtocolError` and never anything else, so
a receiver can reject bad input with one `except`, log the reason and keep running.
"""
from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Machine-readable rejection reasons; they travel in acks and metrics."""

    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    BAD_FIELD = "bad_field"
    TOO_LARGE = "too_large"
    BAD_CHECKSUM = "bad_checksum"
    BAD_CODEC = "bad_codec"
    BAD_PAYLOAD = "bad_payload"
    WRONG_SIZE = "wrong_size"
    NOT_FINITE = "not_finite"
    NORM_TOO_LARGE = "norm_too_large"
    WRONG_ROUND = "wrong_round"
    ROUND_CLOSED = "round_closed"
    STALE_BASE = "stale_base"
    NOT_IN_COHORT = "not_in_cohort"
    DUPLICATE = "duplicate"
    BAD_SIGNATURE = "bad_signature"
    BAD_HASH = "bad_hash"
    OLD_VERSION = "old_version"
    WRONG_MODEL = "wrong_model"


class ProtocolError(ValueError):
    """Input from the network (or a config) that we refuse; `reason` says which rule failed."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class EnvelopeError(ProtocolError):
    """A message envelope that is malformed, truncated, oversized or fails its checksum."""


class CodecError(ProtocolError):
    """A codec spec that does not parse, or a payload that does not decode to what it claims."""


class ValidationError(ProtocolError):
    """A well-formed update that breaks a rule of the round (wrong round, size, norm...)."""


class TrustError(ProtocolError):
    """A model or manifest whose signature, hash, version or model id is not acceptable."""
