"""TextStore: retention by age and rows, import formats and their errors, threads, privacy."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading

import pytest

from edge_client.textstore import TextStore

DAY = 86_400.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with TextStore(tmp_path / "texts.db", clock=clock) as s:
        yield s


def test_add_and_read_back_oldest_first(store, clock):
    store.add("second message", ts=clock.now - 10)
    store.add("first message", ts=clock.now - 20)
    store.add("third message")
    assert store.texts() == ["first message", "second message", "third message"]
    assert store.texts(since=clock.now - 15) == ["second message", "third message"]
    assert store.count() == 3


def test_add_many_and_app_field(store, clock):
    assert store.add_many(["good morning", "see you soon"], app="chat") == 2
    assert store.rows() == [(clock.now, "good morning", "chat"), (clock.now, "see you soon", "chat")]


@pytest.mark.parametrize("bad", ["", "   \n", None, 42, b"bytes"])
def test_empty_or_non_str_text_is_refused(store, bad):
    with pytest.raises(ValueError, match="text"):
        store.add(bad)  # type: ignore[arg-type]
    assert store.count() == 0


def test_too_long_text_and_lone_surrogates_are_refused(tmp_path):
    with TextStore(tmp_path / "t.db", max_text_chars=10) as s:
        with pytest.raises(ValueError, match="limit of 10"):
            s.add("x" * 11)
        with pytest.raises(ValueError, match="Unicode"):
            s.add("bad \ud800")
        with pytest.raises(ValueError, match="timestamp"):
            s.add("fine", ts=float("nan"))
        s.add("x" * 10)
        assert s.count() == 1


def test_add_many_is_all_or_nothing(store):
    with pytest.raises(ValueError):
        store.add_many(["fine", ""])
    assert store.count() == 0


def test_retention_by_age_with_an_injected_clock(tmp_path, clock):
    with TextStore(tmp_path / "t.db", max_age_days=30, clock=clock) as s:
        s.add("old", ts=clock.now - 31 * DAY)  # deleted by the retention run inside add
        assert s.count() == 0
        s.add("month ago", ts=clock.now - 29 * DAY)
        s.add("today")
        clock.now += 2 * DAY
        assert s.count() == 2
        assert s.enforce_retention() == 1
        assert s.texts() == ["today"]


def test_reading_texts_never_returns_expired_ones(tmp_path, clock):
    with TextStore(tmp_path / "t.db", max_age_days=1, clock=clock) as s:
        s.add("yesterday evening", ts=clock.now - 0.5 * DAY)
        s.add("now")
        clock.now += 0.75 * DAY  # no add since: only the read can expire the first text
        assert s.texts() == ["now"]
        assert s.count() == 1


def test_retention_by_rows_keeps_the_newest(tmp_path, clock):
    with TextStore(tmp_path / "t.db", max_rows=3, max_age_days=None, clock=clock) as s:
        for i in range(5):
            s.add(f"message {i}", ts=clock.now + i)
        assert s.texts() == ["message 2", "message 3", "message 4"]
        s.add("late arrival from yesterday", ts=clock.now - DAY)  # oldest: it is the one dropped
        assert s.texts() == ["message 2", "message 3", "message 4"]
        s.add_many(["a", "b"])
        assert s.count() == 3


def test_retention_limits_can_be_disabled(tmp_path, clock):
    with TextStore(tmp_path / "t.db", max_rows=None, max_age_days=None, clock=clock) as s:
        s.add("ancient", ts=0.0)
        assert s.enforce_retention() == 0 and s.count() == 1


def test_two_threads_adding_while_a_third_reads(store):
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(300):
                store.add(f"{tag} {i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                store.texts()
                store.count()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("keyboard", "import")]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    texts = store.texts()
    assert len(texts) == 600 and len(set(texts)) == 600


def test_a_second_process_style_connection_sees_the_rows(tmp_path, clock):
    path = tmp_path / "shared.db"
    with TextStore(path, clock=clock) as keyboard, TextStore(path, clock=clock) as client:
        keyboard.add("typed in the keyboard app")
        assert client.texts() == ["typed in the keyboard app"]


def test_import_lines_skips_blank_lines(store, tmp_path):
    path = tmp_path / "export.txt"
    path.write_text("hello there\n\n  \nhow are you\r\n", encoding="utf-8")
    assert store.import_file(path, fmt="lines") == 2
    assert store.texts() == ["hello there", "how are you"]


def test_import_tsv_with_timestamps_and_app(store, tmp_path, clock):
    path = tmp_path / "export.tsv"
    path.write_text(f"{clock.now - 5}\tlater\tmail\n{clock.now - 9}\tearlier\n", encoding="utf-8")
    assert store.import_file(path, fmt="tsv") == 2
    assert store.rows() == [(clock.now - 9, "earlier", None), (clock.now - 5, "later", "mail")]


def test_import_jsonl(store, tmp_path, clock):
    path = tmp_path / "export.jsonl"
    lines = [{"text": "one", "ts": clock.now - 1}, {"text": "two", "app": "notes"}, {"text": "three"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    assert store.import_file(path, fmt="jsonl") == 3
    assert store.texts() == ["one", "two", "three"]


@pytest.mark.parametrize("fmt, content, bad_line, message", [
    ("tsv", "1.0\tfine\nnot-a-time\thello\n", 2, "timestamp"),
    ("tsv", "1.0\tfine\njust text\n", 2, "column"),
    ("jsonl", '{"text": "ok"}\n{"text": \n', 2, "not valid JSON"),
    ("jsonl", '{"text": "ok"}\n\n["list"]\n', 3, "JSON object"),
    ("jsonl", '{"txt": "typo"}\n', 1, "txt"),
    ("jsonl", '{"ts": 5}\n', 1, "missing key 'text'"),
    ("jsonl", '{"text": "x", "ts": "yesterday"}\n', 1, "'ts' must be a number"),
    ("jsonl", '{"text": 7}\n', 1, "text must be a str"),
    ("lines", "fine\n" + "x" * 20_000 + "\n", 2, "limit"),
])
def test_import_errors_name_the_file_and_line_and_import_nothing(store, tmp_path, fmt, content, bad_line, message):
    path = tmp_path / f"bad.{fmt}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        store.import_file(path, fmt=fmt)
    assert f"{path}:{bad_line}:" in str(info.value)
    assert store.count() == 0


def test_import_refuses_invalid_utf8_and_unknown_format(store, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2:"):
        store.import_file(path)
    with pytest.raises(ValueError, match="unknown import format"):
        store.import_file(path, fmt="csv")  # type: ignore[arg-type]


def test_file_is_private_and_in_wal_mode(store):
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_wipe_removes_the_text_from_disk(store, tmp_path):
    store.add_many([f"my secret password {i}" for i in range(500)])
    store.wipe()
    assert store.count() == 0
    for path in tmp_path.iterdir():
        assert b"secret password" not in path.read_bytes(), path.name


def test_closed_store_refuses_use_and_close_is_idempotent(tmp_path):
    s = TextStore(tmp_path / "t.db")
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.add("too late")


def test_bad_limits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_rows"):
        TextStore(tmp_path / "a.db", max_rows=0)
    with pytest.raises(ValueError, match="max_age_days"):
        TextStore(tmp_path / "b.db", max_age_days=-1)


def test_the_store_has_no_way_to_send_text_anywhere():
    """Privacy by construction: the module, and the project modules it uses (its clock, its
    sealing), import nothing that talks to the network."""
    import ast
    import importlib
    import inspect

    local = {"edge_client.retention_clock", "edge_client.sealing", "edge_client.text_import"}
    allowed = {"__future__", "json", "logging", "math", "os", "sqlite3", "threading", "time",
               "collections", "pathlib", "types", "typing", "struct", "contextlib", "dataclasses", "hashlib",
               "hmac", "uuid", "cryptography", "stat"}
    for name in ("edge_client.textstore", *sorted(local)):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(inspect.getsource(importlib.import_module(name)))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module if node.module in local else node.module.split(".")[0])
        assert imported <= allowed | local, (name, imported)


def test_a_writer_that_holds_the_old_key_never_mixes_keys_after_a_rotation(tmp_path):
    """A keyboard process opened the store before another process re-keyed it: it must refuse to
    add rows under the old key (they would be unreadable once the old key is gone)."""
    from edge_client.sealing import Keyring, StoreKey, StoreKeyError

    old, new = StoreKey.generate(), StoreKey.generate()
    path = tmp_path / "t.db"
    with TextStore(path, keyring=Keyring(old)) as keyboard:
        keyboard.add("before the rotation")
        with TextStore(path, keyring=Keyring(new, (old,))) as rotator:
            assert rotator.rekey(Keyring(new, (old,))) == 1
        with pytest.raises(StoreKeyError, match="re-keyed by another process"):
            keyboard.add("after the rotation")
    with TextStore(path, keyring=Keyring(new)) as reader:
        assert reader.texts() == ["before the rotation"]
