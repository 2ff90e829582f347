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


# -- the decode-into path and the rules added for production intake ---------------------------------------
from aggregator.aggregation import make_aggregator  # noqa: E402
from aggregator.intake import check_header, check_values, decode_into, max_payload_bytes, value_check  # noqa: E402


def test_check_values_rules():
    check_values(np.full(DIM, 0.01, np.float32), LIMITS)
    for vec, reason in ((np.full(DIM + 1, 0.01, np.float32), Reason.WRONG_SIZE),
                        (np.array([np.nan] + [0.0] * (DIM - 1), np.float32), Reason.NOT_FINITE),
                        (np.array([np.inf] + [0.0] * (DIM - 1), np.float32), Reason.NOT_FINITE),
                        (np.full(DIM, 1.0, np.float32), Reason.NORM_TOO_LARGE)):
        with pytest.raises(ValidationError) as err:
            check_values(vec, LIMITS)
        assert err.value.reason is reason


def test_decode_into_the_sum_with_the_value_check_leaves_the_sum_alone_on_rejection():
    agg = make_aggregator("mean")
    agg.reset(DIM)
    env = update()
    codec = check_header(env, state(), LIMITS)
    agg.add_decoded_into(decode_into(codec, env.payload), 10.0, client_id="d1", check=value_check(LIMITS))
    before = agg.state()["sum"].copy()
    big = update(device="d2", vec=np.full(DIM, 5.0, np.float32))
    with pytest.raises(ValidationError) as err:
        agg.add_decoded_into(decode_into(codec, big.payload), 10.0, client_id="d2", check=value_check(LIMITS))
    assert err.value.reason is Reason.NORM_TOO_LARGE
    with pytest.raises(ValidationError) as err:  # a corrupt payload: a typed rejection, not a poisoned sum
        agg.add_decoded_into(decode_into(codec, env.payload[:-7]), 10.0, client_id="d2", check=value_check(LIMITS))
    np.testing.assert_array_equal(agg.state()["sum"], before)
    assert agg.count == 1 and np.allclose(agg.result(), 0.01, atol=1e-3)


def test_oversized_payload_refused_before_decoding():
    codec = parse_codec("q8")
    env = Envelope(Kind.UPDATE, "demo", "d1", 3, 2, 10, "q8", {}, bytes(max_payload_bytes(codec, DIM) + 1))
    assert reason_of(env) is Reason.TOO_LARGE


def test_a_redelivered_update_is_a_duplicate_even_after_the_round_closed():
    st = state()
    st.accepted.add("d1")
    st.open = False
    assert reason_of(update(), st) is Reason.DUPLICATE  # acked as counted, not as refused
    assert reason_of(update(device="d2"), st) is Reason.ROUND_CLOSED
