"""Next-word suggestions: what the keyboard shows above the keys while the user types.

The text typed so far becomes `<bos> w1 ... wn` with the bundle's vocabulary; the model reads
the last seq_len ids (the same window length it was trained on) and the k most likely next
words are shown. Special tokens are never suggested: <pad>, <oov> and <bos> are not words,
and <eos> ("the message ends here") is not shown either, because a suggestion strip offers
words to insert; a keyboard that wants a "send" hint can call `next_word_scores` itself.

Runs the float model of the training bundle (`LiteRTModel.logits`) or, when given, the int8
inference model the aggregator exports (about 4x smaller and 3x faster, DESIGN.md).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from models.bundle import Bundle
from models.runtime import InferenceModel, LiteRTModel
from models.tokenizer import BOS, EOS, OOV, PAD, SPECIALS, Vocabulary, tokenize

log = logging.getLogger(__name__)

NEVER_SUGGESTED = (PAD, OOV, BOS, EOS)


class Suggester:
    """Top-k next words for a text, from a bundle and (optionally) trained weights.

    Args:
        bundle: the training bundle (graph, vocabulary, shapes).
        weights: float32 weights to suggest with (e.g. the latest global model);
            the bundle's initial weights when None. Ignored with `int8_model`.
        int8_model: TFLite bytes of `models.export.export_int8_inference`, which already
            hold their weights.
        num_threads: interpreter threads (1 keeps a keyboard's latency steady).

    Not thread-safe (one TFLite interpreter); guard it or make one per thread.
    """

    def __init__(self, bundle: Bundle, weights: np.ndarray | None = None, *, int8_model: bytes | None = None,
                 num_threads: int = 1) -> None:
        self.bundle = bundle
        self.vocab = Vocabulary.from_json(bundle.vocab_json)
        self.seq_len = bundle.config.seq_len
        self._lock = threading.Lock()
        if int8_model is not None:
            self._model: LiteRTModel | InferenceModel = InferenceModel(int8_model, bundle.config,
                                                                       num_threads=num_threads, infer_batch=1)
            self.kind = "int8"
        else:
            model = LiteRTModel(bundle, num_threads=num_threads, infer_batch=1)
            if weights is not None:
                model.set_weights(np.asarray(weights, dtype=np.float32))
            self._model = model
            self.kind = "float"
        self._x = np.zeros((1, self.seq_len), np.int32)
        self.last_latency_ms = float("nan")

    def context_ids(self, text: str) -> list[int]:
        """The ids the model reads: `<bos>` + the text's words, the last seq_len of them."""
        ids = [BOS, *self.vocab.encode(tokenize(text))]
        return ids[-self.seq_len:]

    def next_word_scores(self, text: str) -> np.ndarray:
        """Logits float32[vocab] of the word after `text` (specials included)."""
        ids = self.context_ids(text)
        with self._lock:
            self._x[0, :] = PAD
            self._x[0, : len(ids)] = ids  # right padding: the LSTM is causal, later PADs change nothing
            start = time.perf_counter()
            logits = self._model.logits(self._x)[0, len(ids) - 1]
            self.last_latency_ms = (time.perf_counter() - start) * 1000.0
        return logits

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The k most likely next words after `text`, best first; never a special token."""
        words = self.vocab.size - len(SPECIALS)
        if not 1 <= k <= words:
            raise ValueError(f"k must be in 1..{words}, got {k}")
        scores = np.array(self.next_word_scores(text), dtype=np.float32)
        scores[list(NEVER_SUGGESTED)] = -np.inf
        top = np.argpartition(scores, -k)[-k:]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [self.vocab.words[int(i)] for i in top]
