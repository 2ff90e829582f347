import pytest

from protocol.envelope import decode_envelope
from protocol.errors import EnvelopeError
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan, UpdateMeta, from_dict


def test_plan_round_trip():
    plan = RoundPlan(3, 2, "cifg-abc", "q8", 20, 5.0, 60.0, lr=0.5)
    assert RoundPlan.from_envelope(decode_envelope(plan.to_envelope("demo").encode())) == plan


def test_small_messages_round_trip():
    assert CheckIn.from_envelope(CheckIn(1, 0, 12, "sim").to_envelope("demo", "d1")) == CheckIn(1, 0, 12, "sim")
    assert Assignment.from_envelope(Assignment(1, True).to_envelope("demo", "d1")) == Assignment(1, True)
    assert Ack.from_envelope(Ack(1, False, "wrong_round", "x").to_envelope("demo", "d1")).reason == "wrong_round"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"round_id": 1}, "missing field"),
        ({"round_id": 1, "accepted": True, "bogus": 1}, "unknown field"),
        ({"round_id": "1", "accepted": True}, "round_id"),
        ({"round_id": 1, "accepted": 1}, "accepted"),
        ([1, 2], "JSON object"),
    ],
)
def test_strict_parsing_names_the_field(data, message):
    with pytest.raises(EnvelopeError, match=message):
        from_dict(Ack, data)


def test_non_finite_floats_refused():
    with pytest.raises(EnvelopeError, match="train_loss"):
        from_dict(UpdateMeta, {"train_loss": float("nan"), "first_loss": 1.0, "steps": 1, "train_s": 0.1})


def test_plan_disagreeing_with_envelope_round_refused():
    env = RoundPlan(3, 2, "m", "q8", 20, 5.0, 60.0).to_envelope("demo")
    forged = type(env)(**{**env.__dict__, "round": 4})
    with pytest.raises(EnvelopeError, match="disagrees"):
        RoundPlan.from_envelope(forged)


# -- found by bench/fuzz_campaign.py ---------------------------------------------------------------
def test_an_integer_beyond_float_range_in_a_float_field_is_refused_not_an_overflow():
    data = {"round_id": 1, "accepted": True}
    plan = RoundPlan(3, 2, "m", "q8", 20, 5.0, 60.0).__dict__
    with pytest.raises(EnvelopeError, match="lr: <an integer of"):
        from_dict(RoundPlan, {**plan, "lr": 10**400})
    assert from_dict(Ack, data).accepted is True


def test_a_deeply_nested_value_gives_a_short_error_message():
    deep: object = 0
    for _ in range(900):
        deep = [deep]
    with pytest.raises(EnvelopeError) as info:
        from_dict(CheckIn, {"round_id": 1, "model_version": 0, "train_examples": 5, "platform": deep})
    assert len(str(info.value)) < 200
