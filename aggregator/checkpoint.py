"""Durable aggregator state: atomic `.npz` files (no pickle) in one checkpoint directory.

Two files, because they change at different rates:
- `model.npz`, written when a round commits (or is abandoned): the global weights and
  version, the server optimizer's state, the cohort RNG, and the exact retained messages
  (full model, delta) so a restart re-publishes byte-identical copies;
- `round.npz`, written after every small batch of accepted check-ins and updates, BEFORE
  they are acknowledged: the open round's plan, phase, check-ins, cohort, accepted ids and
  the aggregator's running sum. An update the broker still holds unacknowledged is delivered
  again after a crash, and one that was acknowledged is in the file: none is lost, and the
  accepted ids make a redelivered one a duplicate, so none is counted twice.

Every write goes to a temporary file in the same directory, is fsynced, and replaces the old
file with an atomic rename (then the directory is fsynced): a crash or a full disk leaves
the last good checkpoint in place. A lock file stops two aggregators sharing a directory.

`ledger.jsonl` is the append-only record an operator (or the fault soak) audits: one
`accepted` line per update once the round checkpoint holds it (round, device, sha256 of the
update message) and one `round_end` line per round (round, version, committed, participants).
It is written after the checkpoint it describes, so a crash in between leaves it one step
behind; `reconcile_*` on the next start appends what the checkpoints prove happened, and
every line is keyed ((round, device) or round), so nothing is ever written twice. Only a torn
LAST line (no newline, not a whole record) is an interrupted append and is cut off; any other
bad line (torn in the middle, not UTF-8, a key missing, a wrong type) is corruption: the file is
left as it is and the aggregator refuses to start, naming the file and the line.

`FEDBOARD_CHECKPOINT_FAULT_FILE` (tests and `bench/soak_faults.py` only): while the file it
names exists, every checkpoint write fails with ENOSPC, as on a full disk, for machines where
a small tmpfs cannot be mounted.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.npz"
ROUND_FILE = "round.npz"
INT8_FILE = "int8.fbm"
LOCK_FILE = "lock"
LEDGER_FILE = "ledger.jsonl"
FAULT_ENV = "FEDBOARD_CHECKPOINT_FAULT_FILE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


# -- atomic files ------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _injected_full_disk() -> None:
    """Raise ENOSPC while the bench's fault file exists (see the module docstring)."""
    flag = os.environ.get(FAULT_ENV)
    if flag and os.path.exists(flag):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by " + FAULT_ENV + ")")


def _atomic_write(path: Path, write: Any) -> int:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _injected_full_disk()
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return size
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        kept = f"the last good checkpoint {path} is kept" if path.exists() else f"there is no earlier {path}"
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc} ({kept}); free disk "
                              "space or fix the directory, then restart the aggregator: updates not yet "
                              "acknowledged will be delivered again") from exc


def atomic_savez(path: Path, arrays: Mapping[str, Any]) -> int:
    """Write `arrays` (numpy arrays, numbers, strings) as an uncompressed .npz, atomically."""
    return _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def atomic_write_bytes(path: Path, data: bytes) -> int:
    return _atomic_write(Path(path), lambda f: f.write(data))


# What to do when a checkpoint file cannot be used, by file name (see README, "Reliability").
_WHAT_TO_DO = {
    MODEL_FILE: "restore it from a backup, or move it away and start with --recover-from-broker to continue "
                "from the signed model the broker retains",
    ROUND_FILE: "restore it from a backup, or move it away to drop the open round (its accepted updates are "
                "lost; the ledger keeps their record)",
}


def _what_to_do(path: Path) -> str:
    return _WHAT_TO_DO.get(Path(path).name, "restore it from a backup or move it away")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz written by `atomic_savez` (pickles are refused).

    A truncated or bit-flipped file fails here (zip CRC, central directory), never later:
    every member is read, so its CRC is checked, before anything is used."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError,
            NotImplementedError, RuntimeError) as exc:  # all that zipfile/np.lib.format raise on a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); the file is left "
                              f"as it is: {_what_to_do(path)}") from exc


