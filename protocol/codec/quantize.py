"""Uniform quantization to 1, 2, 4 or 8 bits with a (min, step) pair per block: `qN`.

Each block of `block` consecutive values (default 256; the last block may be shorter) gets
`lo` = its minimum and `step` = (max - min) / (2**bits - 1), both stored as float32 (8 bytes a
block: 0.25 bits per parameter at block 256). A value x becomes the code
c = (x - lo) / step rounded to an integer in [0, 2**bits - 1] and decodes as lo + c * step.

Rounding is STOCHASTIC by default: c = floor(t) + 1 with probability t - floor(t), which makes
the decoder unbiased, E[decode(x)] = x (up to float32 rounding). `det` rounds to nearest
instead: smaller error per message, but biased.

Error bound per value: |decode(x) - x| <= step of its block (stochastic), <= step / 2 (det),
plus float32 rounding of a few ulp of max(|lo|, |x|). Codes are bit-packed (bitpack.py).
"""
from __future__ import annotations

import numpy as np

from protocol.codec.bitpack import pack_codes, packed_size, unpack_codes
from protocol.codec.container import ByteReader, ByteWriter, bad_payload, check_peak
from protocol.codec.stages import ValueCoder

DEFAULT_BLOCK = 256
_CHUNK_VALUES = 1 << 16  # values quantized per step of the encoder (256 kB of float32 scratch)


def block_view(values: np.ndarray, block: int) -> np.ndarray:
    """`values` as (blocks, block) rows; a short last block is padded with its last value,
    which leaves the block's min and max unchanged (callers that average must not count it)."""
    count = values.size
    nblocks = -(-count // block)
    pad = nblocks * block - count
    if pad:
        values = np.concatenate([values, np.full(pad, values[-1], dtype=values.dtype)])
    return values.reshape(nblocks, block)


def expand_blocks(codes: np.ndarray, per_block_a: np.ndarray, per_block_b: np.ndarray | None,
                  block: int) -> np.ndarray:
    """codes * a[block] (+ b[block]) as a new float32 array, without materialising repeats."""
    count = codes.size
    result = np.empty(count, dtype=np.float32)
    full = count // block
    head = full * block
    if full:
        rows = result[:head].reshape(full, block)
        np.multiply(codes[:head].reshape(full, block), per_block_a[:full, None], out=rows)
        if per_block_b is not None:
            rows += per_block_b[:full, None]
    if head < count:
        tail = result[head:]
        np.multiply(codes[head:], per_block_a[full], out=tail)
        if per_block_b is not None:
            tail += per_block_b[full]
    return result


class UniformQuantizer(ValueCoder):
    def __init__(self, bits: int, block: int = DEFAULT_BLOCK, deterministic: bool = False) -> None:
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
        self.bits = bits
        self.block = block
        self.deterministic = deterministic
        self.levels = (1 << bits) - 1
        # 1-bit stochastic rounding picks the far end of a block half the time: not a contraction
        self.ef_safe = not (bits == 1 and not deterministic)

    @property
    def spec(self) -> str:
        options = []
        if self.block != DEFAULT_BLOCK:
            options.append(f"block={self.block}")
        if self.deterministic:
            options.append("det")
        return f"q{self.bits}" + (":" + ",".join(options) if options else "")

    def scales(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, step) per block, float32, with lo + levels * step >= the block max."""
        return self._scales(blocks.min(axis=1), blocks.max(axis=1))

    def _scales(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = ((hi.astype(np.float64) - lo) / self.levels).astype(np.float32)
        for _ in range(4):  # float32 rounding may leave the top of the grid just below hi
            short = (lo + step * np.float32(self.levels)) < hi
            if not short.any():
                break
            step[short] = np.nextafter(step[short], np.float32(np.inf))
        return lo, step

    def _block_extremes(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-block (min, max) of `values` read in place (no padded copy of the vector)."""
        full = values.size // self.block
        rows = values[:full * self.block].reshape(full, self.block)
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        if full * self.block < values.size:
            tail = values[full * self.block:]
            lo = np.append(lo, tail.min())
            hi = np.append(hi, tail.max())
        return lo, hi

    def encode(self, values: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> None:
        if values.size == 0:
            return
        # Block rows are quantized a chunk at a time in one small float32 scratch buffer, so a
        # 781K-value update costs its uint8 codes and ~0.5 MB more, not several float copies of
        # itself. Every value, and every coin of the stochastic rounding (drawn in the same order,
        # a padded last block included), is what the whole-array computation gives: the bytes
        # are identical.
        block, count = self.block, values.size
        nblocks = -(-count // block)
        full = count // block
        lo, step = self._scales(*self._block_extremes(values))
        divisor = np.where(step > 0, step, np.float32(1.0))
        codes = np.empty(nblocks * block, dtype=np.uint8)
        rows_per_chunk = max(1, _CHUNK_VALUES // block)
        scratch = np.empty((min(rows_per_chunk, nblocks), block), dtype=np.float32)
        for r0 in range(0, nblocks, rows_per_chunk):
            r1 = min(nblocks, r0 + rows_per_chunk)
            t = scratch[:r1 - r0]
            whole = min(r1, full) - r0  # rows of this chunk that are full blocks
            if whole > 0:
                t[:whole] = values[r0 * block:(r0 + whole) * block].reshape(whole, block)
            if r1 > full:  # the short last block, padded with its last value (block_view's rule)
                tail = values[full * block:]
                t[-1, :tail.size] = tail
                t[-1, tail.size:] = values[-1]
            t -= lo[r0:r1, None]  # >= 0: lo is the block minimum
            t /= divisor[r0:r1, None]
            if self.deterministic:
                t += np.float32(0.5)
            np.minimum(t, np.float32(self.levels), out=t)
            chunk_codes = codes[r0 * block:r1 * block].reshape(r1 - r0, block)
            chunk_codes[...] = t  # truncation = floor for t >= 0
            if not self.deterministic:
                t -= chunk_codes  # the fraction: round up with exactly this probability (0 at the top code)
                coin = rng.random(t.shape, dtype=np.float32)
                chunk_codes += np.less(coin, t)
        out.array(lo, "<f4")
        out.array(step, "<f4")
        out.write(pack_codes(codes[:count], self.bits))

    def decode(self, reader: ByteReader, count: int, scale: float = 1.0) -> np.ndarray:
        nblocks = -(-count // self.block)
        lo = reader.array("<f4", nblocks, "quantizer block minimums")
        step = reader.array("<f4", nblocks, "quantizer block steps")
        packed = reader.array("u1", packed_size(count, self.bits), f"{self.bits}-bit codes")
        if nblocks:
            # finiteness first: casting a signalling NaN would raise a numpy warning
            if not (np.isfinite(lo).all() and np.isfinite(step).all() and step.min() >= 0):
                raise bad_payload("quantizer block scales are negative or not finite")
            top = np.abs(lo.astype(np.float64)) + step.astype(np.float64) * self.levels
            check_peak(float(top.max()), scale, "quantizer block scales")
        codes = unpack_codes(packed, self.bits, count)
        if scale != 1.0:
            lo = lo * np.float32(scale)
            step = step * np.float32(scale)
        return expand_blocks(codes, step, lo, self.block)

    def max_section_bytes(self, count: int) -> int:
        return 8 * -(-count // self.block) + packed_size(count, self.bits)
