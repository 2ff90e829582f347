"""Where a device's store key comes from, and how a new one is staged and switched.

Under systemd the key is a service credential (`LoadCredentialEncrypted=` seals it to the
machine, `LoadCredential=` copies a root-only file): the client reads it from
`$CREDENTIALS_DIRECTORY/fedboard-store-key`, a private ramfs that only the service sees, so the
key is never stored in plain form beside the data. Elsewhere (a shell, `add-text`, a test) it
is `[device] key_file`, a file of mode 0600 kept outside the state directory by default
(beside client.toml).

Rotation (`fedboard client rotate-key`) stages the new key as `<key_file>.next` before any
data is re-encrypted, and switches it in with one rename after. While `.next` exists both keys
are readable, so a crash at any point leaves every record readable; running rotate-key again
finishes the job with the staged key.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edge_client.sealing import Keyring, StoreKey, StoreKeyError

log = logging.getLogger(__name__)

CREDENTIAL_NAME = "fedboard-store-key"


@dataclass(frozen=True)
class KeySource:
    """Where to look for the key: a systemd credential first, then the key file."""

    key_file: Path
    credential: str = CREDENTIAL_NAME

    @property
    def staged_file(self) -> Path:
        return self.key_file.with_name(self.key_file.name + ".next")

    def credential_path(self) -> Path | None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None
        path = Path(directory) / self.credential
        return path if path.exists() else None


def read_key_file(path: Path) -> StoreKey:
    """A key file's key; StoreKeyError if it is missing, unreadable, too open or malformed."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreKeyError(f"store key {path} not found") from None
    except OSError as exc:
        raise StoreKeyError(f"cannot read the store key {path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreKeyError(f"store key {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must be readable by "
                            f"its owner only (chmod 600 {path})")
    return StoreKey.parse(raw, str(path))


def write_key_file(path: Path, key: StoreKey) -> None:
    """Write a key durably, mode 0600 (temp + fsync + rename + directory fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def load_keyring(source: KeySource, *, create: bool = False) -> Keyring:
    """The device's keyring: the credential or key file, plus a staged rotation key if one exists.

    With `create` (the caller found no sealed data yet) a missing key file is made, mode 0600;
    otherwise a missing key is a StoreKeyError that says where the key was looked for.
    """
    credential = source.credential_path()
    if credential is not None:
        current = StoreKey.parse(_read(credential), f"systemd credential {source.credential}")
    elif source.key_file.exists():
        current = read_key_file(source.key_file)
    elif create:
        current = StoreKey.generate()
        try:
            write_key_file(source.key_file, current)
        except OSError as exc:
            raise StoreKeyError(f"cannot create the store key {source.key_file}: {exc.strerror}; create it "
                                f"yourself (`openssl rand -hex 32 > {source.key_file}; chmod 600 "
                                f"{source.key_file}`) or set [device] key_file") from None
        log.warning("created a new store key %s (mode 0600): the typed text is encrypted with it; "
                    "lose it and the stored text is lost", source.key_file)
    else:
        env = os.environ.get("CREDENTIALS_DIRECTORY")
        where = f"$CREDENTIALS_DIRECTORY/{source.credential}" if env else f"systemd credential {source.credential}"
        raise StoreKeyError(f"no store key: neither {where} nor the key file {source.key_file} exists, and this "
                            "device holds encrypted data; restore the key (or set [device] key_file to it)")
    staged = source.staged_file
    extra = (read_key_file(staged),) if staged.exists() else ()
    if extra:
        log.warning("a key rotation was interrupted (%s exists): run `fedboard client rotate-key` to finish it",
                    staged)
    return Keyring(current, extra)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreKeyError(f"cannot read the store key {path}: {exc.strerror}") from None
