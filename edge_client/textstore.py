"""The device's private record of what its user typed: the training data that never leaves it.

One SQLite file (stdlib `sqlite3`, WAL so the keyboard can append while the client reads),
created readable by its owner only, with `secure_delete` so retention and `wipe()` really
remove text from disk. No method sends anything anywhere: the client trains on `texts()`
locally and only model updates go on the wire.

Encrypted at rest when given a `Keyring` (the real client always does): each row's text and app
are sealed with AES-GCM (edge_client/sealing.py), bound to the row id; the timestamps, the row
count and the sizes stay visible. A plain store is encrypted in place the first time a keyring
opens it; a sealed store refuses to open without the right key, before anything is written.

Age is measured on the store's own clock (edge_client/retention_clock.py), not on the wall
clock the stamps come from, so clock jumps neither delete nor immortalize text; the row limit
drops the rows born first on that clock.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator, Literal

from edge_client.retention_clock import (DEFAULT_MAX_OFFLINE_S, ClockState, StoreClock, advance, as_store_clock,
                                         claimed_age)
from edge_client.sealing import Keyring, StoreKeyError
from edge_client.text_import import ImportLimits, import_lines, json_record

log = logging.getLogger(__name__)

ImportFormat = Literal["lines", "tsv", "jsonl"]
DEFAULT_MAX_TEXT_CHARS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    ts   REAL NOT NULL,
    text TEXT NOT NULL,
    app  TEXT
);
CREATE INDEX IF NOT EXISTS texts_ts ON texts (ts, id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
"""
_ROW_AAD = b"fedboard/text/v1\0"
_APP_LEN = struct.Struct("<H")
_NO_APP = 0xFFFF


def _pack_row(text: str, app: str | None) -> bytes:
    head = _APP_LEN.pack(_NO_APP) if app is None else _APP_LEN.pack(len(app.encode("utf-8"))) + app.encode("utf-8")
    return head + text.encode("utf-8")


def _unpack_row(data: bytes) -> tuple[str, str | None]:
    (n,) = _APP_LEN.unpack_from(data, 0)
    if n == _NO_APP:
        return data[2:].decode("utf-8"), None
    return data[2 + n:].decode("utf-8"), data[2:2 + n].decode("utf-8")


