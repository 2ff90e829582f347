"""Tests for device_sim/byzantine.py: specs, the deterministic choice of attackers, the attacks
themselves, and end to end through real clients, broker and aggregator (NaN rejected with its
reason, scaled updates clipped by the robust aggregation)."""
from __future__ import annotations

import numpy as np
import pytest

from aggregator.intake import IntakeLimits, check_values
from device_sim.byzantine import (
    ATTACKS,
    DEFAULT_SCALE,
    ByzantineConfig,
    ByzantineFleet,
    choose_byzantine,
    corrupt_update,
    encode_unchecked,
    parse_byzantine,
)
from device_sim.simulate import SimConfig, run_simulation
from protocol.codec import parse_codec
from protocol.errors import CodecError, Reason, ValidationError

TINY = dict(devices=6, rounds=2, clients_per_round=6, over_selection=1.0, vocab_size=300, embed_dim=16, units=32,
            seed=3, progress=False)


# ---- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("0.1:mixed", ByzantineConfig(0.1, "mixed", DEFAULT_SCALE)),
    ("0.1:scale=-20", ByzantineConfig(0.1, "scale", -20.0)),
    ("0.25:signflip", ByzantineConfig(0.25, "signflip")),
    (" 0.05:NaN ", ByzantineConfig(0.05, "nan")),
    ("0.1:mixed=50", ByzantineConfig(0.1, "mixed", 50.0)),
])
def test_spec_parses_and_round_trips(spec, expected):
    config = parse_byzantine(spec)
    assert config == expected
    assert parse_byzantine(config.spec) == config


@pytest.mark.parametrize("spec", ["", None, "none", "0"])
def test_no_spec_means_no_attackers(spec):
    assert parse_byzantine(spec) is None
    assert ByzantineFleet.from_spec(spec, 100, seed=0) is None


@pytest.mark.parametrize("spec, words", [
    ("0.1", "missing ':ATTACK'"),
    ("ten:mixed", "not a number"),
    ("0.1:explode", "unknown Byzantine attack"),
    ("1.5:nan", "fraction must be in"),
    ("0.1:signflip=3", "only 'scale' and 'mixed' take a factor"),
    ("0.1:scale=0", "non-zero"),
])
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_byzantine(spec)


def test_sim_config_refuses_a_bad_spec():
    with pytest.raises(ValueError, match="unknown Byzantine attack"):
        SimConfig(byzantine="0.1:explode")


# ---- who is Byzantine --------------------------------------------------------------------------

def test_choice_is_a_function_of_the_seed():
    config = ByzantineConfig(0.1, "mixed")
    first = choose_byzantine(309, config, seed=0)
    assert first == choose_byzantine(309, config, seed=0)
    assert len(first) == 31  # 10 % of 309, rounded
    assert set(first) != set(choose_byzantine(309, config, seed=1))
    assert all(0 <= i < 309 for i in first)


def test_mixed_spreads_the_attacks_evenly():
    chosen = choose_byzantine(300, ByzantineConfig(0.1, "mixed"), seed=7)
    counts = {a: sum(1 for v in chosen.values() if v == a) for a in ATTACKS}
    assert counts == {"scale": 10, "signflip": 10, "nan": 10}
    assert set(choose_byzantine(300, ByzantineConfig(0.1, "nan"), seed=7).values()) == {"nan"}


def test_a_positive_fraction_picks_at_least_one_device():
    assert len(choose_byzantine(5, ByzantineConfig(0.01, "nan"), seed=0)) == 1
    assert choose_byzantine(5, ByzantineConfig(0.0, "nan"), seed=0) == {}


def test_honest_devices_get_no_hook():
    fleet = ByzantineFleet(ByzantineConfig(0.5, "signflip"), 4, seed=0)
    bad = next(iter(fleet.attack_of_index))
    good = next(i for i in range(4) if i not in fleet.attack_of_index)
    assert fleet.client_kwargs(good, "good") == {"on_event": None}
    hooks = fleet.client_kwargs(bad, "bad")
    assert set(hooks) == {"on_event", "update_transform"}
    assert fleet.attack_of == {"bad": "signflip"}


# ---- the attacks ---------------------------------------------------------------------------------

def _delta(n: int = 1000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.01).astype(np.float32)


