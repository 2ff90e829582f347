"""A device's data at rest as a whole: its store key, the check before start, key rotation.

Three stores hold what is derived from the user's typing: the text store (`[device] data`),
the error-feedback residual and the outbox (in `state_dir`). All three are sealed with one
per-device key (edge_client/store_keys.py says where it lives). Before the client, `add-text`
or `rotate-key` writes anything, every store is checked against the key: a wrong or missing
key is a StoreKeyError and nothing is changed. A device with no sealed data yet gets a new
key file on first use; plain files of an older client are sealed in place.

`rotate_key` is crash-safe: the new key is staged (`<key_file>.next`) before any record is
re-sealed, the text store is re-sealed in one SQLite transaction, the residual and each outbox
item by temp file + fsync + rename, and only then is the staged key renamed over the old one.
A kill at any point leaves every record readable (both keys are loaded while `.next` exists);
running rotate-key again finishes with the staged key.

Rotation must not run beside a client or an `add-text` that holds the old key (what they wrote
after the switch would be sealed with a key that is gone): every user of the stores holds a
shared lock on `state_dir/.store.lock` and rotate-key takes it exclusively, so either one
waits for nothing and says clearly who is in the way.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_client.client_config import DEFAULT_KEY_FILE, ClientConfig
from edge_client.outbox import SUFFIX as OUTBOX_SUFFIX
from edge_client.outbox import Outbox
from edge_client.residuals import RESIDUAL_FILE, ResidualStore
from edge_client.sealing import Keyring, StoreKey, StoreKeyError, is_sealed
from edge_client.store_keys import KeySource, fsync_directory, load_keyring, read_key_file, write_key_file
from edge_client.textstore import TextStore

log = logging.getLogger(__name__)

OUTBOX_DIR = "outbox"
PAUSE_ENV = "FEDBOARD_ROTATE_KEY_PAUSE_AT"  # fault injection for the crash tests: pause at a step
ROTATION_STEPS = ("staged", "text-half", "text", "residual", "outbox", "switched")
LOCK_FILE = ".store.lock"


class StoresBusy(StoreKeyError):
    """Another process holds the stores in a way that conflicts (a rotation, or a running client)."""


class StateLock:
    """flock on `state_dir/.store.lock`: shared while a command uses the stores, exclusive for
    rotate-key. Never blocks: a conflict is a StoresBusy saying what to do."""

    def __init__(self, state_dir: Path, *, exclusive: bool) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd: int | None = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ValueError(f"state directory {state_dir} is not usable ({exc.strerror or exc}): it must be a "
                             "directory this user can write (systemd: StateDirectory=fedboard)") from None
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            if exclusive:
                raise StoresBusy(f"the stores in {state_dir} are in use (the client service or an add-text is "
                                 "running): stop the service (systemctl stop fedboard-client) and try again") from None
            raise StoresBusy(f"a store key rotation is running on {state_dir}: try again when "
                             "`fedboard client rotate-key` has finished") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def key_source(config: ClientConfig) -> KeySource:
    return KeySource(config.device.key_file or config.path.parent / DEFAULT_KEY_FILE)


def _sealed_data_exists(config: ClientConfig) -> bool:
    """Whether any store already holds sealed data (then a missing key is an error, not a first start)."""
    data = config.device.data
    if data.exists() and data.stat().st_size > 0:
        try:
            conn = sqlite3.connect(data, timeout=10.0)  # reads only; read-write so closing removes the WAL files
            try:
                if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() \
                        and conn.execute("SELECT 1 FROM meta WHERE key = 'key_id'").fetchone():
                    return True
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise StoreKeyError(f"text store {data} cannot be read ({exc}): it is not a fedboard text store") from None
    files = [config.device.state_dir / RESIDUAL_FILE,
             *(config.device.state_dir / OUTBOX_DIR).glob(f"*{OUTBOX_SUFFIX}")]
    for path in files:
        try:
            with open(path, "rb") as fh:
                if is_sealed(fh.read(64)):
                    return True
        except FileNotFoundError:
            continue
    return False


def device_keyring(config: ClientConfig) -> Keyring:
    """The device's keyring; a missing key is created only while no store holds sealed data."""
    return load_keyring(key_source(config), create=not _sealed_data_exists(config))


def open_text_store(config: ClientConfig, keyring: Keyring) -> TextStore:
    return TextStore(config.device.data, max_age_days=config.store.max_age_days, max_rows=config.store.max_rows,
                     keyring=keyring)