def text_array(items: list[str]) -> np.ndarray:
    return np.array(items, dtype=np.str_) if items else np.zeros(0, dtype="<U1")


def _scalar(data: Mapping[str, np.ndarray], key: str) -> Any:
    try:
        return np.asarray(data[key]).item()
    except KeyError:
        raise CheckpointError(f"checkpoint lacks {key!r}: written by another version?") from None


def _prefixed(data: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


# -- what is saved -----------------------------------------------------------------------------
@dataclass
class ModelCheckpoint:
    """The committed state: what devices hold and what the next round starts from."""

    version: int
    last_round: int                      # the last round that ended (committed or abandoned)
    weights: np.ndarray
    optimizer: dict[str, Any]
    rng_state: dict[str, Any]
    model_envelope: bytes
    delta_envelope: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)   # JSON-able (pacing, counters)

    def to_arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "last_round": self.last_round,
            "weights": np.ascontiguousarray(self.weights, dtype=np.float32),
            "rng_state": json.dumps(self.rng_state), "extra": json.dumps(self.extra),
            "model_envelope": np.frombuffer(self.model_envelope, dtype=np.uint8),
            "delta_envelope": np.frombuffer(self.delta_envelope, dtype=np.uint8),
        }
        out.update({f"opt.{k}": v for k, v in self.optimizer.items()})
        return out

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> "ModelCheckpoint":
        if _scalar(data, "format") != FORMAT:
            raise CheckpointError(f"checkpoint format {_scalar(data, 'format')}, this aggregator reads {FORMAT}")
        return cls(
            version=int(_scalar(data, "version")), last_round=int(_scalar(data, "last_round")),
            weights=np.asarray(data["weights"], dtype=np.float32), optimizer=_prefixed(data, "opt."),
            rng_state=json.loads(_scalar(data, "rng_state")), extra=json.loads(_scalar(data, "extra")),
            model_envelope=np.asarray(data["model_envelope"], dtype=np.uint8).tobytes(),
            delta_envelope=np.asarray(data["delta_envelope"], dtype=np.uint8).tobytes(),
        )


@dataclass
class RoundCheckpoint:
    """The open round: `meta` is JSON-able; `aggregate` is the UpdateAggregator's state()."""

    round_id: int
    meta: dict[str, Any]
    aggregate: dict[str, Any] | None = None

    def to_arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "round_id": self.round_id, "meta": json.dumps(self.meta)}
        if self.aggregate is not None:
            out.update({f"agg.{k}": v for k, v in self.aggregate.items()})
        return out

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> "RoundCheckpoint":
        if _scalar(data, "format") != FORMAT:
            raise CheckpointError(f"round checkpoint format {_scalar(data, 'format')}, this aggregator reads {FORMAT}")
        aggregate = _prefixed(data, "agg.") or None
        return cls(int(_scalar(data, "round_id")), json.loads(_scalar(data, "meta")), aggregate)


