"""Evaluating the global model: on a held-out set on the server, and on the devices' own data.

Server side: an `EvalHook` is any callable that takes the float32 weights and returns named
metrics; `heldout_evaluator` builds one that runs the bundle's `infer` signature through the
TFLite runtime (no TensorFlow) on test windows, and `heldout_from_corpus` cuts those windows
from a corpus with the bundle's own vocabulary.

Federated evaluation: a device may report how the model it received does on its local test
data, as counts in its update's metadata (so nothing but three integers leaves the device):
``meta["eval"]`` or ``meta["extra"]["eval"]`` = ``{"correct1": int, "correct3": int,
"scored": int}``. Counts add up across devices into a micro-averaged top-1/top-3, the
benchmark's metric, without the server ever seeing a test window. A device's counts are
taken only up to what its check-in makes possible (`eval_bound`: seq_len positions per
declared window); beyond that they are ignored, and logged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EvalHook = Callable[[np.ndarray], Mapping[str, float]]
_KEYS = ("correct1", "correct3", "scored")


def device_eval_counts(meta: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """The (correct1, correct3, scored) a device reported in its update metadata, if valid."""
    report = meta.get("eval")
    if report is None and isinstance(meta.get("extra"), Mapping):
        report = meta["extra"].get("eval")
    if not isinstance(report, Mapping):
        return None
    values = [report.get(k) for k in _KEYS]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40 for v in values):
        return None
    c1, c3, scored = values
    if not c1 <= c3 <= scored:
        return None
    return c1, c3, scored


def eval_bound(declared_windows: int, seq_len: int) -> int:
    """Most positions a device can score: seq_len targets per window it declared at check-in.

    Without a bound one device reporting 2^40 correct guesses decided the round's accuracy."""
    return max(0, int(declared_windows)) * max(1, int(seq_len))


class FederatedEval:
    """Sums the devices' reported counts over one round."""

    def __init__(self) -> None:
        self.correct1 = self.correct3 = self.scored = self.devices = 0

    def add(self, counts: tuple[int, int, int]) -> None:
        c1, c3, scored = counts
        self.correct1 += c1
        self.correct3 += c3
        self.scored += scored
        self.devices += 1

    def result(self) -> dict[str, float]:
        if not self.scored:
            return {}
        return {"top1": self.correct1 / self.scored, "top3": self.correct3 / self.scored,
                "scored": float(self.scored), "devices": float(self.devices)}

    def state(self) -> dict[str, int]:
        return {"correct1": self.correct1, "correct3": self.correct3, "scored": self.scored, "devices": self.devices}

    @classmethod
    def from_state(cls, state: Mapping[str, int] | None) -> "FederatedEval":
        out = cls()
        for key, value in (state or {}).items():
            setattr(out, key, int(value))
        return out


def heldout_evaluator(bundle: Any, x: np.ndarray, y: np.ndarray, *, num_threads: int = 1) -> EvalHook:
    """An EvalHook: top-1/top-3 of the weights on windows (x, y), through the TFLite runtime."""
    from models.evaluate import evaluate
    from models.runtime import LiteRTModel

    model = LiteRTModel(bundle, num_threads=num_threads)

    def run(weights: np.ndarray) -> dict[str, float]:
        model.set_weights(np.asarray(weights, dtype=np.float32))
        result = evaluate(model, x, y)
        return {"top1": float(result.top1), "top3": float(result.top3), "scored": float(result.scored)}

    return run


def heldout_from_corpus(bundle: Any, corpus: str, fmt: str | None = None, *, seed: int = 0,
                        num_threads: int = 1) -> EvalHook:
    """An EvalHook on the test split of a corpus, tokenized with the bundle's vocabulary."""
    from models.corpus import read_corpus
    from models.task import build_task
    from models.tokenizer import Vocabulary

    task = build_task(read_corpus(corpus, fmt, seed=seed), vocab=Vocabulary.from_json(bundle.vocab_json),
                      seq_len=bundle.config.seq_len)
    x, y = task.pooled_test()
    if len(x) == 0:
        raise ValueError(f"corpus {corpus} has no test windows to evaluate on")
    log.info("held-out evaluation on %d test windows of %s", len(x), corpus)
    return heldout_evaluator(bundle, x, y, num_threads=num_threads)
