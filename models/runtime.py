"""Train and run a training bundle with ai-edge-litert, without TensorFlow.

This is what a device runs: the bundle's `train` signature does one SGD step
inside the TFLite interpreter, weights move in and out as one flat float32
vector. Signature runners are created once and reused; the fixed-size train
buffers are preallocated so a step copies nothing it does not have to.

The interpreter is not thread-safe: use one `LiteRTModel` per thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from models.bundle import Bundle
from models.config import ModelConfig
from models.signature_runner import SignatureCall

__all__ = ["InferenceModel", "LiteRTModel", "TrainResult", "top_k_from_logits"]

logger = logging.getLogger(__name__)

PAD_ID = 0
# Rows per `infer` invocation: bounds the interpreter's arena (the logits of 32
# windows of the reference model are 12.8 MB) whatever batch the caller passes.
DEFAULT_INFER_BATCH = 32


@dataclass
class TrainResult:
    """What a local training run did. Losses are NaN when no step ran."""

    steps: int
    examples: int
    mean_loss: float
    first_loss: float
    last_loss: float
    stopped: bool


def top_k_from_logits(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits along the last axis, best first (argpartition, no full sort)."""
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in 1..{v}, got {k}")
    part = np.argpartition(logits, v - k, axis=-1)[..., v - k :]
    order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _as_ids(name: str, a: np.ndarray, seq_len: int, vocab_size: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != seq_len:
        raise ValueError(f"{name} must have shape (n, {seq_len}), got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside 0..{vocab_size - 1} (min {a.min()}, max {a.max()}); "
            "was it tokenized with this bundle's vocabulary?"
        )
    return np.ascontiguousarray(a, dtype=np.int32)


def _closed_runner(**kwargs: object) -> dict:
    raise RuntimeError("this LiteRTModel was closed (its interpreter is freed); create a new one")


class _Predictor:
    """Chunked `infer` shared by the training model and the int8 inference model."""

    def __init__(self, infer_runner, seq_len: int, vocab_size: int, infer_batch: int) -> None:
        if infer_batch < 1:
            raise ValueError(f"infer_batch must be >= 1, got {infer_batch}")
        self._infer = infer_runner
        self._seq_len = seq_len
        self._vocab_size = vocab_size
        self.infer_batch = infer_batch

    def iter_logits(self, x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, logits float32[rows, T, V]) chunk by chunk: memory stays small."""
        x = _as_ids("x", x, self._seq_len, self._vocab_size)
        for start in range(0, len(x), self.infer_batch):
            yield start, self._infer(x=x[start : start + self.infer_batch])["logits"]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits float32[n, T, V] for windows x int32[n, T]."""
        x = _as_ids("x", x, self._seq_len, self._vocab_size)
        out = np.empty((len(x), self._seq_len, self._vocab_size), np.float32)
        for start, chunk in self.iter_logits(x):
            out[start : start + len(chunk)] = chunk
        return out

    def top_k(self, x: np.ndarray, k: int = 3) -> np.ndarray:
        """The k most likely next ids at every position, best first: int64[n, T, k]."""
        x = _as_ids("x", x, self._seq_len, self._vocab_size)
        out = np.empty((len(x), self._seq_len, k), np.int64)
        for start, chunk in self.iter_logits(x):
            out[start : start + len(chunk)] = top_k_from_logits(chunk, k)
        return out


class LiteRTModel(_Predictor):
    """A bundle loaded into ai-edge-litert: SGD/FedProx training and inference."""

    def __init__(self, bundle: Bundle, num_threads: int = 1, infer_batch: int = DEFAULT_INFER_BATCH) -> None:
        self.bundle = bundle
        self.config: ModelConfig = bundle.config
        self.dim: int = bundle.param_count
        self._interpreter = Interpreter(model_content=bundle.tflite, num_threads=num_threads)
        signatures = self._interpreter.get_signature_list()
        needed = ("train", "infer", "get_weights", "set_weights", "set_anchor")
        missing = [s for s in needed if s not in signatures]
        if missing:
            raise ValueError(f"bundle {bundle.model_id} lacks signature(s) {missing}; re-export it")
        def runner(key: str) -> SignatureCall:
            return SignatureCall(self._interpreter, key)

        super().__init__(runner("infer"), self.config.seq_len, self.config.vocab_size, infer_batch)
        self._train = runner("train")
        self._get = runner("get_weights")
        self._set = runner("set_weights")
        self._set_anchor = runner("set_anchor")
        b, t = self.config.batch_size, self.config.seq_len
        self._x_buf = np.zeros((b, t), np.int32)
        self._y_buf = np.zeros((b, t), np.int32)
        # The graph's variables are exported as zeros: the bundle's weights are the start.
        self.set_weights(bundle.initial_weights)
        # The FedProx anchor is set on first need (mu > 0): every signature that runs keeps an
        # arena of its own, and set_anchor's holds a full weight vector (3 MB for the reference
        # model) that a plain FedAvg device never needs.
        self._anchor_set = False

    # ------------------------------------------------------------ lifetime
    @property
    def closed(self) -> bool:
        return self._interpreter is None

    def close(self) -> None:
        """Free the interpreter now: its arenas (about 50 MB for the reference model's training
        step) and variables go back to the allocator, whoever still holds this object.

        A device that trains once every few minutes keeps nothing between rounds this way;
        any later call raises RuntimeError. Closing twice is harmless.
        """
        self._interpreter = None
        self._infer = self._train = self._get = self._set = self._set_anchor = _closed_runner

    # ------------------------------------------------------------ weights
    def _check_flat(self, w: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.shape != (self.dim,):
            raise ValueError(
                f"{what} needs a float32 vector of shape ({self.dim},), got "
                f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', '')}"
            )
        if not np.isfinite(w).all():
            raise ValueError(f"{what}: the weight vector contains NaN or infinity")
        return np.ascontiguousarray(w)

    def get_weights(self) -> np.ndarray:
        """A copy of the current weights, float32[P]."""
        return self._get()["weights"]  # the runner returns a fresh array

    def set_weights(self, w: np.ndarray) -> None:
        self._set(weights=self._check_flat(w, "set_weights"))

    def set_anchor(self, w: np.ndarray) -> None:
        """The FedProx anchor (the round's global weights) that `mu` pulls towards.

        Until it is set, the anchor is the bundle's initial weights (set when a step first
        needs it, i.e. with mu > 0).
        """
        self._set_anchor(weights=self._check_flat(w, "set_anchor"))
        self._anchor_set = True

    # ----------------------------------------------------------- training
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0, clip: float = 0.0) -> float:
        """One SGD step on up to `batch_size` windows; returns the loss before the step.

        Fewer rows are padded with PAD rows, which the loss ignores, so the step is
        exactly the step on the unpadded rows.
        """
        b, t, v = self.config.batch_size, self.config.seq_len, self.config.vocab_size
        x = _as_ids("x", x, t, v)
        y = _as_ids("y", y, t, v)
        n = len(x)
        if len(y) != n or not 1 <= n <= b:
            raise ValueError(f"train_step needs 1..{b} rows in x and y alike, got {len(x)} and {len(y)}")
        if n < b:
            self._x_buf[:n] = x
            self._x_buf[n:] = PAD_ID
            self._y_buf[:n] = y
            self._y_buf[n:] = PAD_ID
            x, y = self._x_buf, self._y_buf
        if mu and not self._anchor_set:
            self.set_anchor(self.bundle.initial_weights)
        out = self._train(x=x, y=y, lr=np.float32(lr), mu=np.float32(mu), clip=np.float32(clip))
        return float(out["loss"])

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        rng: np.random.Generator,
        mu: float = 0.0,
        clip: float = 0.0,
        should_stop: Callable[[], bool] | None = None,
        max_steps: int | None = None,
    ) -> TrainResult:
        """Local training: `epochs` shuffled passes of minibatches of `batch_size`.

        `should_stop()` is asked before every step (battery, user activity,
        deadline); when it says yes the run ends with `stopped=True` and the
        weights trained so far. `max_steps` caps the steps (not a stop).
        """
        t, v = self.config.seq_len, self.config.vocab_size
        x = _as_ids("x", x, t, v)
        y = _as_ids("y", y, t, v)
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        b = self.config.batch_size
        losses: list[float] = []
        examples = 0
        stopped = False
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), b):
                if max_steps is not None and len(losses) >= max_steps:
                    break
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                idx = order[start : start + b]
                losses.append(self.train_step(x[idx], y[idx], lr, mu, clip))
                examples += len(idx)
            if stopped or (max_steps is not None and len(losses) >= max_steps):
                break
        if losses and not math.isfinite(losses[-1]):
            logger.warning("local training diverged: last loss %s (lr=%s)", losses[-1], lr)
        nan = float("nan")
        return TrainResult(
            steps=len(losses),
            examples=examples,
            mean_loss=float(np.mean(losses)) if losses else nan,
            first_loss=losses[0] if losses else nan,
            last_loss=losses[-1] if losses else nan,
            stopped=stopped,
        )


class InferenceModel(_Predictor):
    """An inference-only TFLite model (e.g. `export_int8_inference`) for suggestions."""

    def __init__(self, tflite: bytes, config: ModelConfig, num_threads: int = 1,
                 infer_batch: int = DEFAULT_INFER_BATCH) -> None:
        self.config = config
        self._interpreter = Interpreter(model_content=tflite, num_threads=num_threads)
        if "infer" not in self._interpreter.get_signature_list():
            raise ValueError("inference model has no 'infer' signature")
        super().__init__(SignatureCall(self._interpreter, "infer"), config.seq_len,
                         config.vocab_size, infer_batch)