@dataclass
class DeviceStores:
    """The three sealed stores of a device, checked against its key."""

    text: TextStore
    residuals: ResidualStore
    outbox: Outbox
    lock: StateLock | None = None

    def close(self) -> None:
        self.text.close()
        if self.lock is not None:
            self.lock.release()


def open_device_stores(config: ClientConfig, keyring: Keyring, *, lock: bool = True) -> DeviceStores:
    """Check every store against the key (StoreKeyError, nothing written), then open them and seal
    what an older client left plain. Holds the shared store lock until `close()` (unless `lock`
    is False: the caller holds the exclusive one)."""
    state = config.device.state_dir
    held = StateLock(state, exclusive=False) if lock else None
    try:
        residuals = ResidualStore(state, keyring=keyring)
        outbox = Outbox(state / OUTBOX_DIR, keyring=keyring)
        residuals.check_key()
        outbox.check_key()
        text = open_text_store(config, keyring)  # checks its key before writing, seals plain rows
    except BaseException:
        if held is not None:
            held.release()
        raise
    try:
        if residuals.reseal():
            log.info("residual %s sealed with the store key", residuals.path)
        sealed = outbox.reseal()
        if sealed:
            log.info("outbox: %d item(s) sealed with the store key", sealed)
    except BaseException:
        text.close()
        if held is not None:
            held.release()
        raise
    return DeviceStores(text, residuals, outbox, held)


@dataclass(frozen=True)
class RotationReport:
    old_key_id: str
    new_key_id: str
    texts: int
    residual: bool
    outbox_items: int
    resumed: bool


def _pause_at(step: str) -> None:
    """The crash tests' fault point: with FEDBOARD_ROTATE_KEY_PAUSE_AT=step, say so and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"rotate-key: paused at {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def rotate_key(config: ClientConfig, *, key_file: Path | None = None, new_key: StoreKey | None = None,
               on_step: Callable[[str], None] = _pause_at) -> RotationReport:
    """Re-seal every store with a new key, crash-safe (see the module docstring); `key_file`
    replaces [device] key_file (e.g. a key taken out of its systemd credential for the rotation)."""
    source = KeySource(key_file) if key_file is not None else key_source(config)
    if source.credential_path() is not None:
        raise StoreKeyError(f"the store key comes from the systemd credential {source.credential}, which this "
                            "command cannot replace: stop the service and run rotate-key from a shell with "
                            "[device] key_file holding the key, then seal the new key file again "
                            "(README: Encryption at rest)")
    if not source.key_file.exists():
        raise StoreKeyError(f"no store key {source.key_file} to rotate: the device has never stored data with one "
                            "(any `fedboard client` command creates it), or [device] key_file points elsewhere")
    config = dataclasses.replace(config, device=dataclasses.replace(config.device, key_file=source.key_file))
    with StateLock(config.device.state_dir, exclusive=True):
        return _rotate_locked(config, source, new_key, on_step)


def _rotate_locked(config: ClientConfig, source: KeySource, new_key: StoreKey | None,
                   on_step: Callable[[str], None]) -> RotationReport:
    old = load_keyring(source)
    resumed = source.staged_file.exists()
    if resumed:
        staged = read_key_file(source.staged_file)
        if new_key is not None and new_key.key_id != staged.key_id:
            raise StoreKeyError(f"an interrupted rotation staged {source.staged_file}: finish it first "
                                "(run rotate-key without a new key)")
        new_key = staged
        log.warning("finishing the interrupted key rotation with %s", source.staged_file)
    stores = open_device_stores(config, old, lock=False)  # everything readable with the old (or staged) key?
    stores.close()
    if not resumed:
        new_key = new_key or StoreKey.generate()
        write_key_file(source.staged_file, new_key)
    assert new_key is not None
    on_step("staged")
    ring = Keyring(new_key, tuple(k for k in old.keys if k.key_id != new_key.key_id))
    text = open_text_store(config, ring)
    try:
        total = text.count()
        texts = text.rekey(ring, progress=lambda done: on_step("text-half") if done == total // 2 else None)
    finally:
        text.close()
    on_step("text")
    residual = ResidualStore(config.device.state_dir, keyring=ring).reseal()
    on_step("residual")
    items = Outbox(config.device.state_dir / OUTBOX_DIR, keyring=ring).reseal()
    on_step("outbox")
    os.replace(source.staged_file, source.key_file)
    fsync_directory(source.key_file.parent)
    on_step("switched")
    report = RotationReport(old.current.key_id.hex(), new_key.key_id.hex(), texts, residual, items, resumed)
    log.info("store key rotated: %s", report)
    return report
