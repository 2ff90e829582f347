import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.secagg.prg import MaskExpander, expand_mask


def test_mask_is_the_aes_256_ctr_keystream_read_as_little_endian_words():
    seed = bytes(range(32))
    ks = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(40))
    assert expand_mask(seed, 10).tolist() == np.frombuffer(ks, "<u4").tolist()


def test_masks_are_deterministic_distinct_and_reduced():
    a, b = bytes(32), bytes([1]) + bytes(31)
    assert np.array_equal(expand_mask(a, 1000), expand_mask(a, 1000))
    assert not np.array_equal(expand_mask(a, 1000), expand_mask(b, 1000))
    m = expand_mask(a, 5000, bits=12)
    assert m.max() < 4096 and m.max() > 3000
    assert np.array_equal(m, expand_mask(a, 5000) & 4095)


def test_add_then_subtract_restores_the_accumulator_modulo_2_32():
    rng = np.random.default_rng(0)
    acc = rng.integers(0, 2**32, 777, dtype=np.uint32)
    before = acc.copy()
    ex = MaskExpander(777)
    ex.add(acc, b"k" * 32, 1)
    assert not np.array_equal(acc, before)
    ex.add(acc, b"k" * 32, -1)
    assert np.array_equal(acc, before)


def test_bad_inputs():
    with pytest.raises(ValueError):
        expand_mask(b"short", 4)
    with pytest.raises(ValueError):
        MaskExpander(4).add(np.zeros(4, np.int64), bytes(32))
    with pytest.raises(ValueError):
        MaskExpander(4).add(np.zeros(4, np.uint32), bytes(32), 2)
