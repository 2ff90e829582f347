"""Local training of one round through the TFLite runtime (no TensorFlow).

A device trains on its own windows, starting from the global weights, and hands back the new
weights. Interpreters are leased from a small pool: a phone has one, the simulator has one
per core, so memory is bounded by the pool, not by the number of devices.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.bundle import Bundle
from models.runtime import LiteRTModel, TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The part of a round plan that shapes local training."""

    epochs: int = 1
    lr: float = 1.0
    mu: float = 0.0
    clip: float = 5.0   # gradient clipping, global L2 norm per step; 0 = off
    max_steps: int = 0  # 0 = no cap


@dataclass(frozen=True)
class LocalResult:
    weights: np.ndarray
    result: TrainResult
    train_s: float


class InterpreterPool:
    """A fixed number of LiteRT interpreters of one bundle, leased one at a time.

    `keep_idle=True` (the simulator: many devices share few interpreters) creates them all
    now and keeps them. `keep_idle=False` (a real device, which trains a few minutes an hour)
    creates an interpreter when a lease starts and frees it when the lease ends: its arenas
    and variables (about 65 MB for the reference model) are held only while training, and
    whatever follows the training (delta, encoding, publishing) does not add to that peak.
    `after_release` runs after such a free (e.g. glibc's malloc_trim, see edge_client.app).
    """

    def __init__(self, bundle: Bundle, size: int = 1, num_threads: int = 1, *, keep_idle: bool = True,
                 after_release: Callable[[], object] | None = None) -> None:
        if size < 1:
            raise ValueError("interpreter pool size must be >= 1")
        self.bundle = bundle
        self.size = size
        self.num_threads = num_threads
        self.keep_idle = keep_idle
        self._after_release = after_release
        # a slot holds an idle interpreter, or None where one is to be created on lease
        self._free: queue.Queue[LiteRTModel | None] = queue.Queue()
        for _ in range(size):
            self._free.put(LiteRTModel(bundle, num_threads=num_threads) if keep_idle else None)
        if not keep_idle:  # a bundle the runtime cannot load fails here, not at the first round
            LiteRTModel(bundle, num_threads=num_threads).close()
            if after_release is not None:
                after_release()

    @contextlib.contextmanager
    def lease(self, timeout_s: float | None = None) -> Iterator[LiteRTModel]:
        try:
            model = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free interpreter within {timeout_s} s") from None
        if model is None:
            try:
                model = LiteRTModel(self.bundle, num_threads=self.num_threads)
            except BaseException:
                self._free.put(None)
                raise
        try:
            yield model
        finally:
            if self.keep_idle:
                self._free.put(model)
            else:
                model.close()  # frees the interpreter even while the caller still holds `model`
                del model
                self._free.put(None)
                if self._after_release is not None:
                    self._after_release()


class WindowSource(Protocol):
    """Where a device's training windows come from (its partition, or its text store)."""

    def training_windows(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class ArrayWindows:
    """Fixed windows held in memory (the simulator's partitions)."""

    x: np.ndarray
    y: np.ndarray

    def training_windows(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x, self.y


def train_round(
    pool: InterpreterPool,
    weights: np.ndarray,
    windows: tuple[np.ndarray, np.ndarray],
    settings: TrainSettings,
    *,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> LocalResult:
    """Train from `weights` on `windows`; the caller decides what to do if `stopped`."""
    x, y = windows
    rng = np.random.default_rng(seed)
    with pool.lease() as model:
        start = time.perf_counter()
        model.set_weights(weights)
        if settings.mu > 0:
            model.set_anchor(weights)
        result = model.train(
            x, y, epochs=settings.epochs, lr=settings.lr, rng=rng, mu=settings.mu, clip=settings.clip,
            should_stop=should_stop, max_steps=settings.max_steps or None,
        )
        new_weights = model.get_weights()
        elapsed = time.perf_counter() - start
    return LocalResult(new_weights, result, elapsed)
