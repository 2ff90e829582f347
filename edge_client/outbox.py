"""The offline outbox: an update survives a lost connection and a restart until the broker has it.

A device trains for minutes; losing the result because Wi-Fi dropped (or the client was
restarted) right when it was sent would waste the user's battery. So an encoded update is
written to disk BEFORE the publish is attempted and deleted only once the broker has
acknowledged it (PUBACK). On reconnect, every pending item whose round is still open is
published again; the aggregator ignores duplicates, so a re-send is harmless.

One file per item, written atomically (temp file, fsync, rename, fsync of the directory), with a
small header guarded by a CRC-32 so a torn or corrupted file is recognised, logged and removed
instead of crashing the client or sending garbage. The outbox is bounded in items and bytes:
the oldest items go first, since they are the most likely to belong to closed rounds.

File layout (little-endian): magic b"FBOX", format u8, flags u8 (0), topic_len u16,
round_id u32, deadline_unix f64, created_unix f64, data_len u32, crc32 u32 (over the header
with the crc zeroed, the topic and the data), then the UTF-8 topic and the data.

With a `Keyring` each file is that layout sealed with AES-GCM (edge_client/sealing.py), bound
to the item id (its file name), since an update is a function of the user's text. Plain items
of an older client are still read, and sealed by `reseal()`; an item sealed with an unknown key
is skipped with an error, never removed (a wrong key must not destroy anything).
"""
from __future__ import annotations

import logging
import os
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from edge_client.sealing import Keyring, SealedDataCorrupt, StoreKeyError, is_sealed, sealed_key_id
from edge_client.store_keys import fsync_directory

log = logging.getLogger(__name__)

MAGIC = b"FBOX"
FORMAT = 1
SUFFIX = ".fbo"
_HEADER = struct.Struct("<4sBBHIddII")
_CRC_OFFSET = _HEADER.size - 4
MAX_TOPIC_BYTES = 1024
DEFAULT_MAX_ITEMS = 16
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutboxItem:
    """One update waiting for the broker's acknowledgement."""

    id: str
    topic: str
    round_id: int
    deadline_unix: float
    created_unix: float
    data: bytes

    def expired(self, now_unix: float | None = None) -> bool:
        """True once the round's report deadline has passed: sending it would be wasted."""
        return (time.time() if now_unix is None else now_unix) > self.deadline_unix


class OutboxCorrupt(ValueError):
    """An outbox file that cannot be trusted (torn write, bit rot, foreign file)."""


def encode_item(item: OutboxItem) -> bytes:
    topic = item.topic.encode("utf-8")
    header = _HEADER.pack(MAGIC, FORMAT, 0, len(topic), item.round_id, item.deadline_unix,
                          item.created_unix, len(item.data), 0)
    crc = zlib.crc32(item.data, zlib.crc32(topic, zlib.crc32(header)))
    return header[:_CRC_OFFSET] + struct.pack("<I", crc) + topic + item.data


