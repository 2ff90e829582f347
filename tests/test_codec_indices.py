"""Index sets as gaps or bitmap: exact round trip, the smaller form chosen, bad data refused."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.indices import MODE_BITMAP, MODE_GAPS, max_index_bytes, read_indices, write_indices
from protocol.errors import CodecError


def write(indices, n):
    out = ByteWriter()
    write_indices(np.asarray(indices, dtype=np.int64), n, out)
    return out.getvalue()


def read(data, n, k):
    reader = ByteReader(data)
    indices = read_indices(reader, n, k)
    reader.finish()
    return indices


@settings(deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_round_trip(case):
    n, chosen = case
    indices = np.array(sorted(chosen), dtype=np.int64)
    data = write(indices, n)
    assert len(data) <= max_index_bytes(n, indices.size)
    back = read(data, n, indices.size)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, indices)


def test_sparse_sets_use_gaps_and_dense_sets_use_a_bitmap():
    n = 781_068
    few = np.sort(np.random.default_rng(0).choice(n, 7810, replace=False))
    data = write(few, n)
    assert data[0] == MODE_GAPS and len(data) < 2 * few.size  # under 2 bytes an index at 1 %
    many = np.sort(np.random.default_rng(0).choice(n, n // 5, replace=False))
    data = write(many, n)
    assert data[0] == MODE_BITMAP and len(data) == 1 + (n + 7) // 8


def test_bad_index_data_is_refused():
    n = 100
    gaps = write([3, 50, 99], n)
    with pytest.raises(CodecError, match="expected 2"):
        read(gaps, n, 2)
    out_of_range = write([3, 50, 120], 1000)
    with pytest.raises(CodecError):
        read(out_of_range, 100, 3)
    with pytest.raises(CodecError, match="unknown"):
        read(b"\x07", n, 0)
    bitmap = bytearray(write(list(range(0, 100, 2)), 100))
    assert bitmap[0] == MODE_BITMAP
    with pytest.raises(CodecError, match="expected 49"):
        read(bytes(bitmap), 100, 49)
    bitmap[-1] |= 0x01  # bit 103 of 100
    with pytest.raises(CodecError, match="beyond"):
        read(bytes(bitmap), 100, 50)
