import logging
import time
from pathlib import Path

import numpy as np
import pytest

from models.corpus import Corpus, read_corpus
from models.task import Task, build_task
from models.tokenizer import BOS, OOV, PAD, build_vocabulary

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def small_corpus() -> Corpus:
    # the 5th block of each user is test; 'secret' only ever appears in a test block
    ann = ["hello bob", "hello there", "see you soon", "hello again", "a secret word"]
    bob = ["hi ann", "hello ann"]
    return Corpus("small", {"ann": ann, "bob": bob, "nobody": []})


def test_build_task_vocabulary_comes_from_train_blocks_only(caplog):
    with caplog.at_level(logging.INFO, logger="models.task"):
        task = build_task(small_corpus(), seq_len=4)
    assert isinstance(task, Task) and task.corpus_name == "small" and task.seq_len == 4
    assert task.vocab.words[4] == "hello"  # 4 times in train
    assert task.vocab.id_of("secret") == OOV
    assert list(task.devices) == ["ann", "bob"]
    assert "dropped 1 users with no windows: 'nobody'" in caplog.text


def test_pooled_arrays_and_counts():
    task = build_task(small_corpus(), seq_len=4)
    x, y = task.pooled_train()
    tx, ty = task.pooled_test()
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (task.n_train, 4)
    assert x.shape[0] == sum(d.n_train for d in task.devices.values())
    assert tx.shape == ty.shape == (1, 4)  # only ann has a test block: bos a secret word eos
    assert tx[0].tolist()[:1] == [BOS]
    assert task.n_test == 1
    assert task.n_scored_test() == 1  # a, secret, word are OOV; only <eos> counts
    # windows of one device are contiguous, in the corpus's user order
    ann = task.devices["ann"]
    np.testing.assert_array_equal(x[: ann.n_train], ann.train_x)


def test_given_vocabulary_is_used_as_is():
    vocab = build_vocabulary(["secret"])
    task = build_task(small_corpus(), vocab=vocab, seq_len=4)
    assert task.vocab is vocab
    assert task.n_scored_test() == 2  # secret + eos


def test_task_with_no_devices_has_empty_pools():
    task = build_task(Corpus("none", {"x": []}), seq_len=3)
    assert task.devices == {}
    assert task.pooled_train()[0].shape == (0, 3) and task.pooled_test()[1].shape == (0, 3)
    assert task.n_scored_test() == 0


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"benchmark data {SHAKESPEARE} is not on this machine")
def test_tinyshakespeare_matches_benchmark_counts():
    start = time.perf_counter()
    task = build_task(read_corpus(SHAKESPEARE))
    elapsed = time.perf_counter() - start
    assert task.vocab.size == 5004
    assert task.n_train == 11_261
    assert task.n_test == 2_538
    assert task.n_scored_test() == 34_665
    assert len(task.devices) == 309
    x, y = task.pooled_train()
    assert x.shape == (11_261, 20) and x.dtype == np.int32
    # targets are the inputs shifted by one inside every window
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    tx, ty = task.pooled_test()
    assert tx.shape == (2_538, 20)
    assert int(((ty != PAD) & (ty != OOV)).sum()) == 34_665
    assert elapsed < 5.0, f"reading + partitioning took {elapsed:.2f} s"
