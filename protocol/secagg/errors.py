"""Typed errors of secure aggregation, all `ProtocolError`s so a receiver rejects them with one
`except`, logs the reason code and keeps running.

- `SecAggFormatError` (an `EnvelopeError`): bytes that do not parse: truncated, bad magic,
  wrong lengths, trailing bytes, ids or keys of the wrong shape.
- `SecAggPhaseError`: a well-formed message that arrives in the wrong phase, twice, from a
  device that is not part of the phase, or for another round.
- `SecAggTrustError` (a `TrustError`): a message that fails a cryptographic check: a share
  ciphertext that does not authenticate, a bad key signature, shares that do not lie on one
  polynomial, a reconstructed key that is not the one the device advertised.
- `SecAggAbortedError`: the round cannot finish: fewer than `threshold` devices are left.
"""
from __future__ import annotations

from protocol.errors import EnvelopeError, ProtocolError, Reason, TrustError


class SecAggError(ProtocolError):
    """Base class of every secure-aggregation error."""


class SecAggFormatError(SecAggError, EnvelopeError):
    """A secure-aggregation message that does not parse."""


class SecAggPhaseError(SecAggError):
    """A message out of order, duplicated, or from a device that has no business sending it."""


class SecAggTrustError(SecAggError, TrustError):
    """A message that fails authentication or a consistency check (forged or corrupted)."""


class SecAggAbortedError(SecAggError):
    """Fewer than `threshold` devices remain: the sum cannot be unmasked, the round fails."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.ROUND_CLOSED, detail)


def format_error(reason: Reason, detail: str) -> SecAggFormatError:
    return SecAggFormatError(reason, detail)


def phase_error(detail: str, reason: Reason = Reason.BAD_KIND) -> SecAggPhaseError:
    return SecAggPhaseError(reason, detail)


def trust_error(detail: str, reason: Reason = Reason.BAD_SIGNATURE) -> SecAggTrustError:
    return SecAggTrustError(reason, detail)
