"""Centralized Adam baseline: it learns, and its weights drop into a bundle unchanged."""

import numpy as np
import pytest

from models.central import CentralResult, train_central
from models.config import ModelConfig
from models.evaluate import evaluate

CONFIG = ModelConfig(vocab_size=60, embed_dim=12, units=24, seq_len=6, batch_size=4)


def learnable_windows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each word is followed by a fixed successor: a model can reach high accuracy."""
    words = CONFIG.vocab_size - 4
    start = rng.integers(0, words, size=(n, 1))
    ids = (start + 5 * np.arange(CONFIG.seq_len + 1)) % words + 4
    return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)


def test_central_training_learns_and_its_weights_run_in_litert():
    from models.export import make_bundle
    from models.runtime import LiteRTModel

    rng = np.random.default_rng(0)
    train_x, train_y = learnable_windows(rng, 400)
    test_x, test_y = learnable_windows(rng, 60)
    result = train_central(train_x, train_y, test_x, test_y, CONFIG, epochs=4, batch_size=32, lr=1e-2,
                           seed=0, progress=False)
    assert isinstance(result, CentralResult)
    assert [row["epoch"] for row in result.per_epoch] == [1, 2, 3, 4]
    assert result.per_epoch[-1]["train_loss"] < result.per_epoch[0]["train_loss"]
    assert result.best_top3 == max(row["top3"] for row in result.per_epoch)
    assert result.best_top3 > 0.5  # chance is 3/56
    assert result.final_weights.shape == (CONFIG.param_count,) and result.wall_s > 0

    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(56)]
    bundle = make_bundle(CONFIG, {"format": "fedboard-vocab/1", "words": words}, initial_weights=result.final_weights)
    lite = evaluate(LiteRTModel(bundle), test_x, test_y)
    last = result.per_epoch[-1]
    assert lite.scored == last["scored"] == test_y.size
    assert lite.top1 == pytest.approx(last["top1"], abs=2 / lite.scored)  # float ties may differ
    assert lite.top3 == pytest.approx(last["top3"], abs=2 / lite.scored)


def test_central_rejects_mismatched_inputs():
    x = np.zeros((4, CONFIG.seq_len), np.int32)
    with pytest.raises(ValueError):
        train_central(x, x[:3], x, x, CONFIG, epochs=1, progress=False)
    with pytest.raises(ValueError, match="no training windows"):
        train_central(x[:0], x[:0], x, x, CONFIG, epochs=1, progress=False)
