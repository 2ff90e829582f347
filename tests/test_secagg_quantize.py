import numpy as np
import pytest

from protocol.secagg.params import SecAggParams
from protocol.secagg.quantize import (
    dequantize, from_ring, quantize, shared_coordinates, sum_error_bound, to_ring,
)


def test_quantize_clips_and_stays_within_one_step():
    p = SecAggParams(1, 1000, 2, 10, bits=16, value_range=1.0)
    x = np.linspace(-1.5, 1.5, 1000).astype(np.float32)
    q = quantize(x, p, np.random.default_rng(0))
    assert q.dtype == np.int64 and np.abs(q).max() == p.levels
    err = np.abs(dequantize(q, p) - np.clip(x, -1, 1))
    assert err.max() < p.step


def test_stochastic_rounding_is_unbiased():
    p = SecAggParams(1, 200_000, 2, 10, bits=12, value_range=1.0)
    x = np.full(200_000, 0.3 * p.step + 5 * p.step, dtype=np.float64)
    mean = dequantize(quantize(x, p, np.random.default_rng(1)), p).mean()
    assert mean == pytest.approx(x[0], abs=0.01 * p.step)


def test_ring_round_trip_of_signed_values_and_of_sums():
    p = SecAggParams(1, 5, 2, 4, bits=10)
    v = np.array([-p.levels, -1, 0, 1, p.levels])
    ring = to_ring(v, p)
    assert ring.dtype == np.uint32 and ring.max() < 2**10
    assert np.array_equal(from_ring(ring, p), v)
    total = (to_ring(v, p).astype(np.uint64) * 4) % 2**10  # four devices at the extremes do not wrap
    assert np.array_equal(from_ring(total.astype(np.uint32), p), 4 * v)


def test_sum_error_bound_holds_for_a_cohort():
    p = SecAggParams(1, 3000, 2, 20, bits=16, value_range=0.5)
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-0.5, 0.5, 3000) for _ in range(20)]
    total = sum(quantize(x, p, rng) for x in xs)
    assert np.abs(dequantize(total, p) - np.sum(xs, axis=0)).max() <= sum_error_bound(20, p)


def test_shared_coordinates_are_the_same_for_everyone_and_spread():
    a = shared_coordinates(b"s" * 32, 10_000, 500)
    assert np.array_equal(a, shared_coordinates(b"s" * 32, 10_000, 500))
    assert len(np.unique(a)) == 500 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, shared_coordinates(b"t" * 32, 10_000, 500))
    assert a.min() < 1000 and a.max() > 9000
    with pytest.raises(ValueError):
        shared_coordinates(b"s" * 32, 10, 11)


def test_bad_updates_are_refused():
    p = SecAggParams(1, 4, 2, 3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        quantize(np.zeros(5, np.float32), p, rng)
    with pytest.raises(ValueError):
        quantize(np.array([0, np.nan, 0, 0], np.float32), p, rng)
    with pytest.raises(ValueError):
        to_ring(np.zeros(4, np.float32), p)


def test_indicator_counts_ride_exactly_in_the_sum():
    from protocol.secagg.quantize import split_indicator, with_indicator
    p = SecAggParams(1, 4, 2, 5, bits=16)
    ints = [with_indicator(np.array([1, -2, 3]), flag, p) for flag in (True, False, True, True)]
    ring = sum(to_ring(v, p).astype(np.uint64) for v in ints) % p.modulus
    values, count = split_indicator(from_ring(ring.astype(np.uint32), p), p)
    assert count == 3 and values.tolist() == [4, -8, 12]
    with pytest.raises(ValueError):
        split_indicator(np.array([0, 1]), p)
