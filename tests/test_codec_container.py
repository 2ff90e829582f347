"""Byte writer/reader and varints: round trips, and every malformed input is a CodecError."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.codec.container import (
    DECODE_LIMIT, F32_MAX, ByteReader, ByteWriter, check_peak, decode_varint_array, encode_varint,
    encode_varint_array, varint_sizes,
)
from protocol.errors import CodecError, Reason


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_scalar_varint_round_trip(value):
    data = encode_varint(value)
    assert len(data) == int(varint_sizes(np.array([value], dtype=np.uint64))[0])
    reader = ByteReader(data)
    assert reader.varint("v", max_value=2**64 - 1) == value
    reader.finish()


def test_scalar_varint_known_bytes():
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"


def test_scalar_varint_limits():
    with pytest.raises(CodecError) as info:
        ByteReader(encode_varint(1000)).varint("count", max_value=999)
    assert info.value.reason is Reason.BAD_PAYLOAD and "count" in info.value.detail
    with pytest.raises(CodecError) as info:
        ByteReader(b"\x80\x80").varint("count", max_value=10**9)
    assert info.value.reason is Reason.TRUNCATED
    with pytest.raises(CodecError):
        ByteReader(b"\x80" * 11 + b"\x00").varint("count", max_value=2**80)


@settings(deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200))
def test_varint_array_round_trip_matches_scalar(values):
    arr = np.array(values, dtype=np.uint64)
    data = encode_varint_array(arr)
    assert data == b"".join(encode_varint(v) for v in values)
    decoded = decode_varint_array(data, len(values), 5, "test")
    assert decoded.dtype == np.int64
    assert decoded.tolist() == values


def test_varint_array_rejects_bad_counts_and_lengths():
    data = encode_varint_array(np.array([1, 300, 70000], dtype=np.uint64))
    for count in (2, 4):
        with pytest.raises(CodecError, match="expected"):
            decode_varint_array(data, count, 5, "gaps")
    with pytest.raises(CodecError, match="unterminated"):
        decode_varint_array(data + b"\x80", 3, 5, "gaps")
    with pytest.raises(CodecError, match="at most 2"):
        decode_varint_array(data, 3, 2, "gaps")
    with pytest.raises(CodecError):
        decode_varint_array(b"\x01", 0, 5, "gaps")
    assert decode_varint_array(b"", 0, 5, "gaps").size == 0


def test_writer_and_reader_sections():
    out = ByteWriter()
    out.u8(7)
    out.varint(781068)
    out.array(np.array([1.5, -2.0]), "<f4")
    out.write(b"xyz")
    reader = ByteReader(out.getvalue())
    assert reader.u8("a") == 7
    assert reader.varint("n", 10**6) == 781068
    assert reader.array("<f4", 2, "v").tolist() == [1.5, -2.0]
    assert reader.take(3, "t") == b"xyz"
    reader.finish()


@settings(deadline=None, max_examples=50)
@given(st.binary(max_size=20), st.integers(min_value=0, max_value=40))
def test_reader_never_reads_past_the_end(data, want):
    reader = ByteReader(data)
    if want <= len(data):
        assert len(reader.take(want, "x")) == want
        assert reader.remaining == len(data) - want
    else:
        with pytest.raises(CodecError) as info:
            reader.array("<f4", want, "floats") if want * 4 > len(data) else reader.take(want, "x")
        assert info.value.reason is Reason.TRUNCATED


def test_finish_refuses_trailing_bytes():
    reader = ByteReader(b"\x01\x02")
    reader.u8("a")
    with pytest.raises(CodecError) as info:
        reader.finish()
    assert info.value.reason is Reason.BAD_PAYLOAD and "1 unexpected" in info.value.detail


def test_check_peak():
    check_peak(0.0, 1e30, "v")
    check_peak(DECODE_LIMIT, 1.0, "v")
    for peak, scale in ((float("nan"), 1.0), (float("inf"), 1.0), (DECODE_LIMIT * 2, 1.0), (1e30, F32_MAX / 1e29)):
        with pytest.raises(CodecError) as info:
            check_peak(peak, scale, "values")
        assert info.value.reason is Reason.BAD_PAYLOAD and "values" in info.value.detail
