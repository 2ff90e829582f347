"""Uniform block quantization: per-block error bound, unbiased stochastic rounding, sizes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.quantize import UniformQuantizer, block_view, expand_blocks
from protocol.errors import CodecError

values_strategy = arrays(np.float32, st.integers(0, 700), elements=st.floats(-1e6, 1e6, width=32))


def encode(q, values, rng):
    out = ByteWriter()
    q.encode(values, out, rng)
    return out.getvalue()


def decode(q, data, count, scale=1.0):
    reader = ByteReader(data)
    decoded = q.decode(reader, count, scale)
    reader.finish()
    return decoded


def block_steps(q, values):
    """Per-value step of its block, recomputed independently of the encoder."""
    steps = np.zeros(values.size, dtype=np.float64)
    for start in range(0, values.size, q.block):
        block = values[start:start + q.block].astype(np.float64)
        steps[start:start + q.block] = (block.max() - block.min()) / q.levels
    return steps


@settings(max_examples=60, deadline=None)
@given(values_strategy, st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 7, 64, 256]),
       st.booleans(), st.integers(0, 2**32))
def test_error_bound_per_block(values, bits, block, det, seed):
    q = UniformQuantizer(bits, block, deterministic=det)
    data = encode(q, values, np.random.default_rng(seed))
    assert len(data) == q.max_section_bytes(values.size)
    decoded = decode(q, data, values.size)
    assert decoded.dtype == np.float32 and decoded.size == values.size
    bound = block_steps(q, values) * (0.5 if det else 1.0)
    slack = 1e-6 * np.abs(values.astype(np.float64)).max(initial=0) + 1e-30
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound * (1 + 1e-5) + slack)


def mean_of_draws(q, values, draws, seed=42):
    rng = np.random.default_rng(seed)
    total = np.zeros(values.size, dtype=np.float64)
    for _ in range(draws):
        total += decode(q, encode(q, values, rng), values.size)
    return total / draws


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    values = (np.random.default_rng(7).standard_normal(300) * 1e-3).astype(np.float32)
    q = UniformQuantizer(bits, block=100)
    draws = 2000
    step = block_steps(q, values)
    # one draw is lo + step * (floor(t) + Bernoulli(frac)): its std is at most step / 2
    sigma = step / 2 / np.sqrt(draws)
    deviation = mean_of_draws(q, values, draws) - values
    assert np.all(np.abs(deviation) <= 5 * sigma + 1e-9)
    # no systematic drift either: the average signed deviation over all 300 values
    assert abs(np.mean(deviation / step)) <= 5 * 0.5 / np.sqrt(draws * values.size)


def test_the_unbiasedness_check_catches_a_biased_rounding():
    """Negative control: nearest rounding fails the same check, so the check has teeth."""
    values = (np.random.default_rng(7).standard_normal(300) * 1e-3).astype(np.float32)
    q = UniformQuantizer(2, block=100, deterministic=True)
    draws = 200
    sigma = block_steps(q, values) / 2 / np.sqrt(draws)
    assert np.any(np.abs(mean_of_draws(q, values, draws) - values) > 5 * sigma)


def test_deterministic_rounding_is_reproducible_and_nearest():
    values = np.linspace(-1, 1, 1000, dtype=np.float32)
    q = UniformQuantizer(4, deterministic=True)
    a = encode(q, values, np.random.default_rng(1))
    assert a == encode(q, values, np.random.default_rng(2))


def test_min_and_max_of_each_block_are_exact():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(1000).astype(np.float32)
    decoded = decode(UniformQuantizer(2, 100), encode(UniformQuantizer(2, 100), values, rng), 1000)
    for start in range(0, 1000, 100):
        assert decoded[start:start + 100].min() == values[start:start + 100].min()
        assert decoded[start:start + 100].max() == pytest.approx(values[start:start + 100].max(), rel=1e-6)


def test_constant_blocks_decode_exactly():
    values = np.full(300, -0.25, dtype=np.float32)
    q = UniformQuantizer(1)
    np.testing.assert_array_equal(decode(q, encode(q, values, np.random.default_rng(0)), 300), values)


def test_scale_is_folded_into_the_block_scales():
    rng = np.random.default_rng(4)
    values = rng.standard_normal(513).astype(np.float32)
    q = UniformQuantizer(8)
    data = encode(q, values, rng)
    np.testing.assert_allclose(decode(q, data, 513, 2.5), 2.5 * decode(q, data, 513), rtol=1e-6, atol=1e-6)


def test_size_is_bits_plus_64_bits_per_block():
    q = UniformQuantizer(4, block=256)
    data = encode(q, np.ones(1000, dtype=np.float32), np.random.default_rng(0))
    assert len(data) == 4 * 8 + 500  # 4 blocks x (lo, step) + 1000 nibbles


@pytest.mark.parametrize("lo,step", [(np.nan, 1.0), (0.0, np.inf), (0.0, -1.0), (3e38, 3e38)])
def test_hostile_scales_are_refused(lo, step):
    q = UniformQuantizer(8, block=4)
    data = np.array([lo], dtype="<f4").tobytes() + np.array([step], dtype="<f4").tobytes() + b"\x00" * 4
    with pytest.raises(CodecError, match="scales"):
        q.decode(ByteReader(data), 4)


def test_block_helpers():
    blocks = block_view(np.arange(5, dtype=np.float32), 2)
    np.testing.assert_array_equal(blocks, [[0, 1], [2, 3], [4, 4]])
    codes = np.array([1, 2, 3, 4, 5], dtype=np.uint8)
    np.testing.assert_allclose(expand_blocks(codes, np.array([1, 10, 100], dtype=np.float32),
                                             np.array([0, 1, 2], dtype=np.float32), 2),
                               [1, 2, 31, 41, 502])


def test_spec_text():
    assert UniformQuantizer(8).spec == "q8"
    assert UniformQuantizer(4, 128, True).spec == "q4:block=128,det"
    with pytest.raises(ValueError):
        UniformQuantizer(3)
