"""Tests for aggregator/aggregation.py: streaming mean, clipping, robust statistics, specs,
checkpoints and decoding straight into the running sum."""
from __future__ import annotations

import io

import numpy as np
import pytest

from aggregator.aggregation import (
    DEFAULT_MAX_UPDATES,
    AggregationError,
    CapacityExceededError,
    ClippedAggregator,
    CoordinateMedian,
    DuplicateUpdateError,
    EmptyAggregationError,
    MedianNormClip,
    MultiKrum,
    PoisonedAggregatorError,
    TrimmedMean,
    UpdateAggregator,
    WeightedMean,
    l2_norm,
    make_aggregator,
)

DIM = 2_000


def _updates(n: int, dim: int = DIM, seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    deltas = [rng.standard_normal(dim).astype(np.float32) * rng.uniform(0.01, 3.0) for _ in range(n)]
    weights = [float(rng.integers(1, 500)) for _ in range(n)]
    return deltas, weights


def _feed(agg: UpdateAggregator, deltas, weights, start: int = 0) -> None:
    for i, (d, w) in enumerate(zip(deltas, weights), start=start):
        agg.add(d, w, client_id=f"dev{i}")


def _savez_round_trip(state: dict) -> dict:
    """What a checkpoint on disk gives back: np.savez, then np.load without pickle."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _trimmed_reference(stack: np.ndarray, fraction: float) -> np.ndarray:
    n = stack.shape[0]
    k = int(np.floor(fraction * n))
    ordered = np.sort(stack, axis=0)
    return ordered[k : n - k].mean(axis=0, dtype=np.float64)


def _median_reference(stack: np.ndarray) -> np.ndarray:
    n = stack.shape[0]
    ordered = np.sort(stack, axis=0).astype(np.float64)
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


# --- WeightedMean ---------------------------------------------------------------------


def test_weighted_mean_equals_np_average():
    deltas, weights = _updates(37)
    agg = WeightedMean()
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=weights)
    got = agg.result()
    assert got.dtype == np.float32 and got.shape == (DIM,)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    assert agg.count == 37
    assert agg.total_weight == sum(weights)
    assert agg.client_ids == tuple(f"dev{i}" for i in range(37))


def test_weighted_mean_float32_accumulator_is_close_too():
    deltas, weights = _updates(20)
    agg = make_aggregator("mean:float32")
    assert isinstance(agg, WeightedMean) and agg.accumulator_dtype == np.float32
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    assert agg.accumulator().dtype == np.float32
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(agg.result(), expected, rtol=1e-4, atol=1e-5)


def test_weighted_mean_is_order_independent():
    deltas, weights = _updates(50, seed=1)
    results = []
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(deltas))
        agg = WeightedMean()
        agg.reset(DIM)
        for i in order:
            agg.add(deltas[i], weights[i])
        results.append(agg.result())
    for r in results[1:]:
        # float64 sum of the same float32 products: at most one float32 rounding step apart
        diff_ulps = np.abs(r.view(np.int32).astype(np.int64) - results[0].view(np.int32).astype(np.int64))
        assert diff_ulps.max() <= 1


def test_result_is_repeatable_and_adding_may_continue():
    deltas, weights = _updates(6)
    agg = WeightedMean()
    agg.reset(DIM)
    _feed(agg, deltas[:3], weights[:3])
    first = agg.result()
    np.testing.assert_array_equal(first, agg.result())
    _feed(agg, deltas[3:], weights[3:], start=3)
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(agg.result(), expected, rtol=2e-6, atol=1e-7)


def test_add_does_not_keep_or_modify_the_caller_array():
    deltas, weights = _updates(2)
    keep = deltas[0].copy()
    agg = WeightedMean()
    agg.reset(DIM)
    agg.add(deltas[0], weights[0])
    np.testing.assert_array_equal(deltas[0], keep)
    deltas[0][:] = 1e6  # reused by the caller: the aggregate must not change
    np.testing.assert_allclose(agg.result(), keep, rtol=1e-6)


def test_reset_starts_a_new_round():
    deltas, weights = _updates(3)
    agg = WeightedMean()
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    agg.reset(DIM)
    assert agg.count == 0 and agg.total_weight == 0.0 and agg.client_ids == ()
    agg.add(deltas[0], 2.0, client_id="dev0")  # the same id is new in the new round
    np.testing.assert_allclose(agg.result(), deltas[0], rtol=1e-6)


@pytest.mark.parametrize("spec", ["mean", "clip:1|mean", "trimmed:0.1", "median"])
def test_result_without_updates_raises_a_clear_error(spec):
    agg = make_aggregator(spec)
    agg.reset(DIM)
    with pytest.raises(EmptyAggregationError, match="no update was added"):
        agg.result()


def test_adding_before_reset_says_to_call_reset():
    with pytest.raises(AggregationError, match=r"reset\(dim\)"):
        WeightedMean().add(np.zeros(4, np.float32), 1.0)


@pytest.mark.parametrize(
    "delta, weight, message",
    [
        (np.zeros(DIM + 1, np.float32), 1.0, "shape"),
        (np.zeros((2, DIM // 2), np.float32), 1.0, "shape"),
        (np.zeros(DIM, np.int32), 1.0, "float"),
        ([0.0] * DIM, 1.0, "numpy array"),
        (np.zeros(DIM, np.float32), 0.0, "weight"),
        (np.zeros(DIM, np.float32), -3.0, "weight"),
        (np.zeros(DIM, np.float32), float("nan"), "weight"),
        (np.zeros(DIM, np.float32), float("inf"), "weight"),
    ],
)
@pytest.mark.parametrize("spec", ["mean", "clip:1000|mean", "median", "normclip:median*2|mean"])
def test_bad_updates_are_refused_without_changing_the_aggregate(spec, delta, weight, message):
    agg = make_aggregator(spec)
    agg.reset(DIM)
    agg.add(np.ones(DIM, np.float32), 1.0, client_id="a")
    with pytest.raises(ValueError, match=message):
        agg.add(delta, weight, client_id="b")
    assert agg.count == 1 and agg.total_weight == 1.0
    np.testing.assert_array_equal(agg.result(), np.ones(DIM, np.float32))


@pytest.mark.parametrize("spec", ["mean", "clip:1|mean", "trimmed:0.1", "median", "normclip:median*2|mean"])
def test_a_client_is_counted_once_per_round(spec):
    agg = make_aggregator(spec)
    agg.reset(DIM)
    agg.add(np.ones(DIM, np.float32), 1.0, client_id="dev7")
    assert agg.contains("dev7") and not agg.contains("dev8") and not agg.contains("")
    with pytest.raises(DuplicateUpdateError, match="dev7"):
        agg.add(np.ones(DIM, np.float32), 1.0, client_id="dev7")
    agg.add(np.ones(DIM, np.float32), 1.0)  # anonymous updates are not deduplicated
    agg.add(np.ones(DIM, np.float32), 1.0)
    assert agg.count == 3


# --- checkpoints ------------------------------------------------------------------------

ALL_SPECS = ["mean", "mean:float32", "clip:3|mean", "trimmed:0.2,12", "median:12", "clip:3|median:12",
             "clip:5|clip:3|trimmed:0.1,12", "normclip:median*2,12|mean", "normclip:median*1.5,12|trimmed:0.1,12",
             "krum:f=2,12|mean", "krum:f=1,m=5,12|mean", "normclip:median*2,12|krum:f=2,12|mean",
             "krum:f=2,12|normclip:median*2,12|mean", "normclip:median*2,12|krum:f=2,cosine,12|mean"]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_checkpoint_mid_round_then_resume_is_bit_exact(spec):
    deltas, weights = _updates(11, seed=3)
    straight = make_aggregator(spec)
    straight.reset(DIM)
    _feed(straight, deltas, weights)

    first = make_aggregator(spec)
    first.reset(DIM)
    _feed(first, deltas[:6], weights[:6])
    saved = _savez_round_trip(first.state())
    del first  # the process dies here

    resumed = make_aggregator(str(saved["spec"]))
    resumed.load_state(saved)
    assert resumed.count == 6 and resumed.client_ids == tuple(f"dev{i}" for i in range(6))
    with pytest.raises(DuplicateUpdateError):  # a redelivered update is recognised
        resumed.add(deltas[5], weights[5], client_id="dev5")
    _feed(resumed, deltas[6:], weights[6:], start=6)

    np.testing.assert_array_equal(resumed.result(), straight.result())
    assert resumed.count == straight.count
    assert resumed.total_weight == straight.total_weight
    assert resumed.state()["spec"] == straight.state()["spec"]
    if isinstance(straight, ClippedAggregator):
        assert resumed.clipped_count == straight.clipped_count
        assert resumed.max_norm_seen == straight.max_norm_seen


@pytest.mark.parametrize("spec", ["mean", "median:12"])
def test_state_is_a_snapshot_that_later_adds_do_not_change(spec):
    deltas, weights = _updates(4)
    agg = make_aggregator(spec)
    agg.reset(DIM)
    _feed(agg, deltas[:2], weights[:2])
    state = agg.state()
    frozen = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    _feed(agg, deltas[2:], weights[2:], start=2)
    for key, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(value))


def test_state_of_the_wrong_aggregator_is_refused():
    agg = make_aggregator("mean")
    agg.reset(DIM)
    agg.add(np.ones(DIM, np.float32), 1.0)
    with pytest.raises(ValueError, match="'mean' aggregator"):
        make_aggregator("median").load_state(agg.state())
    with pytest.raises(ValueError, match="float64"):
        make_aggregator("mean:float32").load_state(agg.state())
    clipped = make_aggregator("clip:2|mean")
    clipped.reset(DIM)
    with pytest.raises(ValueError, match="clips at 2"):
        make_aggregator("clip:3|mean").load_state(clipped.state())
    trimmed = make_aggregator("trimmed:0.1")
    trimmed.reset(DIM)
    with pytest.raises(ValueError, match="trim_fraction"):
        make_aggregator("trimmed:0.2").load_state(trimmed.state())
    with pytest.raises(ValueError, match="lacks 'sum'"):
        make_aggregator("mean").load_state({"kind": "mean", "spec": "mean", "dim": 3, "count": 0,
                                            "total_weight": 0.0, "client_ids": np.zeros(0, "<U1")})


def test_buffering_checkpoint_may_resume_with_a_larger_buffer():
    deltas, weights = _updates(5)
    small = make_aggregator("median:5")
    small.reset(DIM)
    _feed(small, deltas, weights)
    larger = make_aggregator("median:8")
    larger.load_state(_savez_round_trip(small.state()))
    np.testing.assert_array_equal(larger.result(), small.result())
    with pytest.raises(ValueError, match="more than max_updates"):
        make_aggregator("median:4").load_state(small.state())


# --- clipping ---------------------------------------------------------------------------


def test_clipping_bounds_every_norm_and_counts_the_clipped():
    rng = np.random.default_rng(5)
    norms = [0.5, 2.0, 1.0, 7.5, 0.99]
    deltas = []
    for n in norms:
        d = rng.standard_normal(DIM).astype(np.float32)
        deltas.append((d / np.linalg.norm(d.astype(np.float64)) * n).astype(np.float32))
    weights = [3.0, 1.0, 2.0, 5.0, 4.0]

    agg = ClippedAggregator(WeightedMean(), max_norm=1.0)
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    assert agg.clipped_count == 2  # 2.0 and 7.5; 1.0 is within the bound
    assert agg.max_norm_seen == pytest.approx(7.5, rel=1e-6)

    def clip(d: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(d.astype(np.float64))
        return d.astype(np.float64) * min(1.0, 1.0 / n)

    expected = np.average(np.stack([clip(d) for d in deltas]), axis=0, weights=weights)
    np.testing.assert_allclose(agg.result(), expected, rtol=1e-5, atol=1e-7)
    # Each update that reaches the inner aggregator has norm <= max_norm.
    for d in deltas:
        single = ClippedAggregator(WeightedMean(), max_norm=1.0)
        single.reset(DIM)
        single.add(d, 1.0)
        assert l2_norm(single.result()) <= 1.0 * (1 + 1e-6)


def test_clipping_leaves_small_updates_bit_identical():
    deltas, weights = _updates(5)
    plain = WeightedMean()
    clipped = ClippedAggregator(WeightedMean(), max_norm=1e9)
    for agg in (plain, clipped):
        agg.reset(DIM)
        _feed(agg, deltas, weights)
    np.testing.assert_array_equal(plain.result(), clipped.result())
    assert clipped.clipped_count == 0


def test_clipping_refuses_a_non_finite_update():
    agg = make_aggregator("clip:1|mean")
    agg.reset(DIM)
    bad = np.zeros(DIM, np.float32)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        agg.add(bad, 1.0)
    assert agg.count == 0


def test_l2_norm_matches_float64_reference():
    x = np.random.default_rng(0).standard_normal(781_068).astype(np.float32)
    assert l2_norm(x) == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-7)


# --- robust statistics ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 25])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.4, 0.49])
def test_trimmed_mean_equals_numpy_reference(n, fraction):
    deltas, weights = _updates(n, seed=n)
    agg = TrimmedMean(fraction, max_updates=32)
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    expected = _trimmed_reference(np.stack(deltas), fraction)
    np.testing.assert_allclose(agg.result(), expected, rtol=1e-6, atol=1e-7)
    assert agg.trimmed_per_side(n) == int(np.floor(fraction * n))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11])
def test_coordinate_median_equals_numpy_reference(n):
    deltas, weights = _updates(n, seed=10 + n)
    agg = CoordinateMedian(max_updates=16)
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    np.testing.assert_allclose(agg.result(), _median_reference(np.stack(deltas)), rtol=1e-6, atol=1e-7)


def test_robust_statistics_span_several_blocks():
    """A model larger than one processing block: the blocks must tile exactly."""
    dim = 70_001
    deltas, weights = _updates(7, dim=dim, seed=4)
    for agg, expected in [
        (TrimmedMean(0.2, 8), _trimmed_reference(np.stack(deltas), 0.2)),
        (CoordinateMedian(8), _median_reference(np.stack(deltas))),
    ]:
        agg.reset(dim)
        _feed(agg, deltas, weights)
        np.testing.assert_allclose(agg.result(), expected, rtol=1e-6, atol=1e-7)


def test_robust_statistics_ignore_weights():
    deltas, _ = _updates(9)
    results = []
    for weights in ([1.0] * 9, [float(w) for w in range(1, 10)]):
        agg = TrimmedMean(0.2, 10)
        agg.reset(DIM)
        _feed(agg, deltas, weights)
        results.append(agg.result())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("spec", ["trimmed:0.1,4", "median:4", "clip:1|median:4"])
def test_buffer_bound_is_enforced(spec):
    deltas, weights = _updates(5)
    agg = make_aggregator(spec)
    assert agg.capacity == 4
    agg.reset(DIM)
    _feed(agg, deltas[:4], weights[:4])
    with pytest.raises(CapacityExceededError, match="max_updates=4"):
        agg.add(deltas[4], weights[4], client_id="dev4")
    assert agg.count == 4 and not agg.contains("dev4")


def test_default_buffer_bound():
    assert make_aggregator("median").capacity == DEFAULT_MAX_UPDATES
    assert make_aggregator("trimmed:0.1").capacity == DEFAULT_MAX_UPDATES
    assert make_aggregator("mean").capacity is None


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_robust_aggregators_resist_outliers(attack):
    rng = np.random.default_rng(42)
    dim, honest_n, bad_n = 1_000, 27, 3  # 10 % outliers
    direction = rng.standard_normal(dim).astype(np.float32)
    honest = [direction + 0.3 * rng.standard_normal(dim).astype(np.float32) for _ in range(honest_n)]
    factor = 100.0 if attack == "scaled" else -100.0
    bad = [factor * h for h in honest[:bad_n]]
    honest_mean = np.mean(np.stack(honest), axis=0)
    scale = float(np.linalg.norm(honest_mean))

    errors = {}
    for spec in ["mean", "median", "trimmed:0.1", "trimmed:0.2"]:
        agg = make_aggregator(spec)
        agg.reset(dim)
        updates = honest + bad
        order = rng.permutation(len(updates))
        for i in order:
            agg.add(updates[i], 1.0)
        errors[spec] = float(np.linalg.norm(agg.result() - honest_mean)) / scale
    assert errors["mean"] > 5.0, errors
    assert errors["median"] < 0.1, errors
    assert errors["trimmed:0.1"] < 0.1, errors
    assert errors["trimmed:0.2"] < 0.1, errors


def test_clipping_limits_an_outlier_for_the_plain_mean():
    rng = np.random.default_rng(1)
    honest = [np.ones(DIM, np.float32) + 0.01 * rng.standard_normal(DIM).astype(np.float32) for _ in range(9)]
    bad = -1000.0 * honest[0]
    honest_norm = float(np.linalg.norm(honest[0]))
    errors = {}
    for spec in ["mean", f"clip:{honest_norm * 1.1}|mean"]:
        agg = make_aggregator(spec)
        agg.reset(DIM)
        for u in honest + [bad]:
            agg.add(u, 1.0)
        errors[spec] = float(np.linalg.norm(agg.result() - np.mean(honest, axis=0))) / honest_norm
    plain, clipped = errors.values()
    assert plain > 50 and clipped < 0.25, errors


# --- decoding straight into the sum ----------------------------------------------------


def _decoder(update: np.ndarray):
    """Stands in for `codec.decode_accumulate(payload, acc, weight)`: adds w * update."""

    def decode_into(acc: np.ndarray, weight: float) -> None:
        acc += np.float32(weight) * update

    return decode_into


def test_decode_into_the_mean_accumulator_equals_add():
    deltas, weights = _updates(12, seed=8)
    by_add, by_decode = WeightedMean(), WeightedMean()
    for agg in (by_add, by_decode):
        agg.reset(DIM)
    _feed(by_add, deltas, weights)
    seen = []
    for i, (d, w) in enumerate(zip(deltas, weights)):
        def decode_into(acc, weight, d=d):
            seen.append((acc.dtype, acc.shape, weight))
            assert acc is by_decode.accumulator()  # straight into the running sum
            acc += np.float32(weight) * d
        by_decode.add_decoded_into(decode_into, w, client_id=f"dev{i}")
    assert seen[0] == (np.float64, (DIM,), weights[0])
    assert by_decode.count == 12 and by_decode.total_weight == by_add.total_weight
    assert by_decode.client_ids == by_add.client_ids
    np.testing.assert_array_equal(by_decode.result(), by_add.result())


def test_a_decoder_failing_mid_write_poisons_the_mean_until_restored():
    deltas, weights = _updates(3)
    agg = WeightedMean()
    agg.reset(DIM)
    agg.add(deltas[0], weights[0], client_id="dev0")
    checkpoint = _savez_round_trip(agg.state())

    def half_then_fail(acc, weight):
        acc[: DIM // 2] += 99.0
        raise ValueError("corrupt payload tail")

    with pytest.raises(ValueError, match="corrupt payload tail"):
        agg.add_decoded_into(half_then_fail, 1.0, client_id="evil")
    for call in (lambda: agg.result(), lambda: agg.add(deltas[1], 1.0), lambda: agg.state()):
        with pytest.raises(PoisonedAggregatorError, match="evil"):
            call()
    agg.load_state(checkpoint)
    agg.add(deltas[1], weights[1], client_id="dev1")
    expected = np.average(np.stack(deltas[:2]).astype(np.float64), axis=0, weights=weights[:2])
    np.testing.assert_allclose(agg.result(), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["mean", "clip:2|mean", "median:8"])
def test_decode_with_check_rejects_without_touching_the_aggregate(spec):
    deltas, weights = _updates(3)
    agg = make_aggregator(spec)
    agg.reset(DIM)
    agg.add(deltas[0], weights[0], client_id="dev0")
    before = agg.result()

    def norm_check(dense: np.ndarray) -> None:
        assert dense.dtype == np.float32 and dense.shape == (DIM,)
        if l2_norm(dense) > 1e3:
            raise ValueError("norm_too_large")

    with pytest.raises(ValueError, match="norm_too_large"):
        agg.add_decoded_into(_decoder(deltas[1] * 1e6), 1.0, client_id="big", check=norm_check)
    with pytest.raises(RuntimeError, match="bad body"):
        agg.add_decoded_into(_raise(RuntimeError("bad body")), 1.0, client_id="broken", check=norm_check)
    assert agg.count == 1 and not agg.contains("big")
    np.testing.assert_array_equal(agg.result(), before)

    agg.add_decoded_into(_decoder(deltas[1]), weights[1], client_id="dev1", check=norm_check)
    reference = make_aggregator(spec)
    reference.reset(DIM)
    _feed(reference, deltas[:2], weights[:2])
    np.testing.assert_allclose(agg.result(), reference.result(), rtol=1e-6, atol=1e-7)


def _raise(exc: Exception):
    def decode_into(acc, weight):
        raise exc

    return decode_into


def test_clipped_and_buffering_aggregators_have_no_accumulator_but_still_decode():
    deltas, weights = _updates(4)
    for spec in ["clip:0.5|mean", "trimmed:0.25,4"]:
        agg = make_aggregator(spec)
        agg.reset(DIM)
        assert agg.accumulator() is None
        reference = make_aggregator(spec)
        reference.reset(DIM)
        for i, (d, w) in enumerate(zip(deltas, weights)):
            agg.add_decoded_into(_decoder(d), w, client_id=f"dev{i}")
            reference.add(d, w, client_id=f"dev{i}")
        np.testing.assert_array_equal(agg.result(), reference.result())
        if isinstance(agg, ClippedAggregator):
            assert agg.clipped_count == reference.clipped_count == 4


# --- specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kinds",
    [
        ("mean", ["mean"]),
        ("  MEAN ", ["mean"]),
        ("clip:10|mean", ["clip", "mean"]),
        ("trimmed:0.1", ["trimmed"]),
        ("trimmed:0.1,50", ["trimmed"]),
        ("clip:5|median", ["clip", "median"]),
        ("clip:5 | clip:2 | median:7", ["clip", "clip", "median"]),
    ],
)
def test_specs_build_compositions_and_round_trip(spec, kinds):
    agg = make_aggregator(spec)
    chain, node = [], agg
    while True:
        chain.append(node.kind)
        if not isinstance(node, ClippedAggregator):
            break
        node = node.inner
    assert chain == kinds
    assert make_aggregator(agg.spec).spec == agg.spec


def test_spec_values_are_kept():
    agg = make_aggregator("clip:2.5|trimmed:0.15,33")
    assert isinstance(agg, ClippedAggregator) and agg.max_norm == 2.5
    assert isinstance(agg.inner, TrimmedMean)
    assert agg.inner.trim_fraction == 0.15 and agg.inner.max_updates == 33
    assert agg.spec == "clip:2.5|trimmed:0.15,33"
    assert make_aggregator("median:9").spec == "median:9"
    assert make_aggregator("clip:10|mean").spec == "clip:10|mean"


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "empty aggregator spec"),
        ("   ", "empty aggregator spec"),
        ("avg", "unknown stage 'avg'"),
        ("clip:x|mean", "max_norm 'x' is not a number"),
        ("clip:-1|mean", "must be finite and > 0"),
        ("clip:0|mean", "must be finite and > 0"),
        ("clip:inf|mean", "must be finite and > 0"),
        ("clip:1,2|mean", "exactly one argument"),
        ("clip|mean", "exactly one argument"),
        ("clip:10", "cannot be the last stage"),
        ("mean|clip:1", "must be the last stage"),
        ("mean|median", "must be the last stage"),
        ("clip:1||mean", "empty stage"),
        ("mean|", "empty stage"),
        ("mean:float16", "accumulator dtype"),
        ("trimmed", "fraction cut at each end"),
        ("trimmed:0.5", "in [0, 0.5)"),
        ("trimmed:-0.1", "in [0, 0.5)"),
        ("trimmed:abc", "'abc' is not a number"),
        ("trimmed:0.1,0", "max_updates must be >= 1"),
        ("trimmed:0.1,2.5", "max_updates '2.5' is not an integer"),
        ("median:0", "max_updates must be >= 1"),
        ("median:3,4", "at most one argument"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(spec, problem):
    with pytest.raises(ValueError) as info:
        make_aggregator(spec)
    assert problem in str(info.value)
    assert "e.g." in str(info.value)  # and it shows what a good spec looks like


def test_constructors_validate_their_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        ClippedAggregator(WeightedMean(), 0.0)
    with pytest.raises(ValueError, match="inner"):
        ClippedAggregator("mean", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)
    with pytest.raises(ValueError, match="max_updates"):
        CoordinateMedian(0)
    with pytest.raises(ValueError, match="accumulator_dtype"):
        WeightedMean(np.int64)
    with pytest.raises(ValueError, match="dim"):
        WeightedMean().reset(0)


# --- median-relative norm clipping ------------------------------------------------------


def test_normclip_scales_only_updates_above_factor_times_median():
    rng = np.random.default_rng(5)
    norms = [1.0, 2.0, 3.0, 4.0, 50.0]  # median 3, bound 2 x 3 = 6: only the last is clipped
    deltas = []
    for n in norms:
        d = rng.standard_normal(DIM).astype(np.float32)
        deltas.append((d * np.float32(n / np.linalg.norm(d))).astype(np.float32))
    weights = [10.0, 20.0, 30.0, 40.0, 50.0]
    agg = make_aggregator("normclip:median*2|mean")
    assert isinstance(agg, MedianNormClip) and agg.factor == 2.0
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    got = agg.result()
    assert agg.bound == pytest.approx(6.0, rel=1e-5)
    assert agg.clipped_ids == ("dev4",) and agg.clipped_count == 1
    expected_rows = deltas[:4] + [deltas[4] * np.float32(agg.bound / l2_norm(deltas[4]))]
    expected = np.average(np.stack(expected_rows).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(agg.result(), got)  # result() is repeatable
    assert agg.count == 5 and agg.total_weight == sum(weights)


def test_normclip_bound_follows_the_honest_majority_not_the_attackers():
    rng = np.random.default_rng(11)
    dim = 1_000
    direction = rng.standard_normal(dim).astype(np.float32)
    honest = [direction + 0.3 * rng.standard_normal(dim).astype(np.float32) for _ in range(18)]
    honest_mean = np.mean(np.stack(honest), axis=0)
    errors, bounds = {}, {}
    for factor in (-20.0, 20.0, -1e4):
        bad = [factor * h for h in honest[:2]]  # 10 % scaled (and flipped) attackers
        for spec in ("mean", "normclip:median*2|mean"):
            agg = make_aggregator(spec)
            agg.reset(dim)
            for i, u in enumerate(honest + bad):
                agg.add(u, 1.0, client_id=f"c{i}")
            errors[spec, factor] = float(np.linalg.norm(agg.result() - honest_mean) / np.linalg.norm(honest_mean))
            if isinstance(agg, MedianNormClip):
                bounds[factor] = agg.bound
                assert set(agg.clipped_ids) >= {"c18", "c19"}
    assert len({round(b, 3) for b in bounds.values()}) == 1  # however big the attack, the bound is the same
    for factor in (-20.0, 20.0, -1e4):
        assert errors["mean", factor] > 1.0, errors
        assert errors["normclip:median*2|mean", factor] < 0.5, errors


def test_normclip_refuses_a_non_finite_update():
    agg = make_aggregator("normclip:median*2|mean")
    agg.reset(4)
    with pytest.raises(ValueError, match="non-finite"):
        agg.add(np.array([1.0, np.nan, 0.0, 0.0], np.float32), 1.0, client_id="x")
    assert agg.count == 0 and not agg.contains("x")


def test_normclip_decodes_through_the_scratch_buffer():
    deltas, weights = _updates(5)
    agg = make_aggregator("normclip:median*3|mean")
    agg.reset(DIM)
    assert agg.accumulator() is None  # a decoder must not write around the clipping
    reference = make_aggregator("normclip:median*3|mean")
    reference.reset(DIM)
    for i, (d, w) in enumerate(zip(deltas, weights)):
        agg.add_decoded_into(lambda acc, s, d=d: np.add(acc, s * d, out=acc), w, client_id=f"dev{i}")
        reference.add(d, w, client_id=f"dev{i}")
    np.testing.assert_array_equal(agg.result(), reference.result())


def test_normclip_checkpoint_of_another_inner_aggregator_is_refused():
    agg = make_aggregator("normclip:median*2|mean")
    agg.reset(DIM)
    agg.add(np.ones(DIM, np.float32), 1.0, client_id="a")
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("normclip:median*2|median").load_state(agg.state())
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("normclip:median*3|mean").load_state(agg.state())


@pytest.mark.parametrize("spec, expected", [
    ("normclip:median*2|mean", "normclip:median*2,100|mean"),
    ("normclip:2.5|trimmed:0.1", "normclip:median*2.5,100|trimmed:0.1,100"),
    ("normclip:median*2,20|clip:5|mean", "normclip:median*2,20|clip:5|mean"),
])
def test_normclip_specs_round_trip(spec, expected):
    agg = make_aggregator(spec)
    assert agg.spec == expected
    assert make_aggregator(agg.spec).spec == expected


@pytest.mark.parametrize("spec, problem", [
    ("normclip:median*2", "cannot be the last stage"),
    ("normclip:median*0|mean", "must be finite and > 0"),
    ("normclip:median*x|mean", "is not a number"),
    ("normclip|mean", "multiple of the median norm"),
    ("normclip:median*2,0|mean", "max_updates must be >= 1"),
])
def test_normclip_bad_specs_name_the_problem(spec, problem):
    with pytest.raises(ValueError) as info:
        make_aggregator(spec)
    assert problem in str(info.value)


# --- multi-Krum ---------------------------------------------------------------------------


def _cluster(n: int, dim: int = DIM, seed: int = 0, noise: float = 0.5) -> list[np.ndarray]:
    """Honest non-IID-like updates: one shared direction plus per-client noise."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    return [(direction + noise * rng.standard_normal(dim)).astype(np.float32) for _ in range(n)]


def _krum_reference_scores(stack: np.ndarray, f: int) -> np.ndarray:
    x = stack.astype(np.float64)
    n = len(x)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    k = n - f - 2
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


def test_krum_drops_sign_flipped_and_scaled_updates_and_keeps_their_weights():
    honest = _cluster(17, seed=1)
    flipped = -honest[0]  # an honest norm: a norm bound cannot see it
    scaled = 10.0 * honest[1]
    deltas = honest + [flipped, scaled]
    weights = [float(10 + i) for i in range(len(deltas))]
    agg = make_aggregator("krum:f=2|mean")
    assert isinstance(agg, MultiKrum) and agg.f == 2 and agg.m is None
    agg.reset(DIM)
    _feed(agg, deltas, weights)
    got = agg.result()
    assert set(agg.dropped_ids) == {"dev17", "dev18"}
    assert agg.selected_ids == tuple(f"dev{i}" for i in range(17))
    expected = np.average(np.stack(honest).astype(np.float64), axis=0, weights=weights[:17])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert agg.count == 19 and agg.total_weight == sum(weights)  # counted as accepted, not averaged
    scores = agg.scores
    assert min(scores["dev17"], scores["dev18"]) > max(scores[f"dev{i}"] for i in range(17))


def test_krum_scores_match_a_dense_numpy_reference_across_blocks():
    dim = 70_000  # more than one distance block
    deltas = _cluster(9, dim=dim, seed=4)
    agg = MultiKrum(WeightedMean(), f=2)
    agg.reset(dim)
    _feed(agg, deltas, [1.0] * 9)
    stack = np.stack(deltas)
    np.testing.assert_allclose(agg.krum_scores(), _krum_reference_scores(stack, 2), rtol=1e-9)
    dist = agg.pairwise_sq_distances()
    assert dist.dtype == np.float64 and np.all(np.diag(dist) == 0) and np.allclose(dist, dist.T)


def test_krum_with_f0_on_clean_input_equals_the_weighted_mean():
    deltas, weights = _updates(12, seed=7)
    krum = make_aggregator("krum:f=0|mean")
    mean = make_aggregator("mean")
    for agg in (krum, mean):
        agg.reset(DIM)
        _feed(agg, deltas, weights)
    np.testing.assert_array_equal(krum.result(), mean.result())
    assert krum.dropped_ids == ()


def test_krum_m_sets_how_many_are_kept():
    deltas = _cluster(10, seed=2)
    agg = make_aggregator("krum:f=1,m=4|mean")
    agg.reset(DIM)
    _feed(agg, deltas, [1.0] * 10)
    agg.result()
    assert len(agg.selected_ids) == 4 and len(agg.dropped_ids) == 6
    scores = agg.scores
    assert max(scores[i] for i in agg.selected_ids) <= min(scores[i] for i in agg.dropped_ids)


def test_krum_with_few_updates_still_aggregates():
    deltas = _cluster(3, seed=3)
    agg = make_aggregator("krum:f=2|mean")
    agg.reset(DIM)
    _feed(agg, deltas[:1], [1.0])
    np.testing.assert_array_equal(agg.result(), deltas[0])  # one update: kept, whatever f
    _feed(agg, deltas[1:], [1.0, 1.0], start=1)
    agg.result()
    assert len(agg.selected_ids) == 1 and agg.neighbours(3) == 1


def test_krum_refuses_a_non_finite_update():
    agg = make_aggregator("krum:f=1|mean")
    agg.reset(4)
    with pytest.raises(ValueError, match="non-finite"):
        agg.add(np.array([1.0, np.inf, 0.0, 0.0], np.float32), 1.0, client_id="x")
    assert agg.count == 0 and not agg.contains("x")


def test_krum_state_round_trip_gives_the_same_selection():
    deltas = _cluster(8, seed=9) + [-_cluster(1, seed=9)[0]]
    weights = [float(i + 1) for i in range(9)]
    straight = make_aggregator("krum:f=1,20|mean")
    straight.reset(DIM)
    _feed(straight, deltas, weights)
    first = make_aggregator("krum:f=1,20|mean")
    first.reset(DIM)
    _feed(first, deltas[:5], weights[:5])
    saved = _savez_round_trip(first.state())
    resumed = make_aggregator(str(saved["spec"]))
    resumed.load_state(saved)
    _feed(resumed, deltas[5:], weights[5:], start=5)
    np.testing.assert_array_equal(resumed.result(), straight.result())
    assert resumed.dropped_ids == straight.dropped_ids == ("dev8",)
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("krum:f=2,20|mean").load_state(saved)
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("krum:f=1,m=3,20|mean").load_state(saved)
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("krum:f=1,20|median").load_state(saved)
    with pytest.raises(ValueError, match="checkpoint"):
        make_aggregator("krum:f=1,cosine,20|mean").load_state(saved)


def test_krum_composes_with_normclip_both_ways():
    honest = _cluster(10, seed=5)
    deltas = honest + [-30.0 * honest[0]]
    outer = make_aggregator("normclip:median*2|krum:f=1|mean")
    inner = make_aggregator("krum:f=1|normclip:median*2|mean")
    assert isinstance(outer, MedianNormClip) and isinstance(outer.inner, MultiKrum)
    assert isinstance(inner, MultiKrum) and isinstance(inner.inner, MedianNormClip)
    expected = np.mean(np.stack(honest).astype(np.float64), axis=0)
    for agg in (outer, inner):
        agg.reset(DIM)
        _feed(agg, deltas, [1.0] * len(deltas))
        np.testing.assert_allclose(agg.result(), expected, rtol=1e-4, atol=1e-5)
    assert outer.inner.dropped_ids == ("dev10",) and "dev10" in outer.clipped_ids
    assert inner.dropped_ids == ("dev10",)


def test_cosine_krum_drops_a_small_sign_flipped_update_that_euclidean_krum_keeps():
    """Honest norms spread over three decades: Euclidean distances make the small updates look
    alike whatever their direction, directions do not."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal(DIM)
    honest = [(scale * (base + 2.0 * rng.standard_normal(DIM))).astype(np.float32)
              for scale in np.geomspace(0.01, 10.0, 18)]
    deltas = honest + [-honest[0], -honest[17]]  # the smallest and the largest, flipped
    dropped = {}
    for spec in ("krum:f=2|mean", "krum:f=2,cosine|mean"):
        agg = make_aggregator(spec)
        agg.reset(DIM)
        _feed(agg, deltas, [1.0] * len(deltas))
        agg.result()
        dropped[spec] = set(agg.dropped_ids)
    assert dropped["krum:f=2|mean"] == {"dev17", "dev19"}  # a large honest update goes, the small flip stays
    assert dropped["krum:f=2,cosine|mean"] == {"dev18", "dev19"}


def test_cosine_distances_are_those_of_the_unit_vectors():
    deltas = _cluster(5, seed=6) + [np.zeros(DIM, np.float32)]
    agg = MultiKrum(WeightedMean(), f=1, cosine=True)
    agg.reset(DIM)
    _feed(agg, deltas, [1.0] * 6)
    units = np.stack([d / np.linalg.norm(d) for d in deltas[:5]]).astype(np.float64)
    expected = ((units[:, None, :] - units[None, :, :]) ** 2).sum(axis=2)
    dist = agg.pairwise_sq_distances()
    np.testing.assert_allclose(dist[:5, :5], expected, atol=1e-9)
    np.testing.assert_allclose(dist[5, :5], 1.0)  # a zero update stays at the origin


@pytest.mark.parametrize("spec, expected", [
    ("krum:f=2,cosine|mean", "krum:f=2,cosine,100|mean"),
    ("krum:f=2|mean", "krum:f=2,100|mean"),
    ("KRUM: f=3, m=12, 40 | mean", "krum:f=3,m=12,40|mean"),
    ("clip:5|krum:f=0|trimmed:0.1", "clip:5|krum:f=0,100|trimmed:0.1,100"),
])
def test_krum_specs_round_trip(spec, expected):
    agg = make_aggregator(spec)
    assert agg.spec == expected
    assert make_aggregator(agg.spec).spec == expected


@pytest.mark.parametrize("spec, problem", [
    ("krum:f=2", "cannot be the last stage"),
    ("krum|mean", "takes f=F"),
    ("krum:m=3|mean", "takes f=F"),
    ("krum:f=-1|mean", "f must be >= 0"),
    ("krum:f=x|mean", "is not an integer"),
    ("krum:f=1,m=0|mean", "krum m must be >= 1"),
    ("krum:f=1,q=2|mean", "unknown krum argument 'q'"),
    ("krum:f=1,0|mean", "max_updates must be >= 1"),
])
def test_krum_bad_specs_name_the_problem(spec, problem):
    with pytest.raises(ValueError) as info:
        make_aggregator(spec)
    assert problem in str(info.value)
    assert "e.g." in str(info.value)


def test_krum_constructor_validates_its_arguments():
    with pytest.raises(ValueError, match="inner"):
        MultiKrum("mean", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="f "):
        MultiKrum(WeightedMean(), -1)
    with pytest.raises(ValueError, match="m "):
        MultiKrum(WeightedMean(), 1, m=0)
