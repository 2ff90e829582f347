"""f32 is exact; f16 meets its stated bound, saturates, and refuses NaN/inf payloads."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.floats import F16_MAX, Float16Coder, Float32Coder
from protocol.errors import CodecError

RNG = np.random.default_rng(0)
LIMIT = float(np.float32(1e30))
finite32 = st.floats(-LIMIT, LIMIT, width=32, allow_subnormal=True)


def round_trip(coder, values, scale=1.0):
    out = ByteWriter()
    coder.encode(values, out, RNG)
    data = out.getvalue()
    assert len(data) == coder.max_section_bytes(values.size)
    reader = ByteReader(data)
    decoded = coder.decode(reader, values.size, scale)
    reader.finish()
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    return decoded


@settings(deadline=None)
@given(arrays(np.float32, st.integers(0, 200), elements=finite32))
def test_f32_is_exact(values):
    np.testing.assert_array_equal(round_trip(Float32Coder(), values), values)


@settings(deadline=None)
@given(arrays(np.float32, st.integers(0, 200), elements=st.floats(-F16_MAX, F16_MAX, width=32)))
def test_f16_error_bound(values):
    decoded = round_trip(Float16Coder(), values)
    bound = np.maximum(np.abs(values.astype(np.float64)) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound)


def test_f16_saturates_instead_of_overflowing():
    values = np.array([1e6, -1e30, 65504.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(round_trip(Float16Coder(), values), [F16_MAX, -F16_MAX, F16_MAX, 3.0])


def test_scale_is_folded_in():
    values = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(round_trip(Float32Coder(), values, 3.0), 3 * values)
    np.testing.assert_allclose(round_trip(Float16Coder(), values, -0.5), -0.5 * values)


@pytest.mark.parametrize("coder,dtype", [(Float32Coder(), "<f4"), (Float16Coder(), "<f2")])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_payload_values_are_refused(coder, dtype, bad):
    data = np.array([1.0, bad], dtype=dtype).tobytes()
    with pytest.raises(CodecError, match="NaN"):
        coder.decode(ByteReader(data), 2)


@pytest.mark.filterwarnings("error")
def test_signalling_nan_is_refused_without_numpy_warnings():
    snan = np.array([0x7F800001, 0x3F800000], dtype="<u4").tobytes()
    with pytest.raises(CodecError, match="NaN"):
        Float32Coder().decode(ByteReader(snan), 2, scale=3.0)


def test_values_that_overflow_when_scaled_are_refused():
    data = np.array([1e30, 1.0], dtype="<f4").tobytes()
    assert Float32Coder().decode(ByteReader(data), 2, scale=1e6)[0] == pytest.approx(1e36, rel=1e-6)
    with pytest.raises(CodecError, match="overflow"):
        Float32Coder().decode(ByteReader(data), 2, scale=1e9)
    with pytest.raises(CodecError, match="above"):
        Float32Coder().decode(ByteReader(np.array([3e38], dtype="<f4").tobytes()), 1)


def test_flags():
    assert Float32Coder().lossless and not Float16Coder().lossless
    assert (Float32Coder().spec, Float16Coder().spec) == ("f32", "f16")
