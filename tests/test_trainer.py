"""InterpreterPool and train_round: kept interpreters (simulator) and per-lease ones (a device)."""
import threading

import numpy as np
import pytest

from edge_client.trainer import ArrayWindows, InterpreterPool, TrainSettings, train_round
from models.config import ModelConfig
from models.runtime import LiteRTModel

CONFIG = ModelConfig(vocab_size=60, embed_dim=8, units=16, seq_len=6, batch_size=4)


def vocab(n: int) -> dict:
    return {"format": "fedboard-vocab/1", "words": ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(n - 4)]}


def windows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(2, CONFIG.vocab_size, size=(n, CONFIG.seq_len + 1), dtype=np.int32)
    return ids[:, :-1].copy(), ids[:, 1:].copy()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from models.bundle import read_bundle
    from models.export import export_bundle  # TensorFlow, in this test process only

    return read_bundle(export_bundle(CONFIG, vocab(CONFIG.vocab_size), tmp_path_factory.mktemp("tr") / "b.fbz", seed=2))


def test_kept_interpreters_are_created_up_front_and_reused(bundle):
    pool = InterpreterPool(bundle, size=2)
    with pool.lease() as a:
        with pool.lease() as b:
            assert a is not b
            with pytest.raises(TimeoutError, match="no free interpreter"):
                with pool.lease(timeout_s=0.05):
                    pass
    with pool.lease() as again:
        assert again in (a, b) and not again.closed


def test_per_lease_interpreter_is_created_on_lease_and_freed_after(bundle):
    released = []
    pool = InterpreterPool(bundle, size=1, keep_idle=False, after_release=lambda: released.append(1))
    assert released == [1]  # one was loaded (and freed) to check the bundle
    released.clear()
    with pool.lease() as first:
        assert isinstance(first, LiteRTModel) and not first.closed
        np.testing.assert_array_equal(first.get_weights(), bundle.initial_weights)
        first.set_weights(bundle.initial_weights + np.float32(1))
    assert first.closed and released == [1]
    with pytest.raises(RuntimeError, match="closed"):
        first.get_weights()
    with pool.lease() as second:  # a fresh interpreter: nothing of the last lease is left
        assert second is not first
        np.testing.assert_array_equal(second.get_weights(), bundle.initial_weights)
    assert released == [1, 1]


def test_per_lease_pool_checks_the_bundle_at_once(bundle):
    from models.bundle import Bundle

    broken = Bundle.create(bundle.config, bundle.vocab_json, b"\x1c\x00\x00\x00TFL3" + bytes(64),
                           bundle.initial_weights)
    with pytest.raises(ValueError):
        InterpreterPool(broken, keep_idle=False)


def test_per_lease_pool_still_bounds_concurrency(bundle):
    pool = InterpreterPool(bundle, size=1, keep_idle=False)
    leased, go = threading.Event(), threading.Event()

    def hold() -> None:
        with pool.lease():
            leased.set()
            go.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    assert leased.wait(5)
    with pytest.raises(TimeoutError):
        with pool.lease(timeout_s=0.05):
            pass
    go.set()
    worker.join(5)
    with pool.lease(timeout_s=1) as model:
        assert not model.closed


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_train_round_gives_the_same_weights_with_kept_or_per_lease_interpreters(bundle, mu):
    x, y = windows(0, 11)
    start = (bundle.initial_weights + np.float32(0.01)).astype(np.float32)
    settings = TrainSettings(epochs=2, lr=0.5, mu=mu, clip=5.0)
    kept = train_round(InterpreterPool(bundle), start, (x, y), settings, seed=7)
    fresh = train_round(InterpreterPool(bundle, keep_idle=False), start, (x, y), settings, seed=7)
    assert kept.result == fresh.result
    assert (kept.result.steps, kept.result.examples, kept.result.stopped) == (6, 22, False)
    np.testing.assert_array_equal(kept.weights, fresh.weights)
    assert not np.array_equal(fresh.weights, start)  # it trained
    assert fresh.weights.flags.writeable  # the caller may compute the delta in place


def test_train_round_anchors_fedprox_at_the_round_weights(bundle):
    """mu > 0 pulls towards the weights the round started from, not the bundle's."""
    x, y = windows(1, 8)
    start = (bundle.initial_weights + np.float32(0.05)).astype(np.float32)
    settings = TrainSettings(epochs=3, lr=0.5, mu=2.0, clip=0.0)
    local = train_round(InterpreterPool(bundle, keep_idle=False), start, (x, y), settings, seed=3)
    model = LiteRTModel(bundle)
    model.set_weights(start)
    model.set_anchor(start)
    model.train(x, y, epochs=3, lr=0.5, rng=np.random.default_rng(3), mu=2.0)
    np.testing.assert_array_equal(local.weights, model.get_weights())


def test_array_windows_and_stop(bundle):
    source = ArrayWindows(*windows(2, 9))
    x, y = source.training_windows()
    assert x.shape == y.shape == (9, CONFIG.seq_len)
    local = train_round(InterpreterPool(bundle, keep_idle=False), bundle.initial_weights, (x, y),
                        TrainSettings(epochs=1), seed=0, should_stop=lambda: True)
    assert local.result.stopped and local.result.steps == 0
    np.testing.assert_array_equal(local.weights, bundle.initial_weights)
