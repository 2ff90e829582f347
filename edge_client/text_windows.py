"""Training windows from the device's text store, cut exactly as the benchmark cuts them.

Each stored text (a message the user typed) is one block `<bos> w1 ... wn <eos>`, tokenized
with the bundle's own vocabulary and cut by `models.partition` into windows of seq_len + 1
ids, so what a device trains on has the same shape and meaning as what the simulator and
the benchmark train on. Reading (decrypting) and tokenizing tens of thousands of texts costs
real time on a Pi, and the client asks for the windows at every check-in, so the result is
cached until the store's generation (bumped by every add and delete, retention included) moves.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from edge_client.textstore import TextStore
from models.partition import _windows_of, windows_to_xy
from models.tokenizer import Vocabulary

log = logging.getLogger(__name__)


class StoreWindows:
    """The WindowSource of a real device: `training_windows()` over a TextStore.

    The cache key is the store's generation (`TextStore.generation()`, after retention): one
    small transaction on a hit; the texts are read, decrypted, tokenized and cut only on a miss.
    """

    def __init__(self, store: TextStore, vocab: Vocabulary, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.vocab = vocab
        self.seq_len = seq_len
        self._lock = threading.Lock()
        self._key: int | None = None
        self._xy: tuple[np.ndarray, np.ndarray] = (np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32))

    def training_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int32[n, seq_len]: inputs and next-word targets of every stored text."""
        with self._lock:
            key = self.store.generation()
            if key == self._key:
                return self._xy
            texts = self.store.texts()
            windows = _windows_of([self.vocab.encode_block(text) for text in texts], self.seq_len)
            x, y = windows_to_xy(windows)
            x.setflags(write=False)
            y.setflags(write=False)
            self._key, self._xy = key, (x, y)
        log.debug("text windows: %d texts -> %d windows", len(texts), len(x))
        return x, y
