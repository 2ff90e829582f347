import pytest

from device_sim.timeline import Event, Stream, check_seed, device_rng


def test_device_rng_is_a_pure_function_of_its_key():
    a = device_rng(7, 3, Stream.NETWORK, 19723).random(5)
    b = device_rng(7, 3, Stream.NETWORK, 19723).random(5)
    assert (a == b).all()
    others = [device_rng(8, 3, Stream.NETWORK, 19723), device_rng(7, 4, Stream.NETWORK, 19723),
              device_rng(7, 3, Stream.USAGE, 19723), device_rng(7, 3, Stream.NETWORK, 19724)]
    for rng in others:
        assert not (rng.random(5) == a).any()


def test_negative_keys_are_valid_and_distinct_from_positive_ones():
    assert device_rng(0, 0, Stream.CRASH, -1).random() != device_rng(0, 0, Stream.CRASH, 1).random()


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="seed"):
        check_seed(bad)


def test_event_is_a_small_named_tuple():
    e = Event(1.0, "plugged")
    assert e.detail == "" and e == (1.0, "plugged", "")
