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
    """A fixed number of LiteRT interpreters of one bundle, leased one at a time."""

    def __init__(self, bundle: Bundle, size: int = 1, num_threads: int = 1) -> None:
        if size < 1:
            raise ValueError("interpreter pool size must be >= 1")
        self.bundle = bundle
        self.size = size
        self._free: queue.Queue[LiteRTModel] = queue.Queue()
        for _ in range(size):
            self._free.put(LiteRTModel(bundle, num_threads=num_threads))

    @contextlib.contextmanager
    def lease(self, timeout_s: float | None = None) -> Iterator[LiteRTModel]:
        try:
            model = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free interpreter within {timeout_s} s") from None
        try:
            yield model
        finally:
            self._free.put(model)


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
