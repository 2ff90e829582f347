"""1-bit sign compression with one magnitude per block: `sign` (signSGD with scale).

Each block of `block` values (default 256) sends one bit per value (x >= 0 -> +, else -)
and one float32 scale, the block's mean |x|, so a value decodes as sign(x) * mean|x|
(1.125 bits per parameter at block 256). The mean keeps each block's L1 norm exactly.
It is biased: pair it with `ef` (EF-signSGD), which carries what the sign dropped to the
next round.
"""
from __future__ import annotations

import numpy as np

from protocol.codec.bitpack import pack_codes, packed_size, unpack_codes
from protocol.codec.container import ByteReader, ByteWriter, bad_payload, check_peak
from protocol.codec.quantize import DEFAULT_BLOCK, expand_blocks
from protocol.codec.stages import ValueCoder


class SignCoder(ValueCoder):
    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        self.block = block

    @property
    def spec(self) -> str:
        return "sign" if self.block == DEFAULT_BLOCK else f"sign:block={self.block}"

    def block_scales(self, values: np.ndarray) -> np.ndarray:
        """Mean |x| of each block (the last block averaged over its real length)."""
        count = values.size
        nblocks = -(-count // self.block)
        padded = np.zeros(nblocks * self.block, dtype=np.float64)
        padded[:count] = np.abs(values)
        sums = padded.reshape(nblocks, self.block).sum(axis=1)
        lengths = np.full(nblocks, self.block, dtype=np.float64)
        lengths[-1] = count - (nblocks - 1) * self.block
        return (sums / lengths).astype(np.float32)

    def encode(self, values: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> None:
        if values.size == 0:
            return
        out.array(self.block_scales(values), "<f4")
        out.write(pack_codes((values >= 0).astype(np.uint8), 1))

    def decode(self, reader: ByteReader, count: int, scale: float = 1.0) -> np.ndarray:
        nblocks = -(-count // self.block)
        magnitudes = reader.array("<f4", nblocks, "sign block scales")
        packed = reader.array("u1", packed_size(count, 1), "sign bits")
        if nblocks:
            if not (np.isfinite(magnitudes).all() and magnitudes.min() >= 0):
                raise bad_payload("sign block scales are negative or not finite")
            check_peak(float(magnitudes.max()), scale, "sign block scales")
        bits = unpack_codes(packed, 1, count)
        signs = bits.astype(np.float32)
        signs *= 2
        signs -= 1
        if scale != 1.0:
            magnitudes = magnitudes * np.float32(scale)
        return expand_blocks(signs, magnitudes, None, self.block)

    def max_section_bytes(self, count: int) -> int:
        return 4 * -(-count // self.block) + packed_size(count, 1)