class CheckpointStore:
    """The checkpoint directory of one aggregator (locked while it is open)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {exc}") from exc
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CheckpointError(f"another aggregator is using {self.directory}: run one aggregator per "
                                  "checkpoint directory (scale-out workers need none)") from None
        self.bytes_written = 0
        self.writes = 0
        self._ledger: Ledger | None = None

    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def round_path(self) -> Path:
        return self.directory / ROUND_FILE

    def _count(self, size: int) -> None:
        self.bytes_written += size
        self.writes += 1

    def save_model(self, checkpoint: ModelCheckpoint) -> None:
        self._count(atomic_savez(self.model_path, checkpoint.to_arrays()))

    def load_model(self) -> ModelCheckpoint | None:
        return _parse(self.model_path, ModelCheckpoint.from_arrays) if self.model_path.exists() else None

    def save_round(self, checkpoint: RoundCheckpoint) -> None:
        self._count(atomic_savez(self.round_path, checkpoint.to_arrays()))

    def load_round(self) -> RoundCheckpoint | None:
        return _parse(self.round_path, RoundCheckpoint.from_arrays) if self.round_path.exists() else None

    def earlier_run(self) -> list[str]:
        """What in this directory shows an aggregator ran here before (besides model.npz)."""
        found = [name for name in (ROUND_FILE, INT8_FILE) if (self.directory / name).exists()]
        ledger = self.directory / LEDGER_FILE
        if ledger.exists() and ledger.stat().st_size > 0:
            found.append(LEDGER_FILE)
        return found

    @property
    def ledger(self) -> "Ledger":
        if self._ledger is None:
            self._ledger = Ledger(self.directory / LEDGER_FILE)
        return self._ledger

    def save_int8(self, envelope: bytes) -> None:
        self._count(atomic_write_bytes(self.directory / INT8_FILE, envelope))

    def load_int8(self) -> bytes | None:
        path = self.directory / INT8_FILE
        return path.read_bytes() if path.exists() else None


def _parse(path: Path, parse: Any) -> Any:
    """`parse(load_npz(path))`, with a damaged content (bad JSON, a missing array) named by its file."""
    data = load_npz(path)
    try:
        return parse(data)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}; {_what_to_do(path)}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); the file is left as "
                              f"it is: {_what_to_do(path)}") from exc


# -- the audit ledger ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundEnd:
    """How a round ended, as the ledger and the model checkpoint record it."""

    round: int
    version: int
    committed: bool
    participants: int

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "version": self.version, "committed": self.committed,
                "participants": self.participants}


@dataclass
class LedgerContents:
    """What `read_ledger` found: accepted (round, device) -> sha256, and the round ends in order."""

    accepted: dict[tuple[int, str], str] = field(default_factory=dict)
    ends: list[RoundEnd] = field(default_factory=list)
    repeated: list[tuple[int, str]] = field(default_factory=list)   # keys seen more than once (a bug)
    torn_lines: int = 0


class LedgerCorrupt(CheckpointError):
    """A ledger line other than a torn last one is unreadable: the file is kept as it is."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Each event's keys and the type check of each: what `Ledger` writes, nothing else is accepted.
_LEDGER_FIELDS: dict[str, dict[str, Any]] = {
    "accepted": {"round": _is_int, "device": lambda v: isinstance(v, str) and bool(v),
                 "sha256": lambda v: isinstance(v, str) and bool(v)},
    "round_end": {"round": _is_int, "version": _is_int, "committed": lambda v: isinstance(v, bool),
                  "participants": _is_int},
}


def _ledger_record(raw: bytes) -> dict[str, Any]:
    """One ledger line as a checked record; ValueError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        item = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("not a whole JSON record (torn or overwritten)") from None
    if not isinstance(item, dict):
        raise ValueError(f"a JSON {type(item).__name__}, not a record")
    fields = _LEDGER_FIELDS.get(item.get("event"))  # type: ignore[arg-type]
    if fields is None:
        raise ValueError(f"unknown event {item.get('event')!r} (expected one of {sorted(_LEDGER_FIELDS)})")
    for key, valid in fields.items():
        if key not in item:
            raise ValueError(f"{item['event']} record lacks {key!r}")
        if not valid(item[key]):
            raise ValueError(f"{item['event']} record has {key}={item[key]!r} of the wrong type")
    return item


def _split_ledger(path: Path) -> tuple[list[bytes], bytes]:
    """The newline-terminated lines, and what follows the last newline (b"" when nothing does)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    return lines[:-1], lines[-1]


