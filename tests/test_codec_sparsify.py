"""Top-k keeps the largest exactly; random-k draws a reproducible uniform subset from a seed."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.sparsify import (
    DenseLayout, RandK, TopK, first_distinct, keep_count, random_subset, splitmix64,
)


def encode(layout, vec, seed=0):
    out = ByteWriter()
    values = layout.encode(vec, out, np.random.default_rng(seed))
    return values, out.getvalue()


def decode(layout, data, n):
    reader = ByteReader(data)
    result = layout.decode(reader, n)
    reader.finish()
    return result


def test_keep_count():
    assert keep_count(0.01, 781_068) == 7811
    assert keep_count(0.5, 3) == 2
    assert keep_count(1e-9, 10) == 1
    assert keep_count(7800, 781_068) == 7800
    assert keep_count(7800, 100) == 100
    assert keep_count(0.3, 0) == 0


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 500), elements=st.floats(-1e6, 1e6, width=32)),
       st.sampled_from([0.01, 0.1, 0.5, 0.99, 1, 5, 1000]))
def test_topk_keeps_the_largest_exactly(vec, amount):
    layout = TopK(amount)
    values, data = encode(layout, vec)
    assert len(data) <= layout.max_section_bytes(vec.size)
    indices, factor = decode(layout, data, vec.size)
    k = keep_count(amount, vec.size)
    assert factor == 1.0 and indices.size == k == values.size
    assert np.all(np.diff(indices) > 0)
    np.testing.assert_array_equal(values, vec[indices])
    if 0 < k < vec.size:
        dropped = np.delete(np.abs(vec), indices)
        assert np.abs(values).min() >= dropped.max()


def test_splitmix64_matches_the_reference_sequence():
    # SplitMix64 (Steele, Lea, Flood 2014) seeded with 0: the published first outputs
    assert [int(v) for v in splitmix64(0, 0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    np.testing.assert_array_equal(splitmix64(99, 5, 4), splitmix64(99, 0, 9)[5:])


@settings(deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(1, 3000), st.floats(0, 1))
def test_random_subset_is_sorted_distinct_and_reproducible(seed, n, fraction):
    k = int(round(fraction * n))
    subset = random_subset(seed, n, k)
    assert subset.size == k and subset.dtype == np.int64
    assert np.all(np.diff(subset) > 0) and (k == 0 or (subset[0] >= 0 and subset[-1] < n))
    np.testing.assert_array_equal(subset, random_subset(seed, n, k))


@settings(deadline=None)
@given(st.lists(st.integers(0, 60), max_size=200), st.integers(0, 70))
def test_first_distinct_keeps_draw_order_on_both_paths(drawn, k):
    arr = np.array(drawn, dtype=np.int64)
    seen = list(dict.fromkeys(drawn))  # distinct values in the order first drawn
    expected = sorted(seen[:k]) if len(seen) >= k else None
    for n in (61, 2**55):  # 2**55 forces the np.unique fallback
        got = first_distinct(arr, n, k)
        assert (got is None) if expected is None else (got.tolist() == expected)


@pytest.mark.parametrize("k", [3, 17])  # 17 > n/2 goes through the complement
def test_random_subset_is_uniform(k):
    n, trials = 20, 4000
    counts = np.zeros(n)
    for seed in range(trials):
        counts[random_subset(seed, n, k)] += 1
    expected = trials * k / n
    sigma = math.sqrt(trials * (k / n) * (1 - k / n))
    assert np.all(np.abs(counts - expected) <= 5 * sigma)


def test_randk_sends_a_seed_not_indices_and_is_unbiased_with_the_flag():
    vec = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    plain, unbiased = RandK(0.2), RandK(0.2, unbiased=True)
    values, data = encode(plain, vec, seed=3)
    assert len(data) == 8 == plain.max_section_bytes(50)
    indices, factor = decode(plain, data, 50)
    assert factor == 1.0 and indices.size == 10
    np.testing.assert_array_equal(values, vec[indices])
    assert decode(unbiased, data, 50)[1] == 5.0
    # E[scaled sparse vector] = vec over the seeds
    total = np.zeros(50)
    draws = 4000
    for seed in range(draws):
        values, data = encode(unbiased, vec, seed)
        indices, factor = decode(unbiased, data, 50)
        total[indices] += factor * values
    sigma = np.abs(vec) * math.sqrt(5 - 1) / math.sqrt(draws)  # std of x * (n/k) * Bernoulli(k/n)
    assert np.all(np.abs(total / draws - vec) <= 5 * sigma + 1e-9)


def test_dense_layout_and_specs():
    dense = DenseLayout()
    values, data = encode(dense, np.ones(4, dtype=np.float32))
    assert data == b"" and decode(dense, data, 4) == (None, 1.0) and values.size == 4
    assert TopK(0.01).spec == "topk:0.01" and TopK(100).spec == "topk:100"
    assert RandK(0.1, unbiased=True).spec == "randk:0.1,unbiased"
