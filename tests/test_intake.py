import numpy as np
import pytest

from aggregator.intake import IntakeLimits, RoundState, validate_update
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.errors import Reason, ValidationError

DIM = 1000


def update(device="d1", round_id=3, base=2, codec="q8", vec=None, examples=10, dim=DIM):
    vec = np.full(dim, 0.01, np.float32) if vec is None else vec
    payload = parse_codec(codec).encode(vec, rng=np.random.default_rng(0)).payload
    return Envelope(Kind.UPDATE, "demo", device, round_id, base, examples, codec, {}, payload)


def state():
    return RoundState(round_id=3, base_version=2, codec="q8", cohort={"d1", "d2"})


LIMITS = IntakeLimits(dim=DIM, max_norm=10.0)


def reason_of(env, st=None):
    with pytest.raises(ValidationError) as err:
        validate_update(env, st or state(), LIMITS)
    return err.value.reason


def test_valid_update_decodes_to_model_size():
    delta = validate_update(update(), state(), LIMITS)
    assert delta.shape == (DIM,)
    assert np.allclose(delta, 0.01, atol=1e-3)


def test_each_rule():
    assert reason_of(update(round_id=4)) is Reason.WRONG_ROUND
    assert reason_of(update(device="intruder")) is Reason.NOT_IN_COHORT
    assert reason_of(update(base=1)) is Reason.STALE_BASE
    assert reason_of(update(codec="f32")) is Reason.BAD_CODEC
    assert reason_of(update(examples=0)) is Reason.BAD_FIELD
    assert reason_of(update(dim=DIM + 1)) is Reason.WRONG_SIZE
    assert reason_of(update(vec=np.full(DIM, 5.0, np.float32))) is Reason.NORM_TOO_LARGE
    closed = state()
    closed.open = False
    assert reason_of(update(), closed) is Reason.ROUND_CLOSED
    dup = state()
    dup.accepted.add("d1")
    assert reason_of(update(), dup) is Reason.DUPLICATE


def test_non_finite_values_rejected():
    f32 = RoundState(3, 2, "f32", {"d1"})
    env = update(codec="f32")
    raw = bytearray(env.payload)
    # poison the last float of the f32 payload with a NaN
    raw[-4:] = np.array([np.nan], "<f4").tobytes()
    env = Envelope(Kind.UPDATE, "demo", "d1", 3, 2, 10, "f32", {}, bytes(raw))
    with pytest.raises(ValidationError) as err:
        validate_update(env, f32, LIMITS)
    assert err.value.reason in (Reason.NOT_FINITE, Reason.BAD_PAYLOAD)  # the codec itself refuses NaN


def test_corrupt_payload_is_a_validation_error():
    env = update()
    cut = Envelope(Kind.UPDATE, "demo", "d1", 3, 2, 10, "q8", {}, env.payload[: len(env.payload) // 2])
    with pytest.raises(ValidationError):
        validate_update(cut, state(), LIMITS)
