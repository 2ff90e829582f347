"""Which coordinates travel: all (`DenseLayout`), the largest (`topk`) or a random set (`randk`).

`topk:F` keeps the k coordinates of largest |x|, k = ceil(F * n) for a fraction 0 < F < 1 or
k = F for an integer count F >= 1 (at most n); indices travel as gaps or a bitmap
(indices.py). Decoding is exact on the kept coordinates and zero elsewhere.

`randk:F` keeps k coordinates drawn uniformly without replacement from a 64-bit seed that
travels in the payload (8 bytes) instead of the indices. With `unbiased` the decoder scales
the values by n / k so that E[decode] = x over the seed. The draw uses our own SplitMix64
counter generator, not numpy's Generator methods, whose streams may change between numpy
versions: device and server must agree on the indices bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from protocol.codec.container import ByteReader, ByteWriter
from protocol.codec.indices import max_index_bytes, read_indices, write_indices
from protocol.codec.stages import Layout, format_number

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def keep_count(amount: float, n: int) -> int:
    """k for `topk:amount` / `randk:amount` on n coordinates."""
    if amount >= 1:
        return min(int(amount), n)
    return min(n, max(1, math.ceil(amount * n))) if n else 0


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Outputs start .. start+count-1 of SplitMix64 seeded with `seed` (uint64 array)."""
    counter = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + counter * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def random_subset(seed: int, n: int, k: int) -> np.ndarray:
    """k distinct indices of [0, n), uniform over all k-subsets, sorted (int64).

    Draws uniform indices in sequence and keeps the first k distinct ones (sequential
    sampling with rejection of repeats = a uniform k-subset). For k > n/2 it draws the
    n - k indices to leave out instead, so the number of draws stays below 1.4 k.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if 2 * k > n:
        keep = np.ones(n, dtype=bool)
        keep[random_subset(seed, n, n - k)] = False
        return np.flatnonzero(keep)
    # expected draws for k distinct out of n: -n ln(1 - k/n); ask for a little more
    batch = int(-n * math.log1p(-k / n) * 1.05) + 64
    drawn = np.zeros(0, dtype=np.int64)
    while True:
        fresh = (splitmix64(seed, drawn.size, batch) % np.uint64(n)).astype(np.int64)
        drawn = np.concatenate([drawn, fresh])
        chosen = first_distinct(drawn, n, k)
        if chosen is not None:
            return chosen
        batch = max(64, batch // 4)


def first_distinct(drawn: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """The first k distinct values of `drawn` (in draw order), sorted; None if there are fewer.

    Sorting (value, position) packed in one int64 is several times faster than the stable
    argsort behind np.unique(return_index=True); the result is the same.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    pos_bits = max(1, drawn.size.bit_length())
    if n.bit_length() + pos_bits > 62:
        values, first = np.unique(drawn, return_index=True)
    else:
        keys = np.sort((drawn << pos_bits) | np.arange(drawn.size, dtype=np.int64))
        sorted_values = keys >> pos_bits
        starts = np.empty(keys.size, dtype=bool)
        starts[:1] = True
        np.not_equal(sorted_values[1:], sorted_values[:-1], out=starts[1:])
        values = sorted_values[starts]
        first = keys[starts] & ((1 << pos_bits) - 1)
    if values.size < k:
        return None
    if values.size == k:
        return values
    cutoff = np.partition(first, k - 1)[k - 1]  # positions are distinct: exactly k are <= cutoff
    return values[first <= cutoff]


class DenseLayout(Layout):
    """Every coordinate travels, in order; writes nothing. Implicit when no sparsifier is given."""

    lossless = True

    @property
    def spec(self) -> str:
        return ""

    def count(self, n: int) -> int:
        return n

    def encode(self, vec: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> np.ndarray:
        return vec

    def decode(self, reader: ByteReader, n: int) -> tuple[np.ndarray | None, float]:
        return None, 1.0

    def max_section_bytes(self, n: int) -> int:
        return 0


class TopK(Layout):
    def __init__(self, amount: float) -> None:
        self.amount = amount

    @property
    def spec(self) -> str:
        return f"topk:{format_number(self.amount)}"

    def count(self, n: int) -> int:
        return keep_count(self.amount, n)

    def encode(self, vec: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> np.ndarray:
        n = vec.size
        k = self.count(n)
        if k == n:
            indices = np.arange(n, dtype=np.int64)
        else:
            indices = np.sort(np.argpartition(np.abs(vec), n - k)[n - k:])
        write_indices(indices, n, out)
        return vec[indices]

    def decode(self, reader: ByteReader, n: int) -> tuple[np.ndarray | None, float]:
        return read_indices(reader, n, self.count(n)), 1.0

    def max_section_bytes(self, n: int) -> int:
        return max_index_bytes(n, self.count(n))


class RandK(Layout):
    def __init__(self, amount: float, unbiased: bool = False) -> None:
        self.amount = amount
        self.unbiased = unbiased
        self.ef_safe = not unbiased  # the n/k rescaling overshoots: not a contraction

    @property
    def spec(self) -> str:
        return f"randk:{format_number(self.amount)}" + (",unbiased" if self.unbiased else "")

    def count(self, n: int) -> int:
        return keep_count(self.amount, n)

    def encode(self, vec: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> np.ndarray:
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        out.array(np.array([seed], dtype=np.uint64), "<u8")
        return vec[random_subset(seed, vec.size, self.count(vec.size))]

    def decode(self, reader: ByteReader, n: int) -> tuple[np.ndarray | None, float]:
        seed = int(reader.array("<u8", 1, "randk seed")[0])
        k = self.count(n)
        factor = n / k if (self.unbiased and k) else 1.0
        return random_subset(seed, n, k), factor

    def max_section_bytes(self, n: int) -> int:
        return 8