def test_scale_and_signflip_change_the_update():
    codec = parse_codec("q8")
    honest = _delta()
    scaled = corrupt_update(honest.copy(), "scale", codec, scale=-20.0)
    np.testing.assert_array_equal(scaled, honest * np.float32(-20.0))
    flipped = corrupt_update(honest.copy(), "signflip", codec)
    np.testing.assert_array_equal(flipped, -honest)


@pytest.mark.parametrize("spec", ["q8", "f32", "q4|zstd"])
def test_nan_attack_puts_nan_on_the_wire_and_decoding_refuses_it(spec):
    codec = parse_codec(spec)
    payload = corrupt_update(_delta(), "nan", codec, seed=1)
    assert isinstance(payload, bytes)
    with pytest.raises(CodecError) as info:
        codec.decode(payload, 1000)
    assert info.value.reason in (Reason.BAD_PAYLOAD, Reason.NOT_FINITE)


def test_nan_payload_is_well_formed_f32_with_nan_values():
    """With raw float32 values the NaNs are literally the payload's values."""
    codec = parse_codec("f32")
    honest = codec.encode(_delta()).payload
    forged = encode_unchecked(codec, np.full(1000, np.nan, np.float32), np.random.default_rng(0))
    assert len(forged) == len(honest)
    assert np.isnan(np.frombuffer(forged[-4000:], dtype="<f4")).all()


def test_the_intake_refuses_nan_values():
    """What stops a NaN update that a lenient codec would decode: the intake's value check."""
    with pytest.raises(ValidationError) as info:
        check_values(np.full(10, np.nan, np.float32), IntakeLimits(dim=10))
    assert info.value.reason is Reason.NOT_FINITE


# ---- end to end: real clients, broker and aggregator -----------------------------------------------

def test_nan_devices_are_rejected_by_the_aggregator_with_a_reason(tmp_path, cache_dir):
    # over-selection 1.0: the round cannot reach its goal of 6; once every device of the cohort
    # was accepted or refused it commits with the honest 4, without waiting for the deadline
    report = run_simulation(SimConfig(out=str(tmp_path), **{**TINY, "rounds": 1}, byzantine="0.34:nan",
                                      min_reports=1, report_deadline_s=300.0))
    byz = report["byzantine"]
    assert sorted(byz["devices"].values()) == ["nan", "nan"]
    assert len(byz["per_round"]) == 1
    for row in byz["per_round"]:
        assert row["selected"] == 2 and row["sent"] == 2 and row["accepted"] == 0
        assert row["rejected"] == {"bad_payload": 2}
    for row in report["per_round"]:
        assert row["committed"] and row["participants"] == 4  # the honest four still make the round
        assert row["rejected"] == {"bad_payload": 2}
        assert row["round_wall_s"] < 120  # not the 300 s deadline
    assert np.isfinite(report["top3"])


def test_scaled_updates_reach_the_aggregator_and_are_clipped(tmp_path, cache_dir):
    report = run_simulation(SimConfig(out=str(tmp_path), **TINY, byzantine="0.34:scale=30",
                                      aggregation="normclip:median*2|mean", report_deadline_s=120.0))
    byz = report["byzantine"]
    assert sorted(byz["devices"].values()) == ["scale", "scale"]
    for row in byz["per_round"]:
        assert row["accepted"] == 2
        assert row["clipped"] == 2  # 30 x an honest norm is far above 2 x the median
    for row in report["per_round"]:
        assert row["committed"] and row["participants"] == 6


def test_the_report_counts_what_normclip_scaled_and_krum_left_out():
    from aggregator.aggregation import make_aggregator

    fleet = ByzantineFleet(ByzantineConfig(0.25, "signflip"), n_devices=8, seed=0)
    for i in range(8):
        fleet.client_kwargs(i, f"d{i}")
    attackers = sorted(fleet.attack_of)
    rng = np.random.default_rng(0)
    honest = rng.standard_normal(1000).astype(np.float32)
    agg = make_aggregator("normclip:median*2|krum:f=2,cosine|mean")
    agg.reset(1000)
    for i in range(8):
        device = f"d{i}"
        update = honest + 0.1 * rng.standard_normal(1000).astype(np.float32)
        if device in attackers:
            update = -update
        if i == 0:
            update = update * 10  # one oversized update: clipped by normclip
        agg.add(update, weight=10, client_id=device)
    agg.result()
    fleet.note_aggregate(1, agg)
    row = fleet.summary()["per_round"][0]
    assert row["dropped"] == len(attackers) == 2 and row["honest_dropped"] == 0  # both sign flips left out
    assert row["clipped"] + row["honest_clipped"] == 1
