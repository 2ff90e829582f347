"""Bit packing of 1/2/4/8-bit codes: exact round trip, MSB-first order, canonical padding."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.codec.bitpack import pack_codes, packed_size, unpack_codes
from protocol.errors import CodecError


@settings(deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_round_trip(bits, data):
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300)), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == packed_size(codes.size, bits) == -(-codes.size * bits // 8)
    back = unpack_codes(np.frombuffer(packed, dtype=np.uint8), bits, codes.size)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)


def test_msb_first_order():
    assert pack_codes(np.array([1, 0, 1], dtype=np.uint8), 1) == np.packbits([1, 0, 1]).tobytes() == b"\xa0"
    assert pack_codes(np.array([0xA, 0x5, 0x3], dtype=np.uint8), 4) == b"\xa5\x30"
    assert pack_codes(np.array([3, 2, 1, 0, 1], dtype=np.uint8), 2) == b"\xe4\x40"


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_nonzero_padding_is_refused(bits):
    packed = np.frombuffer(pack_codes(np.zeros(3, dtype=np.uint8), bits), dtype=np.uint8).copy()
    packed[-1] |= 1
    with pytest.raises(CodecError, match="padding"):
        unpack_codes(packed, bits, 3)


def test_wrong_length_is_refused():
    with pytest.raises(CodecError, match="cannot hold"):
        unpack_codes(np.zeros(3, dtype=np.uint8), 4, 8)
