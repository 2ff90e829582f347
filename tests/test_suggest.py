"""Suggester: three real words for what was typed, better after training, fast enough for a keyboard."""
import time

import numpy as np
import pytest

from edge_client.suggest import Suggester
from models.bundle_cache import get_or_export_bundle
from models.config import ModelConfig
from models.partition import make_windows, windows_to_xy
from models.runtime import LiteRTModel
from models.tokenizer import BOS, SPECIALS, Vocabulary, build_vocabulary

KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]
PHRASE = "i am going to the park"


@pytest.fixture(scope="module")
def bundle(cache_dir):
    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


@pytest.fixture(scope="module")
def trained(bundle):
    """Weights after about a hundred SGD steps on the phrase typed over and over."""
    vocab = Vocabulary.from_json(bundle.vocab_json)
    windows = np.concatenate([make_windows(vocab.encode_block(PHRASE), 20)] * 64)
    x, y = windows_to_xy(windows)
    model = LiteRTModel(bundle)
    result = model.train(x, y, epochs=24, lr=1.0, rng=np.random.default_rng(0))
    assert result.steps == 96 and result.last_loss < 0.5 * result.first_loss
    return model.get_weights()


def test_three_real_words(bundle):
    suggester = Suggester(bundle)
    words = suggester.suggest("i am going to")
    assert len(words) == 3 and len(set(words)) == 3
    vocab_words = set(Vocabulary.from_json(bundle.vocab_json).words[len(SPECIALS):])
    assert set(words) <= vocab_words
    for text in ("", "!!!", "xylophone quantum"):  # nothing typed, no words, unknown words
        assert not set(suggester.suggest(text, k=5)) & set(SPECIALS)


def test_suggestions_improve_after_training(bundle, trained):
    before = Suggester(bundle).suggest("i am going to")
    suggester = Suggester(bundle, trained)
    after = suggester.suggest("i am going to")
    assert after[0] == "the", (before, after)
    assert suggester.suggest("i am going to the")[0] == "park"
    assert suggester.suggest("I AM")[0] == "going"  # the training tokenizer: case folded
    # the model now expects "the" after "i am going to" far more than the untrained one did
    the = Vocabulary.from_json(bundle.vocab_json).id_of("the")

    def p_the(s: Suggester) -> float:
        logits = s.next_word_scores("i am going to").astype(np.float64)
        return float(np.exp(logits[the] - logits.max()) / np.exp(logits - logits.max()).sum())

    assert p_the(suggester) > 0.5 > 3 * p_the(Suggester(bundle))


def test_context_is_the_last_seq_len_ids(bundle):
    suggester = Suggester(bundle)
    assert suggester.context_ids("i am")[0] == BOS and len(suggester.context_ids("i am")) == 3
    long = suggester.context_ids("the cat " * 30)
    assert len(long) == 20 and BOS not in long
    with pytest.raises(ValueError, match="k must be"):
        suggester.suggest("i am", k=0)


def test_latency_is_keyboard_fast(bundle, trained):
    suggester = Suggester(bundle, trained)
    suggester.suggest("i am going to")  # first call sizes the interpreter
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        suggester.suggest("i am going to")
        timings.append((time.perf_counter() - start) * 1000)
    median = float(np.median(timings))
    print(f"suggest latency (tiny model, float): median {median:.2f} ms, max {max(timings):.2f} ms")
    assert median < 500 and suggester.last_latency_ms < 500


def test_int8_inference_model_agrees(bundle, trained):
    pytest.importorskip("tensorflow")
    from models.export import export_int8_inference  # server side; the Suggester itself needs no TF

    suggester = Suggester(bundle, int8_model=export_int8_inference(bundle, trained))
    assert suggester.kind == "int8"
    assert suggester.suggest("i am going to")[0] == "the"
    assert suggester.suggest("i am going to the")[0] == "park"
    assert suggester.last_latency_ms < 500
