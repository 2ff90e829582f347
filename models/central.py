"""Centralized training of the reference model: the upper bound federated runs chase.

Same `CIFGModule` (same forward pass, same flat weight layout) as the training
bundle, so the result can be set into a bundle or a `LiteRTModel`; trained in
TensorFlow with Adam on all training windows pooled (BENCHMARK.md: Adam 1e-3,
batch 64 reaches top-3 0.1905 at epoch 19). Server side only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from models.cifg import CIFGModule, initial_weights, masked_cross_entropy
from models.config import ModelConfig
from models.evaluate import EvalResult, count_topk

__all__ = ["CentralResult", "train_central", "evaluate_module"]

logger = logging.getLogger(__name__)

_EVAL_BATCH = 256


@dataclass
class CentralResult:
    """per_epoch: dicts with epoch (1-based), train_loss, top1, top3, scored, wall_s."""

    per_epoch: list[dict]
    best_top3: float
    final_weights: np.ndarray
    wall_s: float
    best_epoch: int = field(default=0)
    stopped_by: str | None = None      # "SIGINT": Ctrl-C ended training early; per_epoch holds the epochs done


class _Adam:
    """Adam (Keras defaults: beta1 0.9, beta2 0.999, eps 1e-7) on a CIFGModule's variables."""

    def __init__(self, module: CIFGModule, lr: float) -> None:
        self.module = module
        self.lr = lr
        self.m = [tf.Variable(tf.zeros_like(w)) for w in module.weights]
        self.v = [tf.Variable(tf.zeros_like(w)) for w in module.weights]
        self.t = tf.Variable(0.0)
        t = module.config.seq_len
        ids = tf.TensorSpec([None, t], tf.int32)
        self.step = tf.function(self._step, input_signature=[ids, ids])

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        b1, b2, eps = 0.9, 0.999, 1e-7
        with tf.GradientTape() as tape:
            loss = masked_cross_entropy(self.module.logits(x), y, self.module.config.vocab_size)
        grads = tape.gradient(loss, self.module.weights)
        self.t.assign_add(1.0)
        alpha = self.lr * tf.sqrt(1.0 - b2**self.t) / (1.0 - b1**self.t)
        for w, g, m, v in zip(self.module.weights, grads, self.m, self.v):
            g = tf.convert_to_tensor(g)
            m.assign(b1 * m + (1.0 - b1) * g)
            v.assign(b2 * v + (1.0 - b2) * tf.square(g))
            w.assign_sub(alpha * m / (tf.sqrt(v) + eps))
        return loss


def evaluate_module(module: CIFGModule, x: np.ndarray, y: np.ndarray, batch_size: int = _EVAL_BATCH) -> EvalResult:
    """Top-1/top-3 of a TF module on windows, streamed in batches."""
    c1 = c3 = scored = 0
    for start in range(0, len(x), batch_size):
        logits = module.infer(tf.constant(x[start : start + batch_size], tf.int32))["logits"].numpy()
        a, b, n = count_topk(logits, y[start : start + batch_size])
        c1, c3, scored = c1 + a, c3 + b, scored + n
    return EvalResult.from_counts(c1, c3, scored)


def train_central(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    config: ModelConfig,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    output_prior: np.ndarray | None = None,
) -> CentralResult:
    """Train on pooled windows with Adam; evaluate on the test windows after every epoch.

    Starts from `initial_weights(config, seed, output_prior=...)`, the same start as the
    bundle a federated run exports; shuffles with numpy's generator seeded by `seed`. Ctrl-C
    ends training early: the result holds the epochs done and `stopped_by`.
    """
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("x and y must have the same number of windows")
    if len(train_x) == 0:
        raise ValueError("no training windows")
    start_time = time.perf_counter()
    module = CIFGModule(config, initial_weights(config, seed, output_prior=output_prior))
    adam = _Adam(module, lr)
    rng = np.random.default_rng(seed)
    train_x = np.asarray(train_x, np.int32)
    train_y = np.asarray(train_y, np.int32)
    per_epoch: list[dict] = []
    best_top3, best_epoch = -1.0, 0
    bar = tqdm(range(1, epochs + 1), desc="central", unit="epoch", disable=not progress)
    stopped_by = None
    try:
        for epoch in bar:
            order = rng.permutation(len(train_x))
            losses = []
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                losses.append(float(adam.step(tf.constant(train_x[idx]), tf.constant(train_y[idx]))))
            result = evaluate_module(module, test_x, test_y)
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "top1": result.top1,
                "top3": result.top3,
                "scored": result.scored,
                "wall_s": time.perf_counter() - start_time,
            }
            per_epoch.append(row)
            if result.top3 > best_top3:
                best_top3, best_epoch = result.top3, epoch
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{result.top1:.4f}", top3=f"{result.top3:.4f}")
            logger.info("central epoch %d: loss %.4f top1 %.4f top3 %.4f", epoch, row["train_loss"], result.top1, result.top3)
    except KeyboardInterrupt:  # Ctrl-C: stop after the epochs done; the caller keeps them (marked partial)
        stopped_by = "SIGINT"
        logger.warning("central training interrupted after %d of %d epochs", len(per_epoch), epochs)
    finally:
        bar.close()
    final = module.get_weights()["weights"].numpy()
    return CentralResult(
        per_epoch=per_epoch,
        best_top3=max(best_top3, 0.0),
        final_weights=final,
        wall_s=time.perf_counter() - start_time,
        best_epoch=best_epoch,
        stopped_by=stopped_by,
    )
