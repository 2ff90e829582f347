"""Sign compression: sign(x) times the block's mean |x|, exactly; L1 norm per block kept."""
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.sign import SignCoder
from protocol.errors import CodecError


def round_trip(coder, values, scale=1.0):
    out = ByteWriter()
    coder.encode(values, out, np.random.default_rng(0))
    data = out.getvalue()
    assert len(data) == coder.max_section_bytes(values.size)
    reader = ByteReader(data)
    decoded = coder.decode(reader, values.size, scale)
    reader.finish()
    return decoded


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 600), elements=st.floats(-1e6, 1e6, width=32)),
       st.sampled_from([1, 5, 64, 256]))
@example(values=np.array([8.097e-42, 0.0, 0.0, 0.0], dtype=np.float32), block=5)  # a subnormal mean
def test_decodes_sign_times_block_mean(values, block):
    coder = SignCoder(block)
    decoded = round_trip(coder, values)
    assert decoded.dtype == np.float32 and decoded.size == values.size
    for start in range(0, values.size, block):
        chunk = values[start:start + block].astype(np.float64)
        mean_abs = np.abs(chunk).mean()
        expected = np.where(chunk >= 0, mean_abs, -mean_abs)
        # a subnormal float32 mean is only exact to its spacing (1.4e-45), not to 1e-6 relative
        tiny = float(np.finfo(np.float32).smallest_subnormal)
        np.testing.assert_allclose(decoded[start:start + block], expected, rtol=1e-6, atol=tiny)
        # the block's L1 norm survives
        assert np.abs(decoded[start:start + block]).sum() == pytest.approx(np.abs(chunk).sum(), rel=1e-5,
                                                                            abs=block * tiny)


def test_size_is_one_bit_plus_a_float_per_block():
    coder = SignCoder()
    out = ByteWriter()
    coder.encode(np.ones(1000, dtype=np.float32), out, np.random.default_rng(0))
    assert len(out.getvalue()) == 4 * 4 + 125


def test_scale_and_hostile_scales():
    values = np.array([1.0, -3.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(round_trip(SignCoder(), values, 2.0), [4.0, -4.0, 4.0])
    for bad in (-1.0, np.nan, np.inf):
        data = np.array([bad], dtype="<f4").tobytes() + b"\x80"
        with pytest.raises(CodecError, match="scales"):
            SignCoder().decode(ByteReader(data), 1)


def test_spec_text():
    assert SignCoder().spec == "sign" and SignCoder(64).spec == "sign:block=64"
