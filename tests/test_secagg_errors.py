import pytest

from protocol.errors import EnvelopeError, ProtocolError, Reason, TrustError
from protocol.secagg.errors import (
    SecAggAbortedError, SecAggError, SecAggFormatError, SecAggPhaseError, SecAggTrustError,
    format_error, phase_error, trust_error,
)


def test_every_secagg_error_is_a_protocol_error_with_a_reason():
    for exc in (format_error(Reason.TRUNCATED, "x"), phase_error("y"), trust_error("z"), SecAggAbortedError("w")):
        assert isinstance(exc, SecAggError) and isinstance(exc, ProtocolError)
        assert isinstance(exc.reason, Reason)
        assert exc.detail in str(exc)


def test_subclasses_let_existing_handlers_catch_them():
    assert isinstance(format_error(Reason.BAD_MAGIC, "x"), EnvelopeError)
    assert isinstance(trust_error("x"), TrustError)
    assert not isinstance(phase_error("x"), (EnvelopeError, TrustError))
    assert phase_error("x").reason is Reason.BAD_KIND
    assert SecAggAbortedError("x").reason is Reason.ROUND_CLOSED
    with pytest.raises(ProtocolError):
        raise SecAggPhaseError(Reason.DUPLICATE, "again")
    with pytest.raises(SecAggError):
        raise SecAggTrustError(Reason.BAD_SIGNATURE, "forged")
    with pytest.raises(EnvelopeError):
        raise SecAggFormatError(Reason.TRUNCATED, "short")