def read_ledger(path: str | Path) -> LedgerContents:
    """Parse a ledger. Only a torn last line (a crash mid-append: no newline after it, and not a
    whole record) is counted and skipped; any other bad line raises LedgerCorrupt with file and line."""
    out = LedgerContents()
    path = Path(path)
    if not path.exists():
        return out
    lines, tail = _split_ledger(path)
    seen_ends: set[int] = set()
    records = [(number, raw) for number, raw in enumerate(lines, 1) if raw.strip()]
    if tail.strip():
        try:
            _ledger_record(tail)
            records.append((len(lines) + 1, tail))   # a whole record whose newline was not written yet
        except ValueError:
            out.torn_lines += 1
    for number, raw in records:
        try:
            item = _ledger_record(raw)
        except ValueError as exc:
            raise LedgerCorrupt(
                f"ledger {path}:{number} is corrupt: {exc}. Only a torn last line is an interrupted append; "
                "this one has lines after it, so an audit record is damaged. The file is left as it is: "
                f"restore it from a backup, or repair or remove line {number} by hand (the checkpoints are "
                "intact; the next start re-records what they prove), then restart the aggregator") from None
        if item["event"] == "accepted":
            key = (item["round"], item["device"])
            if key in out.accepted:
                out.repeated.append(key)
            out.accepted[key] = item["sha256"]
        else:
            end = RoundEnd(item["round"], item["version"], item["committed"], item["participants"])
            if end.round in seen_ends:
                out.repeated.append((end.round, "round_end"))
            seen_ends.add(end.round)
            out.ends.append(end)
    return out


class Ledger:
    """Append-only JSON lines: `accepted` and `round_end` events, each written at most once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        contents = read_ledger(self.path)
        self._accepted = set(contents.accepted)
        self._ended = {end.round for end in contents.ends}
        self._complete_last_line(contents.torn_lines)

    @property
    def last_round(self) -> int:
        """The highest round id the ledger names (0 if none): a recovered aggregator never reuses one."""
        return max([r for r, _ in self._accepted] + list(self._ended) + [0])

    @property
    def last_ended_round(self) -> int:
        """The highest round with a `round_end` line (0 if none)."""
        return max(self._ended, default=0)

    def _complete_last_line(self, torn: int) -> None:
        """Cut a torn last line off (or end a whole last record with its newline), so the next
        append starts a clean line; the lines before it stay byte for byte."""
        if not self.path.exists():
            return
        lines, tail = _split_ledger(self.path)
        if not tail:
            return
        try:
            if torn:
                log.warning("ledger %s: cutting off a torn last line from an interrupted append (%d bytes)",
                            self.path, len(tail))
                with open(self.path, "r+b") as f:
                    f.truncate(sum(len(line) + 1 for line in lines))
                    os.fsync(f.fileno())
            else:
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                    os.fsync(f.fileno())
        except OSError as exc:
            raise CheckpointError(f"could not repair the last line of the ledger {self.path}: "
                                  f"{exc.strerror or exc}") from exc

    def _append(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        data = "".join(json.dumps(item, sort_keys=True) + "\n" for item in items).encode()
        try:
            _injected_full_disk()
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise CheckpointError(f"could not append to the ledger {self.path}: {exc.strerror or exc}; free disk "
                                  "space, then restart the aggregator (the checkpoints are intact and the "
                                  "ledger is completed from them)") from exc

    def record_accepted(self, round_id: int, accepted_sha256: Mapping[str, str]) -> int:
        """Append the updates of `round_id` not yet in the ledger; returns how many."""
        new = [(round_id, device) for device in sorted(accepted_sha256) if (round_id, device) not in self._accepted]
        self._append([{"event": "accepted", "round": r, "device": d, "sha256": accepted_sha256[d]} for r, d in new])
        self._accepted.update(new)
        return len(new)

    def record_round_end(self, end: RoundEnd) -> bool:
        """Append the end of a round unless it is there already; True if written."""
        if end.round in self._ended:
            return False
        self._append([{"event": "round_end", **end.to_dict()}])
        self._ended.add(end.round)
        return True
