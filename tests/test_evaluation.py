"""Evaluation: device-reported counts (federated) and the server's held-out hook (TFLite, no TF)."""
import numpy as np
import pytest

from aggregator.evaluation import FederatedEval, device_eval_counts, heldout_evaluator, heldout_from_corpus

KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]


def test_device_counts_are_read_strictly_from_the_update_metadata():
    assert device_eval_counts({"eval": {"correct1": 1, "correct3": 2, "scored": 5}}) == (1, 2, 5)
    assert device_eval_counts({"extra": {"eval": {"correct1": 0, "correct3": 0, "scored": 0}}}) == (0, 0, 0)
    for bad in ({}, {"eval": [1, 2, 3]}, {"eval": {"correct1": 3, "correct3": 2, "scored": 5}},
                {"eval": {"correct1": 1.5, "correct3": 2, "scored": 5}}, {"eval": {"correct1": True, "correct3": 2,
                                                                                  "scored": 5}},
                {"eval": {"correct1": -1, "correct3": 2, "scored": 5}}, {"extra": "x"}):
        assert device_eval_counts(bad) is None, bad


def test_federated_eval_is_a_micro_average_and_survives_a_checkpoint():
    fed = FederatedEval()
    assert fed.result() == {}
    fed.add((1, 2, 10))
    fed.add((5, 8, 30))
    again = FederatedEval.from_state(fed.state())
    assert again.result() == {"top1": 6 / 40, "top3": 10 / 40, "scored": 40.0, "devices": 2.0}


@pytest.fixture(scope="module")
def tiny_bundle(cache_dir):
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import build_vocabulary

    vocab = build_vocabulary(KEYBOARD, size=100)  # the tiny model of test_app.py: exported once per session
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


def test_heldout_hook_on_a_corpus_test_split_matches_a_direct_evaluation(tiny_bundle, tmp_path):
    from models.evaluate import evaluate
    from models.runtime import LiteRTModel

    corpus = tmp_path / "typed.tsv"
    corpus.write_text("".join(f"user{u}\t{text}\n" for u in range(3) for text in KEYBOARD * 2))
    hook = heldout_from_corpus(tiny_bundle, str(corpus), "tsv")
    result = hook(tiny_bundle.initial_weights)
    assert set(result) == {"top1", "top3", "scored"} and 0 <= result["top1"] <= result["top3"] <= 1
    assert result["scored"] > 0
    # the same as evaluating the pooled test windows by hand
    from models.corpus import read_corpus
    from models.task import build_task
    from models.tokenizer import Vocabulary

    task = build_task(read_corpus(str(corpus), "tsv"), vocab=Vocabulary.from_json(tiny_bundle.vocab_json), seq_len=20)
    x, y = task.pooled_test()
    model = LiteRTModel(tiny_bundle)
    model.set_weights(tiny_bundle.initial_weights)
    direct = evaluate(model, x, y)
    assert result["top3"] == pytest.approx(direct.top3) and result["scored"] == direct.scored
    # other weights, other figures: the hook really loads what it is given. A model whose output bias
    # always prefers the most frequent target gets exactly that target's share of top-1 right.
    targets = y[(y != 0) & (y != 1)]
    common = int(np.bincount(targets).argmax())
    weights = tiny_bundle.initial_weights.copy()
    names = tiny_bundle.split_weights(weights)
    bias = next(v for k, v in names.items() if v.shape == (tiny_bundle.config.vocab_size,))
    bias[common] = 50.0
    biased = heldout_evaluator(tiny_bundle, x, y)(weights)
    assert biased["top1"] == pytest.approx(np.mean(targets == common))
