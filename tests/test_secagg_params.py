import struct

import pytest

from protocol.secagg.errors import SecAggFormatError
from protocol.secagg.params import PACKED_BYTES, SecAggParams


def test_grid_leaves_room_for_the_whole_cohort():
    p = SecAggParams(round_id=1, dim=10, threshold=30, max_clients=50, bits=32, value_range=2.0)
    assert p.levels * 50 <= 2**31 - 1 < (p.levels + 1) * 50
    assert p.step == pytest.approx(2.0 / p.levels)
    assert p.value_bytes == 4
    p16 = SecAggParams(1, 10, 30, 50, bits=16)
    assert p16.levels == 655 and p16.value_bytes == 2
    assert SecAggParams(1, 10, 2, 2, bits=8).value_bytes == 1


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="no room"):
        SecAggParams(1, 10, 2, 300, bits=8)
    with pytest.raises(ValueError):
        SecAggParams(1, 10, 51, 50)
    with pytest.raises(ValueError):
        SecAggParams(1, 10, 1, 50)
    with pytest.raises(ValueError):
        SecAggParams(1, 0, 2, 5)
    with pytest.raises(ValueError):
        SecAggParams(1, 10, 2, 5, value_range=float("inf"))


def test_bytes_round_trip_and_strict_parse():
    p = SecAggParams(7, 781068, 14, 20, bits=20, value_range=0.25)
    assert SecAggParams.from_bytes(p.to_bytes()) == p
    with pytest.raises(SecAggFormatError):
        SecAggParams.from_bytes(p.to_bytes()[:-1])
    with pytest.raises(SecAggFormatError):
        SecAggParams.from_bytes(p.to_bytes() + b"\0")
    for bad in (struct.pack("<IIHBHd", 7, 10, 2, 32, 5, float("nan")),  # value range NaN
                struct.pack("<IIHBHd", 7, 10, 9, 32, 5, 1.0),           # threshold above max_clients
                struct.pack("<IIHBHd", 7, 10, 2, 33, 5, 1.0)):          # 33 bits
        assert len(bad) == PACKED_BYTES
        with pytest.raises(SecAggFormatError):
            SecAggParams.from_bytes(bad)
