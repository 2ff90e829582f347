"""Corpora: who typed what. One user = one device; each block (message) becomes one sequence.

Readers stream their input line by line (a corpus can be far larger than memory is worth
spending on it) and reject bad input with a `CorpusError` that names the file, the line and
the rule that failed, so a user can fix the file instead of reading a traceback.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger(__name__)

FORMATS = ("speakers", "tsv", "jsonl", "dir", "builtin")

PathLike = str | os.PathLike[str]


class CorpusError(ValueError):
    """A corpus that cannot be read; the message says where (`path`, `line`) and what is wrong."""

    def __init__(self, problem: str, *, path: PathLike | None = None, line: int | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path + (f" line {line}" if line is not None else "") + ": "
        super().__init__(where + problem)


@dataclass(frozen=True)
class Corpus:
    """`users` maps a user to that user's blocks (messages) in the order they were typed."""

    name: str
    users: dict[str, list[str]]

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_blocks(self) -> int:
        return sum(len(b) for b in self.users.values())


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file, as CorpusErrors on failure.

    Reads bytes and decodes line by line, so an encoding error names its own line.
    """
    try:
        f: BinaryIO
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                                      "save the file as UTF-8", path=path, line=lineno) from None
                if lineno == 1 and line.startswith("\ufeff"):  # a BOM, as Windows editors write
                    line = line[1:]
                yield lineno, line.rstrip("\r\n")
    except FileNotFoundError:
        raise CorpusError("file not found", path=path) from None
    except IsADirectoryError:
        raise CorpusError("is a directory, not a file (use format 'dir' for one file per user)", path=path) from None
    except PermissionError:
        raise CorpusError("permission denied", path=path) from None


def _paragraphs(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Blocks of non-blank lines separated by blank lines, with the line number they start on."""
    start = 0
    block: list[str] = []
    for lineno, line in _lines(path):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield start, block
            block = []
    if block:
        yield start, block


def _finish(name: str, users: dict[str, list[str]], path: Path, expected: str) -> Corpus:
    if not users:
        raise CorpusError(f"no blocks found: the corpus is empty (expected {expected})", path=path)
    return Corpus(name=name, users=users)


def read_speakers(path: PathLike) -> Corpus:
    """tinyshakespeare format: blocks separated by a blank line, first line `SPEAKER NAME:`.

    Every block of the same speaker name belongs to the same user.
    """
    path = Path(path)
    users: dict[str, list[str]] = {}
    for start, block in _paragraphs(path):
        head = block[0].strip()
        if not head.endswith(":") or not head[:-1].strip():
            raise CorpusError(
                f"a block must start with a line 'SPEAKER NAME:', got {head[:60]!r} "
                "(blocks are separated by one blank line)",
                path=path, line=start)
        users.setdefault(head[:-1].strip(), []).append("\n".join(block[1:]))
    return _finish(path.stem, users, path, "blocks 'SPEAKER NAME:' + text, separated by blank lines")


def read_tsv(path: PathLike) -> Corpus:
    """`user<TAB>text` per line; one line is one block. Blank lines are skipped."""
    path = Path(path)
    users: dict[str, list[str]] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        user, tab, text = line.partition("\t")
        if not tab:
            raise CorpusError("no tab: expected 'user<TAB>text'", path=path, line=lineno)
        user = user.strip()
        if not user:
            raise CorpusError("empty user before the tab: expected 'user<TAB>text'", path=path, line=lineno)
        users.setdefault(user, []).append(text)
    return _finish(path.stem, users, path, "lines 'user<TAB>text'")


def read_jsonl(path: PathLike) -> Corpus:
    """`{"user": ..., "text": ...}` per line; one line is one block. Blank lines are skipped."""
    path = Path(path)
    users: dict[str, list[str]] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"not valid JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
        if not isinstance(record, dict):
            raise CorpusError(f"expected an object {{\"user\": ..., \"text\": ...}}, got {type(record).__name__}",
                              path=path, line=lineno)
        for key in ("user", "text"):
            if key not in record:
                raise CorpusError(f"no {key!r} key in the object (keys: {sorted(record)})", path=path, line=lineno)
        user, text = record["user"], record["text"]
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not user.strip():
            raise CorpusError(f"'user' must be a non-empty string, got {user!r}", path=path, line=lineno)
        if not isinstance(text, str):
            raise CorpusError(f"'text' must be a string, got {type(text).__name__}", path=path, line=lineno)
        users.setdefault(user.strip(), []).append(text)
    return _finish(path.stem, users, path, "lines {\"user\": ..., \"text\": ...}")


def read_dir(path: PathLike) -> Corpus:
    """A directory with one `.txt` file per user (user = file stem), blocks separated by blank lines."""
    path = Path(path)
    if not path.exists():
        raise CorpusError("directory not found", path=path)
    if not path.is_dir():
        raise CorpusError("not a directory (format 'dir' wants one .txt file per user)", path=path)
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise CorpusError("no .txt files: format 'dir' wants one <user>.txt file per user", path=path)
    users: dict[str, list[str]] = {}
    for f in files:
        blocks = ["\n".join(block) for _, block in _paragraphs(f)]
        if blocks:
            users[f.stem] = blocks
        else:
            log.info("corpus %s: %s has no text, user %r skipped", path, f.name, f.stem)
    return _finish(path.name, users, path, "non-empty <user>.txt files")


def guess_format(path: PathLike) -> str:
    """The format of `path` from what it is: a directory, `.tsv`, `.jsonl`/`.ndjson`, `.txt`."""
    p = Path(path)
    if p.is_dir():
        return "dir"
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        return "tsv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".txt":
        return "speakers"
    if not p.exists():
        raise CorpusError("file not found", path=p)
    raise CorpusError(f"cannot tell the corpus format from the extension {suffix!r}; "
                      f"pass a format, one of {', '.join(FORMATS)}", path=p)


def read_corpus(path: PathLike | None, fmt: str | None = None, *, seed: int = 0) -> Corpus:
    """Read a corpus in any supported format; `path=None` gives the built-in synthetic corpus.

    `fmt` is one of `FORMATS`; None guesses it from the path. `seed` only matters for the
    built-in corpus.
    """
    if fmt is not None and fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")
    if path is None or fmt == "builtin":
        if path is not None:
            raise CorpusError("the built-in corpus takes no path; pass path=None", path=path)
        from models.synthetic import synthetic_corpus

        return synthetic_corpus(seed=seed)
    fmt = fmt or guess_format(path)
    reader = {"speakers": read_speakers, "tsv": read_tsv, "jsonl": read_jsonl, "dir": read_dir}[fmt]
    corpus = reader(path)
    log.info("corpus %s (%s): %d users, %d blocks", corpus.name, fmt, corpus.n_users, corpus.n_blocks)
    return corpus
