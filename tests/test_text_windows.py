"""StoreWindows: a device's windows are the benchmark's windows of its stored texts."""
import numpy as np

from edge_client.text_windows import StoreWindows
from edge_client.textstore import TextStore
from models.partition import make_windows, windows_to_xy
from models.tokenizer import build_vocabulary

TEXTS = [
    "I am going to the park, are you coming?",
    "ok see you at the park at six " * 4,  # 32 words: two windows
    "zebra crossing",  # out-of-vocabulary words become <oov>
]
VOCAB = build_vocabulary(TEXTS[:2], size=50)


def reference(texts, seq_len):
    windows = np.concatenate([make_windows(VOCAB.encode_block(t), seq_len) for t in texts])
    return windows_to_xy(windows)


def test_windows_equal_the_partition_windows(tmp_path):
    with TextStore(tmp_path / "t.db", clock=lambda: 1e9) as store:
        store.add_many(TEXTS)
        x, y = StoreWindows(store, VOCAB, seq_len=20).training_windows()
        ref_x, ref_y = reference(TEXTS, 20)
        assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape[1] == 20
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(y, ref_y)
        assert len(x) == 1 + 2 + 1
        assert x[0, 0] == 2 and 3 in y[0]  # <bos> first, <eos> a target
        assert 1 in x[-1]  # <oov>


def test_short_seq_len_and_single_text(tmp_path):
    with TextStore(tmp_path / "t.db") as store:
        store.add(TEXTS[1])
        x, y = StoreWindows(store, VOCAB, seq_len=5).training_windows()
        ref_x, ref_y = reference([TEXTS[1]], 5)
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(y, ref_y)


def test_cached_until_the_store_changes(tmp_path):
    now = [1e9]
    with TextStore(tmp_path / "t.db", clock=lambda: now[0], max_age_days=1) as store:
        windows = StoreWindows(store, VOCAB, seq_len=20)
        x0, y0 = windows.training_windows()
        assert x0.shape == (0, 20) and y0.shape == (0, 20)
        store.add(TEXTS[0])
        x1, _ = windows.training_windows()
        assert len(x1) == 1
        assert windows.training_windows()[0] is x1  # unchanged store: the cached arrays
        store.add(TEXTS[1])
        x2, _ = windows.training_windows()
        assert len(x2) == 3
        now[0] += 2 * 86_400  # retention removes both texts: the windows follow
        assert len(windows.training_windows()[0]) == 0


def test_same_count_different_texts_is_a_change(tmp_path):
    with TextStore(tmp_path / "t.db", max_rows=1) as store:
        windows = StoreWindows(store, VOCAB, seq_len=20)
        store.add("i am going")
        first = windows.training_windows()[0].copy()
        store.add("the park")  # max_rows=1: the first text is gone, the count is still 1
        second = windows.training_windows()[0]
        assert len(first) == len(second) == 1 and not np.array_equal(first, second)
