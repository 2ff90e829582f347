"""Clipping bounds the L2 norm and records what it did; error feedback is a pure marker."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.transforms import ClipStage, ErrorFeedback, l2_norm
from protocol.errors import CodecError


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 300), elements=st.floats(-1e6, 1e6, width=32)),
       st.floats(1e-3, 1e4))
def test_clip_bounds_the_norm_and_records_it(vec, bound):
    stage = ClipStage(bound)
    out = ByteWriter()
    clipped = stage.encode(vec, out)
    data = out.getvalue()
    assert len(data) == stage.max_section_bytes()
    norm = l2_norm(vec)
    was_clipped, recorded = stage.read(ByteReader(data))
    assert was_clipped == (norm > bound)
    assert recorded == pytest.approx(norm, rel=1e-6)
    assert clipped.dtype == np.float32
    if was_clipped:
        assert l2_norm(clipped) == pytest.approx(bound, rel=1e-5)
        # direction kept
        np.testing.assert_allclose(clipped, vec * (bound / norm), rtol=1e-5, atol=1e-30)
    else:
        np.testing.assert_array_equal(clipped, vec)


def test_clip_section_is_checked():
    for data in (b"\x02\x00\x00\x00\x00", b"\x00" + np.array([np.nan], "<f4").tobytes(),
                 b"\x01" + np.array([-1.0], "<f4").tobytes()):
        with pytest.raises(CodecError):
            ClipStage(1.0).read(ByteReader(data))
    with pytest.raises(CodecError):
        ClipStage(1.0).read(ByteReader(b"\x01\x00"))


def test_clip_spec_and_validation():
    assert ClipStage(5.0).spec == "clip:5" and ClipStage(0.25).spec == "clip:0.25"
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            ClipStage(bad)


def test_l2_norm_accumulates_in_float64():
    vec = np.full(10**6, 1e-3, dtype=np.float32)
    assert l2_norm(vec) == pytest.approx(1.0, rel=1e-7)


def test_error_feedback_marker():
    ef = ErrorFeedback()
    out = ByteWriter()
    vec = np.ones(3, dtype=np.float32)
    assert ef.encode(vec, out) is vec and out.getvalue() == b""
    assert ef.spec == "ef" and ef.lossless and ef.max_section_bytes() == 0
