"""From float updates to ring elements modulo 2^bits and back (see `SecAggParams`).

How it composes with the update codec: secure aggregation adds integers, so every device
must put its update on the SAME fixed-point grid; the codec's per-block scales (``q8``...)
differ between devices and cannot be summed. A device therefore runs its usual pipeline
first (clipping, sparsification, the codec's lossy round trip, error feedback) and quantizes
the DECODED result onto the announced grid, keeping ``update - dequantize(own ints)`` as
its error-feedback residual if it uses one. What travels is ``value_bytes`` per coordinate:
masked values are uniform, so zstd cannot shrink them. Two levers reduce the bytes:
fewer ``bits`` (16 halves the 32-bit message), and `shared_coordinates`: all devices of a
round send the same pseudo-random subset of coordinates (random-k with a seed the server
announces), so only ``keep`` values travel and the server scatters the sum back.

Error bound: stochastic rounding moves each value by less than one ``step`` and is
unbiased, so the dequantized sum of n updates is within ``n * step`` of the sum of the
clipped updates in every coordinate (`sum_error_bound`).
"""
from __future__ import annotations

import numpy as np

from protocol.secagg.params import SecAggParams
from protocol.secagg.prg import MaskExpander


def quantize(update: np.ndarray, params: SecAggParams, rng: np.random.Generator) -> np.ndarray:
    """The update as int64 in [-levels, levels]: clipped to +-value_range, stochastically rounded."""
    x = np.asarray(update)
    if x.ndim != 1 or x.shape[0] != params.dim or x.dtype.kind != "f":
        raise ValueError(f"update must be a 1-D float array of {params.dim} values, got {x.dtype}{x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("update holds NaN or infinite values; refuse it before secure aggregation")
    scaled = np.clip(x.astype(np.float64), -params.value_range, params.value_range)
    scaled /= params.step
    scaled += rng.random(params.dim)  # floor(t + u), u ~ U[0, 1): unbiased rounding of t
    out = np.floor(scaled).astype(np.int64)
    np.clip(out, -params.levels, params.levels, out=out)
    return out


def to_ring(values: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Signed integers as uint32 ring elements modulo 2^bits (two's complement)."""
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise ValueError(f"ring values must be integers, got {v.dtype}")
    return (v.astype(np.int64) & params.mask).astype(np.uint32)


def from_ring(ring: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Ring elements (uint32) read as signed int64 in [-2^(bits-1), 2^(bits-1))."""
    v = np.asarray(ring).astype(np.int64) & params.mask
    v[v >= (1 << (params.bits - 1))] -= params.modulus
    return v


def dequantize(int_values: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Integers (one device's, or a sum) back to float64 values: ``ints * step``."""
    return np.asarray(int_values, dtype=np.float64) * params.step


def sum_error_bound(n: int, params: SecAggParams) -> float:
    """Per-coordinate bound on |dequantized sum - sum of clipped updates| for n devices."""
    return n * params.step


def shared_coordinates(seed: bytes, dim: int, keep: int) -> np.ndarray:
    """The same ``keep`` sorted coordinates of ``dim`` for every device holding ``seed``.

    Public randomness (the server announces the seed in the clear). Deterministic across
    platforms and numpy versions: AES-CTR words as 64-bit sort keys, stable sort.
    """
    if not 1 <= keep <= dim:
        raise ValueError(f"keep must be in 1..{dim}, got {keep}")
    words = MaskExpander(2 * dim).words(bytes(seed)).astype(np.uint64)
    keys = (words[0::2] << np.uint64(32)) | words[1::2]
    chosen = np.argsort(keys, kind="stable")[:keep]
    chosen.sort()
    return chosen.astype(np.int64)


def with_indicator(ints: np.ndarray, flag: bool, params: SecAggParams) -> np.ndarray:
    """``ints`` with one more coordinate, ``flag * levels``: a 0/1 count that rides in the secure sum.

    For adaptive clipping under secure aggregation each device adds b = [norm <= clip];
    the round's params must then have ``dim = model size + 1``. Exact: levels is on the grid.
    """
    return np.concatenate([np.asarray(ints, dtype=np.int64), [params.levels if flag else 0]])


def split_indicator(int_sum: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """(the sum without its last coordinate, how many devices set their flag)."""
    total = int(int_sum[-1])
    if total % params.levels:
        raise ValueError(f"indicator sum {total} is not a multiple of {params.levels}: not a count")
    return int_sum[:-1], total // params.levels
