import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.partition import (
    DeviceData, count_scored, make_windows, partition_user, split_blocks, windows_of_sequences, windows_to_xy,
)
from models.tokenizer import BOS, EOS, OOV, PAD, build_vocabulary


def test_split_blocks_puts_every_fifth_block_in_test():
    blocks = [f"b{i}" for i in range(12)]
    train, test = split_blocks(blocks)
    assert test == ["b4", "b9"]
    assert train == [b for b in blocks if b not in test]
    assert split_blocks(blocks, test_every=3)[1] == ["b2", "b5", "b8", "b11"]
    assert split_blocks([]) == ([], [])
    with pytest.raises(ValueError, match="at least 2"):
        split_blocks(blocks, test_every=1)


def test_make_windows_benchmark_shape():
    seq = [BOS] + list(range(10, 30)) + [EOS]  # 22 ids -> targets 1..21 -> 2 windows
    w = make_windows(seq)
    assert w.dtype == np.int32 and w.shape == (2, 21)
    assert w[0].tolist() == seq[:21]
    assert w[1].tolist() == seq[20:] + [PAD] * 19
    assert w[0, -1] == w[1, 0]


@pytest.mark.parametrize("length, n", [(0, 0), (1, 0), (2, 1), (21, 1), (22, 2), (41, 2), (42, 3)])
def test_make_windows_count(length, n):
    assert make_windows([BOS] + [5] * max(length - 1, 0) if length else [], seq_len=20).shape == (n, 21)


def test_make_windows_drops_windows_whose_targets_are_all_pad():
    # PAD inside a sequence only happens by mistake, but such a window must not reach training
    seq = [BOS, 5, 6] + [PAD] * 20
    assert make_windows(seq, seq_len=2).tolist() == [[BOS, 5, 6]]


def test_make_windows_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        make_windows([BOS, EOS], seq_len=0)


sequences = st.lists(st.integers(min_value=4, max_value=5003), max_size=120).map(lambda ids: [BOS, *ids, EOS])


@settings(max_examples=200, deadline=None)
@given(seq=sequences, seq_len=st.integers(min_value=1, max_value=25))
def test_every_id_after_bos_is_a_target_exactly_once(seq, seq_len):
    w = make_windows(seq, seq_len)
    assert w.shape == (-(-(len(seq) - 1) // seq_len), seq_len + 1)
    targets = w[:, 1:].reshape(-1)
    assert targets[targets != PAD].tolist() == seq[1:]
    # inputs are the ids before each target, so nothing but padding is invented
    inputs = w[:, :-1].reshape(-1)
    assert inputs[targets != PAD].tolist() == seq[:-1]
    # padding only ever trails the last window
    assert (w[:-1] != PAD).all()


@settings(max_examples=200, deadline=None)
@given(seq=sequences, seq_len=st.integers(min_value=1, max_value=25))
def test_consecutive_windows_share_one_id(seq, seq_len):
    w = make_windows(seq, seq_len)
    for k in range(len(w) - 1):
        assert w[k, -1] == w[k + 1, 0]
        assert w[k, -1] == seq[(k + 1) * seq_len]


@settings(max_examples=100, deadline=None)
@given(seqs=st.lists(sequences, max_size=8), seq_len=st.integers(min_value=1, max_value=25))
def test_windows_of_sequences_equals_make_windows_stacked(seqs, seq_len):
    expected = [make_windows(s, seq_len) for s in seqs]
    got = windows_of_sequences(seqs, seq_len)
    np.testing.assert_array_equal(got, np.concatenate(expected) if expected else np.zeros((0, seq_len + 1)))
    x, y = windows_to_xy(got)
    assert x.shape == y.shape == (len(got), seq_len) and x.flags.c_contiguous


def test_partition_user_splits_encodes_and_windows():
    blocks = [f"message number {i} says hello" for i in range(9)] + ["a " * 30]
    vocab = build_vocabulary(["message number says hello"])
    data = partition_user(blocks, vocab, seq_len=4, user="ann")
    assert isinstance(data, DeviceData) and data.user == "ann"
    # each short block: bos message number says hello eos = 6 ids -> 5 targets -> 2 windows of 4
    assert data.n_train == 8 * 2
    # test blocks: #4 (2 windows) and #9 (bos + 30 x 'a' (OOV) + eos = 32 ids -> 8 windows)
    assert data.n_test == 2 + 8
    for arr in (data.train_x, data.train_y, data.test_x, data.test_y):
        assert arr.dtype == np.int32 and arr.shape[1] == 4
    m, n, s, h = (vocab.id_of(w) for w in ("message", "number", "says", "hello"))
    assert data.train_x[0].tolist() == [BOS, m, n, s]
    assert data.train_y[0].tolist() == [m, n, s, h]
    assert data.train_y[1].tolist() == [EOS, PAD, PAD, PAD]
    assert data.n_scored_test == count_scored(data.test_y) == 5 + 1  # the OOVs do not count
    assert count_scored(np.array([[PAD, OOV, BOS, EOS, 9]])) == 3


def test_partition_user_with_no_blocks_is_empty():
    data = partition_user([], build_vocabulary(["x"]))
    assert data.n_train == data.n_test == 0
    assert data.train_x.shape == (0, 20) and data.train_x.dtype == np.int32
