"""Top-1 / top-3 next-word accuracy as BENCHMARK.md defines it (numpy only).

Scored positions are targets that are neither PAD nor OOV; EOS counts. Counts
(not ratios) are returned so results of many devices or batches can be summed
into one micro average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # runtime pulls in ai-edge-litert; count_topk must not need it
    from models.runtime import LiteRTModel

__all__ = ["EvalResult", "count_topk", "evaluate"]

PAD_ID = 0
OOV_ID = 1
# Rows of scored positions ranked at once: bounds argpartition's int64 index
# array (8 bytes per logit) to about 10 MB for the reference vocabulary.
_RANK_ROWS = 256


@dataclass
class EvalResult:
    top1: float
    top3: float
    scored: int
    correct1: int
    correct3: int

    @classmethod
    def from_counts(cls, correct1: int, correct3: int, scored: int) -> "EvalResult":
        return cls(
            top1=correct1 / scored if scored else 0.0,
            top3=correct3 / scored if scored else 0.0,
            scored=scored,
            correct1=correct1,
            correct3=correct3,
        )


def count_topk(logits: np.ndarray, y: np.ndarray) -> tuple[int, int, int]:
    """(correct1, correct3, scored) for logits [..., V] against targets y [...].

    Only positions whose target is not PAD/OOV are ranked, a few hundred rows at
    a time, with argpartition (no full sort). A NaN logit row counts as wrong.
    """
    logits = np.asarray(logits)
    y = np.asarray(y)
    if logits.shape[:-1] != y.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {y.shape} (expected y.shape + (V,))")
    v = logits.shape[-1]
    if v < 3:
        raise ValueError(f"top-3 needs at least 3 classes, got {v}")
    flat = logits.reshape(-1, v)
    targets = y.reshape(-1)
    scored_idx = np.flatnonzero((targets != PAD_ID) & (targets != OOV_ID))
    correct1 = correct3 = 0
    for start in range(0, len(scored_idx), _RANK_ROWS):
        idx = scored_idx[start : start + _RANK_ROWS]
        rows = flat[idx]
        t = targets[idx][:, None]
        finite = np.isfinite(rows).all(axis=1)
        top3 = np.argpartition(rows, v - 3, axis=1)[:, v - 3 :]
        best = np.argmax(rows, axis=1)
        hit1 = (best == t[:, 0]) & finite
        hit3 = ((top3 == t).any(axis=1) & finite) | hit1  # ties: a top-1 hit is a top-3 hit
        correct1 += int(np.count_nonzero(hit1))
        correct3 += int(np.count_nonzero(hit3))
    return correct1, correct3, int(len(scored_idx))


def evaluate(model: "LiteRTModel", x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult:
    """Accuracy of `model` on windows (x, y), streamed.

    Logits are produced and counted one interpreter chunk at a time (the
    model's `infer_batch` rows), so memory stays bounded whatever `batch_size`;
    `batch_size` only sets how many windows are handed to the model at once.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c1 = c3 = scored = 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        yb = np.asarray(y[start : start + batch_size])
        for offset, logits in model.iter_logits(xb):
            a, b, n = count_topk(logits, yb[offset : offset + len(logits)])
            c1, c3, scored = c1 + a, c3 + b, scored + n
    return EvalResult.from_counts(c1, c3, scored)
