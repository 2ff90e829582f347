"""ResidualStore: the error-feedback residual kept between rounds, on disk or in memory."""
import numpy as np

from edge_client.residuals import ResidualStore


def test_file_round_trip_is_exact_and_leaves_no_temp_file(tmp_path):
    store = ResidualStore(tmp_path / "state")
    assert store.load(5) is None
    residual = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    store.save(residual)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["residual.f32"]
    assert (tmp_path / "state" / "residual.f32").stat().st_size == 4000
    back = ResidualStore(tmp_path / "state").load(1000)  # a restarted client reads it back
    assert back.dtype == np.float32 and back.tobytes() == residual.tobytes()


def test_saves_any_float_input_as_float32(tmp_path):
    store = ResidualStore(tmp_path)
    store.save(np.arange(6, dtype=np.float64)[::2])  # float64, not contiguous
    np.testing.assert_array_equal(store.load(3), np.array([0, 2, 4], np.float32))


def test_wrong_size_or_non_finite_residuals_are_discarded(tmp_path):
    store = ResidualStore(tmp_path)
    store.save(np.ones(10, np.float32))
    assert store.load(11) is None  # another model
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    store.save(bad)
    assert store.load(10) is None
    store.clear()
    assert store.load(10) is None and not (tmp_path / "residual.f32").exists()


def test_memory_store_hands_out_copies():
    store = ResidualStore(None)
    residual = np.ones(4, np.float32)
    store.save(residual)
    residual[:] = 7  # the caller's array is not the stored one
    got = store.load(4)
    np.testing.assert_array_equal(got, np.ones(4, np.float32))
    got[:] = 9
    np.testing.assert_array_equal(store.load(4), np.ones(4, np.float32))
    assert store.load(5) is None
    store.clear()
    assert store.load(4) is None