def decode_item(item_id: str, raw: bytes) -> OutboxItem:
    """Parse one file's bytes; OutboxCorrupt saying what is wrong, never anything else."""
    if len(raw) < _HEADER.size:
        raise OutboxCorrupt(f"{len(raw)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, fmt, flags, topic_len, round_id, deadline, created, data_len, crc = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise OutboxCorrupt(f"magic {magic!r} is not {MAGIC!r}")
    if fmt != FORMAT:
        raise OutboxCorrupt(f"format {fmt}, this client reads {FORMAT}")
    if flags:
        raise OutboxCorrupt("reserved flags are set")
    if len(raw) != _HEADER.size + topic_len + data_len:
        raise OutboxCorrupt(f"{len(raw)} bytes, header announces {_HEADER.size + topic_len + data_len}")
    header = raw[:_CRC_OFFSET] + b"\0\0\0\0"
    actual = zlib.crc32(raw[_HEADER.size:], zlib.crc32(header))
    if actual != crc:
        raise OutboxCorrupt(f"crc32 {actual:08x} does not match {crc:08x}")
    try:
        topic = raw[_HEADER.size:_HEADER.size + topic_len].decode("utf-8")
    except UnicodeDecodeError:
        raise OutboxCorrupt("topic is not UTF-8") from None
    return OutboxItem(item_id, topic, round_id, deadline, created, raw[_HEADER.size + topic_len:])


class Outbox:
    """Updates kept on disk until acknowledged; see the module docstring.

    Thread-safe: the training thread `put`s while paho's network thread calls `mark_sent`.
    """

    def __init__(self, directory: Path, *, max_items: int = DEFAULT_MAX_ITEMS,
                 max_bytes: int = DEFAULT_MAX_BYTES, keyring: Keyring | None = None) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"outbox limits must be >= 1, got max_items={max_items}, max_bytes={max_bytes}")
        self.directory = Path(directory)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.keyring = keyring
        self._lock = threading.Lock()
        # item id -> deadline on the monotonic clock, for items put by this process: a wall clock that
        # jumps (NTP, a dead RTC battery, the user) must not expire an update whose round is still open
        self._monotonic_deadline: dict[str, float] = {}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.directory.glob(".*.tmp"):  # a crash mid-write: never renamed, never valid
            log.info("outbox: removing unfinished write %s", leftover.name)
            leftover.unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------------
    def put(self, topic: str, round_id: int, deadline_unix: float, data: bytes) -> str:
        """Store an update durably (call BEFORE publishing it); returns its id."""
        if not isinstance(topic, str) or not topic or len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise ValueError(f"outbox topic must be a non-empty string of at most {MAX_TOPIC_BYTES} bytes")
        if not isinstance(round_id, int) or not 0 <= round_id < 2**32:
            raise ValueError(f"round_id must be an int in 0..2^32-1, got {round_id!r}")
        data = bytes(data)
        created = time.time()
        item_id = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        blob = encode_item(OutboxItem(item_id, topic, round_id, float(deadline_unix), created, data))
        if self.keyring is not None:
            blob = self.keyring.seal(blob, self._aad(item_id))
        if len(blob) > self.max_bytes:
            raise ValueError(f"update of {len(blob)} bytes does not fit the outbox limit of {self.max_bytes} bytes")
        with self._lock:
            self._write_atomic(item_id, blob)
            self._evict_locked(keep=item_id)
            self._monotonic_deadline[item_id] = time.monotonic() + (float(deadline_unix) - created)
        log.debug("outbox: stored %s (round %d, %d bytes)", item_id, round_id, len(data))
        return item_id

    def _write_atomic(self, item_id: str, blob: bytes) -> None:
        tmp = self.directory / f".{item_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path(item_id))
        fsync_directory(self.directory)

    def _evict_locked(self, keep: str) -> None:
        files = self._files_locked()
        total = sum(size for _, size in files)
        count = len(files)
        for item_id, size in files:  # oldest first
            if count <= self.max_items and total <= self.max_bytes:
                break
            if item_id == keep:
                continue
            log.warning("outbox: evicting %s (%d bytes): over the limit of %d items / %d bytes",
                        item_id, size, self.max_items, self.max_bytes)
            self._path(item_id).unlink(missing_ok=True)
            self._monotonic_deadline.pop(item_id, None)
            count -= 1
            total -= size

    # -- reading -----------------------------------------------------------------------------
    def pending(self) -> list[OutboxItem]:
        """Every stored item, oldest first; corrupt files are logged and removed."""
        items: list[OutboxItem] = []
        with self._lock:
            for item_id, _ in self._files_locked():
                path = self._path(item_id)
                try:
                    items.append(decode_item(item_id, self._open(item_id, path.read_bytes())))
                except FileNotFoundError:
                    continue
                except StoreKeyError as exc:
                    log.error("outbox: skipping %s: %s", path.name, exc)
                except (OutboxCorrupt, SealedDataCorrupt, OSError) as exc:
                    log.warning("outbox: removing corrupt item %s: %s", path.name, exc)
                    path.unlink(missing_ok=True)
        items.sort(key=lambda item: (item.created_unix, item.id))
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._files_locked())

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._files_locked())

    # -- removal -----------------------------------------------------------------------------
    def expired(self, item: OutboxItem) -> bool:
        """Whether `item`'s round deadline has passed: on the monotonic clock for items this
        process stored (immune to wall-clock jumps), on the wall clock for items found on disk
        after a restart (the only clock that survives one; a wrong guess there costs one refused
        re-send, since the aggregator judges rounds on its own clock)."""
        deadline = self._monotonic_deadline.get(item.id)
        return item.expired() if deadline is None else time.monotonic() > deadline

    def mark_sent(self, item_id: str) -> None:
        """The broker acknowledged the item (PUBACK): forget it. Unknown ids are ignored."""
        with self._lock:
            self._path(item_id).unlink(missing_ok=True)
            self._monotonic_deadline.pop(item_id, None)
        log.debug("outbox: %s acknowledged", item_id)

    def drop(self, item_id: str, reason: str) -> None:
        """Give up on an item (round closed, rejected...), saying why in the log."""
        with self._lock:
            self._path(item_id).unlink(missing_ok=True)
            self._monotonic_deadline.pop(item_id, None)
        log.info("outbox: dropped %s: %s", item_id, reason)

    # -- sealing -----------------------------------------------------------------------------
    @staticmethod
    def _aad(item_id: str) -> bytes:
        return b"fedboard/outbox/v1\0" + item_id.encode("utf-8")

    def _open(self, item_id: str, raw: bytes) -> bytes:
        if not is_sealed(raw):
            return raw  # a plain item (an older client); decode_item checks it
        if self.keyring is None:
            raise StoreKeyError("sealed, and this outbox has no store key")
        return self.keyring.open(raw, self._aad(item_id), f"outbox item {item_id}")

    def check_key(self) -> None:
        """StoreKeyError if any item is sealed with a key the keyring does not hold."""
        if self.keyring is None:
            return
        with self._lock:
            for item_id, _ in self._files_locked():
                try:
                    with open(self._path(item_id), "rb") as fh:
                        head = fh.read(64)
                except FileNotFoundError:
                    continue
                key_id = sealed_key_id(head)
                if key_id is not None and not self.keyring.has(key_id):
                    raise StoreKeyError(f"outbox item {self._path(item_id)} is sealed with another key "
                                        f"(key id {key_id.hex()}, the store key given has id "
                                        f"{self.keyring.current.key_id.hex()}): wrong store key; nothing was changed")

    def reseal(self) -> int:
        """Rewrite every item not sealed with the current key (plain, or the old key of a rotation),
        each atomically; returns how many. Corrupt items are left for `pending()` to remove."""
        if self.keyring is None:
            return 0
        done = 0
        with self._lock:
            for item_id, _ in self._files_locked():
                try:
                    raw = self._path(item_id).read_bytes()
                    if sealed_key_id(raw) == self.keyring.current.key_id:
                        continue
                    plain = self._open(item_id, raw)
                    decode_item(item_id, plain)
                except FileNotFoundError:
                    continue
                except (OutboxCorrupt, SealedDataCorrupt):
                    continue
                self._write_atomic(item_id, self.keyring.seal(plain, self._aad(item_id)))
                done += 1
        return done

    # -- helpers -----------------------------------------------------------------------------
    def _path(self, item_id: str) -> Path:
        if not item_id or "/" in item_id or item_id.startswith("."):
            raise ValueError(f"not an outbox item id: {item_id!r}")
        return self.directory / f"{item_id}{SUFFIX}"

    def _files_locked(self) -> list[tuple[str, int]]:
        """(id, size) of the stored items, oldest first (ids start with a nanosecond time)."""
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                found.append((path.name[: -len(SUFFIX)], path.stat().st_size))
            except FileNotFoundError:
                continue
        found.sort()
        return found
