"""Checkpoint files: exact round trips without pickle, atomic replacement, a full disk, the lock."""
import resource
import signal

import numpy as np
import pytest

from aggregator.aggregation import make_aggregator
from aggregator.checkpoint import (CheckpointError, CheckpointStore, ModelCheckpoint, RoundCheckpoint, load_npz)
from aggregator.server_optimizers import make_server_optimizer


def model_checkpoint(dim=1000, version=3):
    opt = make_server_optimizer("fedadam", lr=0.1)
    weights = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    opt.init(weights)
    opt.apply(weights, np.full(dim, 0.01, np.float32))
    rng = np.random.default_rng(5)
    rng.random()
    return ModelCheckpoint(version=version, last_round=7, weights=weights, optimizer=opt.state(),
                           rng_state=rng.bit_generator.state, model_envelope=b"model-bytes", delta_envelope=b"",
                           extra={"model_id": "cifg-x", "period_s": 1.5})


def test_model_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = model_checkpoint()
    store.save_model(saved)
    loaded = store.load_model()
    np.testing.assert_array_equal(loaded.weights, saved.weights)
    assert (loaded.version, loaded.last_round, loaded.model_envelope, loaded.delta_envelope, loaded.extra) == \
        (3, 7, b"model-bytes", b"", {"model_id": "cifg-x", "period_s": 1.5})
    opt = make_server_optimizer("fedadam", lr=0.1)
    opt.init(loaded.weights)
    opt.load_state(loaded.optimizer)
    np.testing.assert_array_equal(opt.state()["v"], saved.optimizer["v"])
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded.rng_state
    expected = np.random.default_rng(5)
    expected.random()
    assert rng.random() == expected.random()
    store.close()


def test_round_checkpoint_holds_the_running_sum_bit_for_bit(tmp_path):
    agg = make_aggregator("clip:3|mean")
    agg.reset(500)
    for i in range(4):
        agg.add(np.random.default_rng(i).standard_normal(500).astype(np.float32), i + 1.0, client_id=f"d{i}")
    store = CheckpointStore(tmp_path)
    store.save_round(RoundCheckpoint(9, {"phase": "reporting", "accepted": ["d0", "d1", "d2", "d3"]}, agg.state()))
    loaded = store.load_round()
    resumed = make_aggregator("clip:3|mean")
    resumed.load_state(loaded.aggregate)
    last = np.random.default_rng(9).standard_normal(500).astype(np.float32)
    agg.add(last, 2.0, client_id="d4")
    resumed.add(last, 2.0, client_id="d4")
    np.testing.assert_array_equal(agg.result(), resumed.result())
    assert loaded.meta["accepted"] == ["d0", "d1", "d2", "d3"] and loaded.round_id == 9
    with np.load(store.round_path, allow_pickle=False) as raw:  # plain arrays: readable without pickle
        assert "agg.inner.sum" in raw.files
    store.close()


def test_full_disk_is_a_clear_error_and_the_last_good_checkpoint_stays(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save_model(model_checkpoint(dim=1000, version=1))
    good = store.model_path.read_bytes()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # files may not grow past 64 KB: "disk full"
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint.*last good checkpoint.*is kept"):
            store.save_model(model_checkpoint(dim=100_000, version=2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert store.model_path.read_bytes() == good
    assert store.load_model().version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "model.npz"]  # no temp file left behind
    store.close()


def test_one_aggregator_per_directory_and_unreadable_files_say_what_to_do(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="another aggregator"):
        CheckpointStore(tmp_path)
    store.close()
    CheckpointStore(tmp_path).close()  # released
    (tmp_path / "round.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="unreadable.*move it away"):
        load_npz(tmp_path / "round.npz")
