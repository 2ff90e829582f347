"""Top-1/top-3 counting as BENCHMARK.md defines it, by hand and through a real model."""

import numpy as np
import pytest

from models.config import ModelConfig
from models.evaluate import EvalResult, count_topk, evaluate


def test_count_topk_on_hand_made_logits():
    # vocabulary of 6: PAD 0, OOV 1, BOS 2, EOS 3, words 4 and 5
    logits = np.array([[
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.5],   # ranking 4, 5, 3, ...  target 4 -> top1 and top3
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.5],   # target 3 (EOS, scored) -> top3 only
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.5],   # target 2 -> rank 4: miss
        [0.0, 9.0, 0.1, 0.2, 0.9, 0.5],   # target 1 (OOV): not scored even though ranked first
        [9.0, 0.0, 0.1, 0.2, 0.9, 0.5],   # target 0 (PAD): not scored
    ]], np.float32)
    y = np.array([[4, 3, 2, 1, 0]])
    assert count_topk(logits, y) == (1, 2, 3)


def test_count_topk_nan_rows_are_wrong_and_shapes_are_checked():
    logits = np.array([[[np.nan, 0, 0, 1.0, 0]]], np.float32)
    assert count_topk(logits, np.array([[3]])) == (0, 0, 1)
    with pytest.raises(ValueError, match="do not match"):
        count_topk(np.zeros((2, 3, 5)), np.zeros((2, 4), int))


def test_count_topk_agrees_with_a_full_sort_on_many_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 90, 50)).astype(np.float32)  # > 256 scored rows: several chunks
    y = rng.integers(0, 50, size=(7, 90))
    ranks = np.argsort(-logits, axis=-1)
    scored = (y != 0) & (y != 1)
    c1 = int(((ranks[..., 0] == y) & scored).sum())
    c3 = int(((ranks[..., :3] == y[..., None]).any(-1) & scored).sum())
    assert count_topk(logits, y) == (c1, c3, int(scored.sum()))


def test_eval_result_from_counts():
    r = EvalResult.from_counts(3, 6, 12)
    assert (r.top1, r.top3, r.scored) == (0.25, 0.5, 12)
    assert EvalResult.from_counts(0, 0, 0).top3 == 0.0


def test_evaluate_streams_a_real_model(tmp_path):
    from models.export import make_bundle
    from models.runtime import LiteRTModel

    config = ModelConfig(vocab_size=30, embed_dim=8, units=16, seq_len=5, batch_size=4)
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(26)]
    model = LiteRTModel(make_bundle(config, {"format": "fedboard-vocab/1", "words": words}), infer_batch=3)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 30, size=(10, 5)).astype(np.int32)
    y = rng.integers(0, 30, size=(10, 5)).astype(np.int32)
    c1, c3, n = count_topk(model.logits(x), y)
    for batch_size in (1, 4, 256):
        r = evaluate(model, x, y, batch_size=batch_size)
        assert (r.correct1, r.correct3, r.scored) == (c1, c3, n)
        assert r.top3 == pytest.approx(c3 / n)
    with pytest.raises(ValueError, match="differ in length"):
        evaluate(model, x, y[:3])
