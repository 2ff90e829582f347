"""A federated task: a corpus turned into one vocabulary and per-device train/test windows.

Everything downstream (simulator, benchmark, central baseline, evaluation) starts from a
`Task`, so the split, the vocabulary and the counts of BENCHMARK.md are computed in one place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.corpus import Corpus
from models.partition import DeviceData, count_scored, partition_user, split_blocks
from models.tokenizer import Vocabulary, build_vocabulary

log = logging.getLogger(__name__)


@dataclass
class Task:
    """The vocabulary and every device's windows; `devices` keeps the corpus's user order."""

    corpus_name: str
    vocab: Vocabulary
    devices: dict[str, DeviceData]
    seq_len: int

    def _pooled(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        xs = [getattr(d, f"{part}_x") for d in self.devices.values()]
        ys = [getattr(d, f"{part}_y") for d in self.devices.values()]
        if not xs:
            empty = np.zeros((0, self.seq_len), dtype=np.int32)
            return empty, empty.copy()
        return np.concatenate(xs), np.concatenate(ys)

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """All devices' training windows together (for centralized baselines)."""
        return self._pooled("train")

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        """All devices' test windows together: the benchmark's test set."""
        return self._pooled("test")

    def target_counts(self) -> np.ndarray:
        """How often each id is a training target (PAD never counts): the unigram prior."""
        counts = np.zeros(self.vocab.size, dtype=np.int64)
        for data in self.devices.values():
            counts += np.bincount(data.train_y.ravel(), minlength=self.vocab.size)[: self.vocab.size]
        counts[0] = 0
        return counts

    def n_scored_test(self) -> int:
        """Test target positions that count (neither PAD nor OOV), over all devices."""
        return sum(count_scored(d.test_y) for d in self.devices.values())

    @property
    def n_train(self) -> int:
        return sum(d.n_train for d in self.devices.values())

    @property
    def n_test(self) -> int:
        return sum(d.n_test for d in self.devices.values())


def build_task(corpus: Corpus, *, vocab_size: int = 5000, seq_len: int = 20,
               vocab: Vocabulary | None = None) -> Task:
    """Split every user, build the vocabulary from all TRAIN blocks (unless given), cut windows.

    Users left with no window at all are dropped (and logged): a device with nothing to train
    on or score is no device.
    """
    if vocab is None:
        vocab = build_vocabulary(
            (b for blocks in corpus.users.values() for b in split_blocks(blocks)[0]), size=vocab_size)
    devices: dict[str, DeviceData] = {}
    dropped = []
    for user, blocks in corpus.users.items():
        data = partition_user(blocks, vocab, seq_len, user=user)
        if data.n_train + data.n_test == 0:
            dropped.append(user)
            continue
        devices[user] = data
    if dropped:
        log.info("task %s: dropped %d users with no windows: %s", corpus.name, len(dropped),
                 ", ".join(map(repr, dropped[:10])) + (" ..." if len(dropped) > 10 else ""))
    task = Task(corpus_name=corpus.name, vocab=vocab, devices=devices, seq_len=seq_len)
    log.info("task %s: %d devices, vocabulary %d, %d train / %d test windows, %d scored test positions",
             corpus.name, len(devices), vocab.size, task.n_train, task.n_test, task.n_scored_test())
    return task
