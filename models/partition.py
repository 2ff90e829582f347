"""One user's blocks -> that device's train/test windows, exactly as BENCHMARK.md says.

Split inside each user (block i goes to test when `i % 5 == 4`), each block one sequence
`<bos> ... <eos>`, cut into windows of `seq_len + 1` ids starting every `seq_len` ids, so every
id after `<bos>` is a target exactly once. Windows of all blocks are cut in one vectorised
gather, because a device (and the simulator, for hundreds of devices) does this at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.tokenizer import OOV, PAD, Vocabulary


def split_blocks(blocks: list[str], test_every: int = 5) -> tuple[list[str], list[str]]:
    """(train, test): block i goes to test when `i % test_every == test_every - 1`."""
    if test_every < 2:
        raise ValueError(f"test_every must be at least 2 (1 would put every block in test), got {test_every}")
    train = [b for i, b in enumerate(blocks) if i % test_every != test_every - 1]
    test = [b for i, b in enumerate(blocks) if i % test_every == test_every - 1]
    return train, test


def windows_of_sequences(sequences: Sequence[Sequence[int]], seq_len: int = 20) -> np.ndarray:
    """`make_windows` of every sequence, stacked in order: int32 [n, seq_len + 1].

    One gather for all sequences (no Python loop over windows), so cutting a whole corpus or
    a device's text store is cheap.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    width = seq_len + 1
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    # A sequence of length L has targets at 1..L-1, i.e. ceil((L-1)/seq_len) windows.
    counts = np.maximum(lengths - 1 + seq_len - 1, 0) // seq_len
    total = int(counts.sum())
    if total == 0:
        return np.zeros((0, width), dtype=np.int32)
    flat = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(lengths.sum()))
    starts_of_seq = np.cumsum(lengths) - lengths
    ends_of_seq = starts_of_seq + lengths
    seq_of_window = np.repeat(np.arange(len(sequences)), counts)
    first_window = np.cumsum(counts) - counts
    k = np.arange(total) - first_window[seq_of_window]
    idx = (starts_of_seq[seq_of_window] + k * seq_len)[:, None] + np.arange(width)[None, :]
    inside = idx < ends_of_seq[seq_of_window][:, None]
    windows = np.where(inside, flat[np.minimum(idx, len(flat) - 1)], PAD).astype(np.int32)
    has_target = (windows[:, 1:] != PAD).any(axis=1)
    return windows if has_target.all() else windows[has_target]


_windows_of = windows_of_sequences  # the name edge_client.text_windows imported first


def make_windows(seq_ids: Sequence[int], seq_len: int = 20) -> np.ndarray:
    """int32 [n, seq_len + 1]: window k holds ids `k*seq_len .. k*seq_len + seq_len`.

    The last window is right-padded with PAD; windows without a non-PAD target are dropped.
    """
    return windows_of_sequences([seq_ids], seq_len)


@dataclass
class DeviceData:
    """One device's examples: inputs x and next-word targets y, int32 [n, seq_len] each."""

    user: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def n_scored_test(self) -> int:
        """Test targets that count for accuracy: neither PAD nor OOV."""
        return count_scored(self.test_y)


def count_scored(y: np.ndarray) -> int:
    """Number of target positions that are neither PAD nor OOV."""
    return int(np.count_nonzero((y != PAD) & (y != OOV)))


def windows_to_xy(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (first seq_len ids) and targets (last seq_len ids) of windows."""
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def partition_user(blocks: list[str], vocab: Vocabulary, seq_len: int = 20, *, user: str = "",
                   test_every: int = 5) -> DeviceData:
    """Split `blocks`, encode each as `<bos> ... <eos>` and cut both splits into windows."""
    train, test = split_blocks(blocks, test_every)
    train_x, train_y = windows_to_xy(windows_of_sequences([vocab.encode_block(b) for b in train], seq_len))
    test_x, test_y = windows_to_xy(windows_of_sequences([vocab.encode_block(b) for b in test], seq_len))
    return DeviceData(user=user, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