class TextStore:
    """Typed text with timestamps, bounded by age and row count.

    Args:
        path: the SQLite file (created with mode 0600, parent directories too).
        max_age_days: rows older than this are deleted; None keeps them forever.
        max_rows: only the newest this many rows are kept; None for no limit.
        clock: a StoreClock (wall + boot clocks; default: the system's), or a plain callable taken
            as a clock that never jumps (tests). Stamps come from the wall clock; age from the store's.
        max_text_chars: longer texts are refused (a keyboard entry is a message, not a file).
        keyring: seal rows with AES-GCM (None: a plain store; a sealed one then refuses to open).
        max_offline_s: the most a reboot may age the texts (see retention_clock).

    Thread-safe: one connection guarded by a lock, so a keyboard thread can `add` while the
    training thread reads. Other processes may share the file (WAL, 10 s busy timeout).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_age_days: float | None = 90,
        max_rows: int | None = 50_000,
        clock: Callable[[], float] | StoreClock | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        keyring: Keyring | None = None,
        max_offline_s: float = DEFAULT_MAX_OFFLINE_S,
    ) -> None:
        if max_age_days is not None and not max_age_days > 0:
            raise ValueError(f"max_age_days must be > 0 or None, got {max_age_days}")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self.path = Path(path)
        self.max_age_days = max_age_days
        self.max_rows = max_rows
        self.max_text_chars = max_text_chars
        self._clock = as_store_clock(clock)
        self.max_offline_s = max_offline_s
        self.keyring = keyring
        self._seal_id: bytes | None = None  # the key id the rows are sealed with (None: plain)
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # create private before SQLite does with the umask
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=10.0, check_same_thread=False, isolation_level=None
        )
        try:
            self._seal_id = self._check_key()  # before anything is written
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._upgrade_schema()
            if keyring is not None and self._seal_id is None:
                self._encrypt_plain_rows(keyring)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # -- keys, schema, migration ---------------------------------------------------------------
    def _check_key(self) -> bytes | None:
        """The key id the store is sealed with; StoreKeyError (nothing written) if it cannot be read."""
        conn = self._connection()
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        row = conn.execute("SELECT value FROM meta WHERE key = 'key_id'").fetchone() if has_meta else None
        if row is None:
            return None
        key_id = bytes(row[0])
        if self.keyring is None:
            raise StoreKeyError(f"text store {self.path} is encrypted: open it with the device's store key")
        if not self.keyring.has(key_id):
            raise StoreKeyError(f"text store {self.path} is encrypted with another key (key id {key_id.hex()}, "
                                f"the store key given has id {self.keyring.current.key_id.hex()}): wrong store key; "
                                "nothing was changed")
        return key_id

    def _upgrade_schema(self) -> None:
        """Stores written before the retention clock get a `born` column: their rows are born now
        minus the age their stamps claim (the last time the wall clock is trusted for them)."""
        conn = self._connection()
        columns = {row[1] for row in conn.execute("PRAGMA table_info(texts)")}
        if "born" in columns:
            return
        with self._transaction() as now:
            conn.execute("ALTER TABLE texts ADD COLUMN born REAL")
            conn.execute("UPDATE texts SET born = ? - max(0.0, ? - ts)", (now.elapsed, now.wall))
            conn.execute("CREATE INDEX IF NOT EXISTS texts_born ON texts (born, id)")

    def _encrypt_plain_rows(self, keyring: Keyring) -> None:
        """Seal every plain row in one transaction, then rewrite the file so no plain page is left."""
        conn = self._connection()
        with self._transaction():
            plain = conn.execute("SELECT id, text, app FROM texts").fetchall()
            key_id = keyring.current.key_id
            for row_id, text, app in plain:
                sealed = keyring.seal(_pack_row(text, app), _ROW_AAD + row_id.to_bytes(8, "big"), key_id)
                conn.execute("UPDATE texts SET text = ?, app = NULL WHERE id = ?", (sealed, row_id))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('key_id', ?)", (key_id,))
        self._seal_id = key_id
        if plain:
            self._scrub()
            log.info("text store %s: encrypted %d plain texts in place", self.path, len(plain))

    def _scrub(self) -> None:
        conn = self._connection()
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # old pages must not linger in the WAL

    def rekey(self, keyring: Keyring, progress: Callable[[int], None] | None = None) -> int:
        """Re-seal every row with `keyring.current`, in one transaction (all rows or none); returns
        how many. The old key must still be in `keyring` (a staged rotation holds both).
        `progress(rows_done)` is called inside the transaction (the crash tests stop there)."""
        with self._lock:
            conn = self._connection()
            key_id = keyring.current.key_id
            with self._transaction():
                rows = conn.execute("SELECT id, text, app FROM texts").fetchall()
                for done, (row_id, text, app) in enumerate(rows, start=1):
                    aad = _ROW_AAD + row_id.to_bytes(8, "big")
                    plain = keyring.open(text, aad, f"{self.path} row {row_id}") if isinstance(text, bytes) \
                        else _pack_row(text, app)
                    conn.execute("UPDATE texts SET text = ?, app = NULL WHERE id = ?",
                                 (keyring.seal(plain, aad, key_id), row_id))
                    if progress is not None:
                        progress(done)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('key_id', ?)", (key_id,))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.keyring, self._seal_id = keyring, key_id
            return len(rows)

    @property
    def sealed_key_id(self) -> bytes | None:
        return self._seal_id

    # -- the store clock and transactions --------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[ClockState]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), yielding the store clock, advanced now."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = self._tick_locked()
                yield now
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _tick_locked(self) -> ClockState:
        conn = self._connection()
        saved = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'clock_%'").fetchall())
        try:
            state: ClockState | None = ClockState(float(saved["clock_elapsed"]), str(saved["clock_boot"]),
                                                  float(saved["clock_since_boot"]), float(saved["clock_wall"]))
        except (KeyError, TypeError, ValueError):
            state = None
        now = advance(state, self._clock, self.max_offline_s)
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         [("clock_elapsed", now.elapsed), ("clock_boot", now.boot_id),
                          ("clock_since_boot", now.since_boot), ("clock_wall", now.wall)])
        return now

    # -- writing -----------------------------------------------------------------------------
    def add(self, text: str, ts: float | None = None, *, app: str | None = None) -> int:
        """Store one text (timestamp defaults to now); returns its row id."""
        row = self._row(text, ts, app)
        with self._transaction() as now:
            (row_id,) = self._insert_locked([row], now)
            self._enforce_retention_locked(now)
            return row_id

    def add_many(self, texts: Iterable[str], *, app: str | None = None) -> int:
        """Store several texts stamped now, in one transaction; all or none. Returns the count."""
        rows = [self._row(text, None, app) for text in texts]
        return self._insert_rows(rows)

    def import_file(self, path: Path, fmt: ImportFormat = "lines") -> int:
        """Import an export of typed text; all or nothing. Returns the number of rows added.

        - "lines": one text per line.
        - "tsv": `ts<TAB>text` or `ts<TAB>text<TAB>app` per line, ts in Unix seconds.
        - "jsonl": one object per line: {"text": str, "ts": number (optional), "app": str (optional)}.
        Blank lines are skipped. Any bad line is a ValueError naming the file and line.
        """
        if fmt not in ("lines", "tsv", "jsonl"):
            raise ValueError(f"unknown import format {fmt!r}: use 'lines', 'tsv' or 'jsonl'")
        path = Path(path)
        rows: list[tuple[float, str, str | None]] = []
        for lineno, line in import_lines(path, ImportLimits.for_text_chars(self.max_text_chars)):  # bounded reads
            try:
                if not line.strip():
                    continue
                rows.append(self._parse_line(line, fmt))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
        added = self._insert_rows(rows)
        log.info("imported %d texts from %s", added, path)
        return added

    def _parse_line(self, line: str, fmt: ImportFormat) -> tuple[float, str, str | None]:
        if fmt == "lines":
            return self._row(line, None, None)
        if fmt == "tsv":
            cols = line.split("\t")
            if len(cols) not in (2, 3):
                raise ValueError(f"expected 'ts<TAB>text[<TAB>app]', got {len(cols)} column(s)")
            try:
                ts = float(cols[0])
            except ValueError:
                raise ValueError(f"timestamp {cols[0][:40]!r} is not a number") from None
            return self._row(cols[1], ts, cols[2] if len(cols) == 3 and cols[2] else None)
        obj = json_record(line)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"text", "ts", "app"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: text, ts, app")
        if "text" not in obj:
            raise ValueError("missing key 'text'")
        ts = obj.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise ValueError(f"'ts' must be a number, got {ts!r}")
        app = obj.get("app")
        if app is not None and not isinstance(app, str):
            raise ValueError(f"'app' must be a string, got {app!r}")
        return self._row(obj["text"], ts, app)

    def _row(self, text: object, ts: float | None, app: object) -> tuple[float, str, str | None]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty")
        if len(text) > self.max_text_chars:
            raise ValueError(f"text is {len(text)} characters, more than the limit of {self.max_text_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid Unicode (lone surrogate)") from None
        if ts is None:
            ts = self._clock.wall()
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise ValueError(f"timestamp must be a finite number, got {ts!r}")
        if app is not None and (not isinstance(app, str) or len(app) > 256):
            raise ValueError(f"app must be a str of at most 256 characters, got {app!r}")
        return float(ts), text, app

    def _insert_rows(self, rows: list[tuple[float, str, str | None]]) -> int:
        if not rows:
            return 0
        with self._transaction() as now:
            self._insert_locked(rows, now)
            self._enforce_retention_locked(now)
        return len(rows)

    def _insert_locked(self, rows: list[tuple[float, str, str | None]], now: ClockState) -> list[int]:
        """Insert inside a transaction: each row born at store time minus the age its stamp claims,
        sealed (when encrypted) under its row id, which is therefore chosen here."""
        conn = self._connection()
        keyring, key_id = self.keyring, self._seal_id
        if keyring is None or key_id is None:
            ids = []
            for ts, text, app in rows:
                born = now.elapsed - claimed_age(ts, now.wall)
                cursor = conn.execute("INSERT INTO texts (ts, text, app, born) VALUES (?, ?, ?, ?)",
                                      (ts, text, app, born))
                ids.append(int(cursor.lastrowid or 0))
            self._bump_locked()
            return ids
        sealed_with = bytes(conn.execute("SELECT value FROM meta WHERE key = 'key_id'").fetchone()[0])
        if sealed_with != key_id:  # another process rotated the key since this store was opened
            if not keyring.has(sealed_with):
                raise StoreKeyError(f"text store {self.path} was re-keyed by another process (key id "
                                    f"{sealed_with.hex()}): open it again with the new store key")
            key_id = self._seal_id = sealed_with
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'texts'").fetchone()
        top = conn.execute("SELECT max(id) FROM texts").fetchone()[0]
        first = max(int(seq[0]) if seq else 0, int(top or 0)) + 1
        ids = list(range(first, first + len(rows)))
        conn.executemany(
            "INSERT INTO texts (id, ts, text, app, born) VALUES (?, ?, ?, NULL, ?)",
            [(row_id, ts, keyring.seal(_pack_row(text, app), _ROW_AAD + row_id.to_bytes(8, "big"), key_id),
              now.elapsed - claimed_age(ts, now.wall)) for row_id, (ts, text, app) in zip(ids, rows)])
        self._bump_locked()
        return ids

    def _decode(self, row_id: int, text: str | bytes, app: str | None) -> tuple[str, str | None]:
        if not isinstance(text, bytes):
            return text, app
        if self.keyring is None:
            raise StoreKeyError(f"text store {self.path} holds encrypted rows: open it with the store key")
        plain = self.keyring.open(text, _ROW_AAD + row_id.to_bytes(8, "big"), f"{self.path} row {row_id}")
        return _unpack_row(plain)

    # -- reading -----------------------------------------------------------------------------
    def texts(self, since: float | None = None) -> list[str]:
        """Stored texts oldest first, optionally only those with ts >= `since`.

        Retention runs first, so text past its age is never trained on even if nothing
        was added for a while.
        """
        return [text for _, text, _ in self.rows(since)]

    def rows(self, since: float | None = None) -> list[tuple[float, str, str | None]]:
        """(ts, text, app) oldest first, after retention; for tools that need the timestamps."""
        with self._transaction() as now:
            conn = self._connection()
            self._enforce_retention_locked(now)
            cursor = conn.execute(
                "SELECT id, ts, text, app FROM texts WHERE ts >= ? ORDER BY born, id",
                (-math.inf if since is None else float(since),),
            )
            found = cursor.fetchall()
        return [(ts, *self._decode(row_id, text, app)) for row_id, ts, text, app in found]

    def count(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT count(*) FROM texts").fetchone()[0])

    def generation(self) -> int:
        """A number that changes whenever a text is added or deleted (by any process), after
        retention: lets a reader skip decrypting every text when nothing changed."""
        with self._transaction() as now:
            self._enforce_retention_locked(now)
            return self._generation_locked()

    def _generation_locked(self) -> int:
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _bump_locked(self) -> None:
        self._connection().execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)",
                                   (self._generation_locked() + 1,))

    # -- retention and removal ---------------------------------------------------------------
    def enforce_retention(self) -> int:
        """Delete rows older than max_age_days, then the oldest beyond max_rows; returns how many."""
        with self._transaction() as now:
            return self._enforce_retention_locked(now)

    def _enforce_retention_locked(self, now: ClockState) -> int:
        """Age is store time minus birth (store time, see retention_clock), never the wall clock."""
        conn = self._connection()
        deleted = 0
        if self.max_age_days is not None:
            cutoff = now.elapsed - self.max_age_days * 86_400.0
            deleted += conn.execute("DELETE FROM texts WHERE born < ?", (cutoff,)).rowcount
        if self.max_rows is not None:
            excess = self._count_locked() - self.max_rows
            if excess > 0:
                deleted += conn.execute(
                    "DELETE FROM texts WHERE id IN (SELECT id FROM texts ORDER BY born, id LIMIT ?)", (excess,)
                ).rowcount
        if deleted:
            self._bump_locked()
            log.debug("retention deleted %d texts", deleted)
        return deleted

    def _count_locked(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM texts").fetchone()[0])

    def wipe(self) -> None:
        """Delete every text and shrink the file, e.g. when the user opts out."""
        with self._lock:
            conn = self._connection()
            with self._transaction():
                conn.execute("DELETE FROM texts")
                self._bump_locked()
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # old pages must not linger in the WAL
        log.info("text store %s wiped", self.path)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> TextStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"text store {self.path} is closed")
        return self._conn
