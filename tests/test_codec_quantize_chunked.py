"""The chunked qN encoder writes the very bytes of the whole-array computation it replaced.

The wire format is a contract with every deployed aggregator: the memory-saving encoder must
not change a single byte, coins of the stochastic rounding included.
"""
import numpy as np
import pytest

from protocol.codec import parse_codec
from protocol.codec.bitpack import pack_codes
from protocol.codec.container import ByteWriter
from protocol.codec.quantize import _CHUNK_VALUES, UniformQuantizer, block_view


def whole_array_encode(q: UniformQuantizer, values: np.ndarray, rng: np.random.Generator) -> bytes:
    """The former encoder: one padded float32 copy of the vector, coins drawn all at once."""
    t = block_view(values, q.block)
    t = t.copy() if np.shares_memory(t, values) else t
    lo, step = q.scales(t)
    t -= lo[:, None]
    t /= np.where(step > 0, step, np.float32(1.0))[:, None]
    if q.deterministic:
        t += np.float32(0.5)
    np.minimum(t, np.float32(q.levels), out=t)
    codes = t.astype(np.uint8)
    if not q.deterministic:
        t -= codes
        codes += np.less(rng.random(t.shape, dtype=np.float32), t)
    return (np.ascontiguousarray(lo, "<f4").tobytes() + np.ascontiguousarray(step, "<f4").tobytes()
            + pack_codes(codes.reshape(-1)[:values.size], q.bits))


@pytest.mark.parametrize("spec", ["q8", "q4", "q2:det", "q1:det", "q8:block=100", "q4:block=70000", "q2:block=1"])
@pytest.mark.parametrize("n", [1, 255, 257, _CHUNK_VALUES, _CHUNK_VALUES + 1, 3 * _CHUNK_VALUES + 1000])
def test_chunked_encoder_is_byte_identical_to_the_whole_array_one(spec, n):
    q = parse_codec(spec)._values
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0], n)).astype(np.float32)
    values[: min(n, 300)] = values[0]  # a constant block: step 0
    out = ByteWriter()
    q.encode(values, out, np.random.default_rng(5))
    assert out.getvalue() == whole_array_encode(q, values, np.random.default_rng(5))
