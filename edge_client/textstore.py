"""The device's private record of what its user typed: the training data that never leaves it.

One SQLite file (stdlib `sqlite3`, WAL so the keyboard can append while the client reads),
created readable by its owner only, with `secure_delete` so retention and `wipe()` really
remove text from disk. No method sends anything anywhere: the client trains on `texts()`
locally and only model updates go on the wire.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Literal

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
"""


class TextStore:
    """Typed text with timestamps, bounded by age and row count.

    Args:
        path: the SQLite file (created with mode 0600, parent directories too).
        max_age_days: rows older than this are deleted; None keeps them forever.
        max_rows: only the newest this many rows are kept; None for no limit.
        clock: wall-clock seconds (time.time) for default timestamps and the age limit.
        max_text_chars: longer texts are refused (a keyboard entry is a message, not a file).

    Thread-safe: one connection guarded by a lock, so a keyboard thread can `add` while the
    training thread reads. Other processes may share the file (WAL, 10 s busy timeout).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_age_days: float | None = 90,
        max_rows: int | None = 50_000,
        clock: Callable[[], float] = time.time,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
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
        self._clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # create private before SQLite does with the umask
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=10.0, check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)

    # -- writing -----------------------------------------------------------------------------
    def add(self, text: str, ts: float | None = None, *, app: str | None = None) -> int:
        """Store one text (timestamp defaults to now); returns its row id."""
        row = self._row(text, ts, app)
        with self._lock:
            conn = self._connection()
            cursor = conn.execute("INSERT INTO texts (ts, text, app) VALUES (?, ?, ?)", row)
            self._enforce_retention_locked()
            return int(cursor.lastrowid or 0)

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
            ts = self._clock()
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise ValueError(f"timestamp must be a finite number, got {ts!r}")
        if app is not None and (not isinstance(app, str) or len(app) > 256):
            raise ValueError(f"app must be a str of at most 256 characters, got {app!r}")
        return float(ts), text, app

    def _insert_rows(self, rows: list[tuple[float, str, str | None]]) -> int:
        if not rows:
            return 0
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO texts (ts, text, app) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._enforce_retention_locked()
        return len(rows)

    # -- reading -----------------------------------------------------------------------------
    def texts(self, since: float | None = None) -> list[str]:
        """Stored texts oldest first, optionally only those with ts >= `since`.

        Retention runs first, so text past its age is never trained on even if nothing
        was added for a while.
        """
        with self._lock:
            conn = self._connection()
            self._enforce_retention_locked()
            if since is None:
                cursor = conn.execute("SELECT text FROM texts ORDER BY ts, id")
            else:
                cursor = conn.execute("SELECT text FROM texts WHERE ts >= ? ORDER BY ts, id", (float(since),))
            return [row[0] for row in cursor]

    def rows(self, since: float | None = None) -> list[tuple[float, str, str | None]]:
        """(ts, text, app) oldest first, after retention; for tools that need the timestamps."""
        with self._lock:
            conn = self._connection()
            self._enforce_retention_locked()
            cursor = conn.execute(
                "SELECT ts, text, app FROM texts WHERE ts >= ? ORDER BY ts, id",
                (-math.inf if since is None else float(since),),
            )
            return [(row[0], row[1], row[2]) for row in cursor]

    def count(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT count(*) FROM texts").fetchone()[0])

    # -- retention and removal ---------------------------------------------------------------
    def enforce_retention(self) -> int:
        """Delete rows older than max_age_days, then the oldest beyond max_rows; returns how many."""
        with self._lock:
            return self._enforce_retention_locked()

    def _enforce_retention_locked(self) -> int:
        conn = self._connection()
        deleted = 0
        if self.max_age_days is not None:
            cutoff = self._clock() - self.max_age_days * 86_400.0
            deleted += conn.execute("DELETE FROM texts WHERE ts < ?", (cutoff,)).rowcount
        if self.max_rows is not None:
            excess = self._count_locked() - self.max_rows
            if excess > 0:
                deleted += conn.execute(
                    "DELETE FROM texts WHERE id IN (SELECT id FROM texts ORDER BY ts, id LIMIT ?)", (excess,)
                ).rowcount
        if deleted:
            log.debug("retention deleted %d texts", deleted)
        return deleted

    def _count_locked(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM texts").fetchone()[0])

    def wipe(self) -> None:
        """Delete every text and shrink the file, e.g. when the user opts out."""
        with self._lock:
            conn = self._connection()
            conn.execute("DELETE FROM texts")
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
