"""Reading an export of typed text with bounds on everything it holds.

`fedboard client add-text --file` reads whatever path it is given. Unbounded, `/dev/zero` (or
any input without a newline) was one endless "line" read until the kernel killed the process
(23 GB), a JSON line nested 100,000 deep ended in a RecursionError traceback and a directory
in an IsADirectoryError traceback. Here a line may be at most `max_line_bytes`, a whole
import at most `max_total_bytes`, a JSON record at most `MAX_JSON_DEPTH` deep, and every
refusal is a ValueError that names the file, the line and the limit.
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 8          # a record is {"text", "ts", "app"}: depth 1
MAX_IMPORT_BYTES = 64 * 1024 * 1024  # about a million messages; the store keeps 50,000 by default


@dataclass(frozen=True)
class ImportLimits:
    """What one import may hold: one line, and the whole file."""

    max_line_bytes: int
    max_total_bytes: int = MAX_IMPORT_BYTES

    @classmethod
    def for_text_chars(cls, max_text_chars: int) -> ImportLimits:
        """A line long enough for the longest text the store takes, JSON-escaped (\\uXXXX x 2 per character)."""
        return cls(max_line_bytes=12 * max_text_chars + 4096)


def import_lines(path: Path, limits: ImportLimits) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a UTF-8 text file; ValueError naming file, line and limit.

    The file is read one bounded line at a time, so nothing longer than a line (plus the rows
    the caller keeps) is ever held, whatever the path is: a pipe, a device, a huge file.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the directory check
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        if stat.S_ISDIR(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path} is a directory: give the file to import")
        total = 0
        lineno = 0
        while True:
            lineno += 1
            try:
                raw = handle.readline(limits.max_line_bytes + 1)
            except OSError as exc:
                raise ValueError(f"{path}:{lineno}: cannot read ({exc.strerror or exc})") from None
            if not raw:
                return
            if len(raw) > limits.max_line_bytes and not raw.endswith(b"\n"):
                raise ValueError(f"{path}:{lineno}: line longer than {limits.max_line_bytes} bytes (no newline "
                                 "within the limit): is this a text export, one entry per line?")
            total += len(raw)
            if total > limits.max_total_bytes:
                raise ValueError(f"{path}:{lineno}: the import passes {limits.max_total_bytes} bytes; split the "
                                 "file and import the parts one by one")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            yield lineno, line


def json_record(line: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a nesting limit checked first (deep nesting recursed into a traceback)."""
    depth = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
