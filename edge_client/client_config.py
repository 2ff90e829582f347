"""`client.toml`: everything a real device needs, read once at start-up and checked strictly.

A device is configured by someone editing a file over SSH; a typo must stop the client at
once with a message that names the file, the section and the key, not surface hours later
as a device that silently never trains. So unknown sections and keys, wrong types and
missing required keys are all a `ConfigError`. Relative paths are taken relative to the
config file, so a config and its keys can move together.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.eligibility import EligibilityPolicy
from edge_client.local_dp import LocalDPConfig
from protocol.topics import ID_PATTERN
from protocol.transport import MqttSettings

DEFAULT_STATE_DIR = "/var/lib/fedboard"
DEFAULT_KEY_FILE = "store.key"  # beside client.toml, outside the state directory


class ConfigError(ValueError):
    """A client config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class DeviceSection:
    id: str
    fleet: str
    state_dir: Path
    data: Path                 # the text store (SQLite file)
    key_file: Path | None = None  # the store key when no systemd credential gives it (edge_client/store_keys.py)


@dataclass(frozen=True)
class BrokerSection:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None  # read when connecting, so the secret is not in client.toml
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    mqtt_version: int = 5
    keepalive_s: int = 60
    bootstrap_timeout_s: float = 60.0  # how long to wait for the retained model and bundle


@dataclass(frozen=True)
class TrustSection:
    aggregator_public_key: Path


@dataclass(frozen=True)
class StoreSection:
    max_age_days: float | None = 90.0
    max_rows: int | None = 50_000


@dataclass(frozen=True)
class TrainingSection:
    threads: int = 1


@dataclass(frozen=True)
class PrivacySection:
    """Local DP: the device owner's choice, never the round plan's (see edge_client/local_dp.py)."""

    local_dp: LocalDPConfig | None = None   # None = updates leave without local noise


@dataclass(frozen=True)
class PlatformSection:
    metered_interfaces: tuple[str, ...] = ()
    unmetered_interfaces: tuple[str, ...] = ()
    idle_after_s: float = 60.0


@dataclass(frozen=True)
class ClientConfig:
    """A parsed, checked `client.toml`; build it with `load_client_config`."""

    path: Path
    device: DeviceSection
    broker: BrokerSection
    trust: TrustSection
    policy: EligibilityPolicy
    store: StoreSection
    training: TrainingSection
    platform: PlatformSection
    privacy: PrivacySection = PrivacySection()

    def check_files(self) -> None:
        """ConfigError naming the key if a file the config points to is missing or unreadable.

        Separate from loading, so a config can be checked (and the example loaded) on a machine
        that does not hold the keys.
        """
        for section, key, path in (
            ("trust", "aggregator_public_key", self.trust.aggregator_public_key),
            ("broker", "password_file", self.broker.password_file), ("broker", "tls_ca", self.broker.tls_ca),
            ("broker", "tls_cert", self.broker.tls_cert), ("broker", "tls_key", self.broker.tls_key),
        ):
            if path is not None and not os.access(path, os.R_OK):
                why = "not readable by this user" if path.exists() else "not found"
                raise ConfigError(f"{self.path}: [{section}] {key}: file {path} {why}")

    def broker_password(self) -> str | None:
        """The password, read from password_file when that is how it is given."""
        b = self.broker
        if b.password_file is None:
            return b.password
        try:
            password = b.password_file.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{self.path}: [broker] password_file: cannot read {b.password_file}: "
                              f"{exc.strerror}") from None
        if not password:
            raise ConfigError(f"{self.path}: [broker] password_file: {b.password_file} is empty")
        return password

    def mqtt_settings(self) -> MqttSettings:
        b = self.broker
        return MqttSettings(
            host=b.host, port=b.port, username=b.username, password=self.broker_password(),
            tls_ca=str(b.tls_ca) if b.tls_ca else None, tls_cert=str(b.tls_cert) if b.tls_cert else None,
            tls_key=str(b.tls_key) if b.tls_key else None, tls_insecure=b.tls_insecure,
            keepalive_s=b.keepalive_s, mqtt_version=b.mqtt_version,
        )


# -- loading -------------------------------------------------------------------------------------
_UNSET = object()


def _finite(value: int | float) -> bool:
    """math.isfinite without the OverflowError TOML integers beyond float range would raise."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class _Section:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, file: str, name: str, table: Mapping[str, Any], base: Path) -> None:
        self.file, self.name, self.table, self.base = file, name, table, base
        self.used: set[str] = set()

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.file}: [{self.name}] {key}: {why}")

    def given(self, key: str, default: Any) -> bool:
        """Whether the file sets `key`; raises if it does not and the key is required."""
        self.used.add(key)
        if key in self.table:
            return True
        if default is _UNSET:
            raise self.error(key, "missing (required)")
        return False

    def string(self, key: str, default: Any = _UNSET) -> Any:
        if not self.given(key, default):
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def ident(self, key: str) -> str:
        value = self.string(key)
        if not ID_PATTERN.match(value):
            raise self.error(key, f"{value!r} is not an id: use 1-64 of A-Z a-z 0-9 _ . - starting alphanumeric")
        return value

    def integer(self, key: str, default: Any, lo: int, hi: int | None = None) -> Any:
        if not self.given(key, default):
            return default
        value = self.table[key]
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise self.error(key, f"expected an integer {rng}, got {value!r}")
        return value

    def number(self, key: str, default: Any, lo: float, *, strict: bool = False) -> Any:
        if not self.given(key, default):
            return default
        value = self.table[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        if not ok or value < lo or (strict and value == lo):
            bound = f"> {lo:g}" if strict else f">= {lo:g}"
            raise self.error(key, f"expected a number {bound}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        if not self.given(key, default):
            return default
        value = self.table[key]
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = _UNSET) -> Any:
        if not self.given(key, default):
            return default
        text = self.string(key)
        if "\0" in text:
            raise self.error(key, "a path cannot contain a NUL character")
        try:
            path = Path(text).expanduser()
            return path if path.is_absolute() else (self.base / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. ~nosuchuser, a symlink loop
            raise self.error(key, f"not a usable path: {exc}") from None

    def strings(self, key: str) -> tuple[str, ...]:
        if not self.given(key, ()):
            return ()
        value = self.table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"expected a list of non-empty strings, got {value!r}")
        return tuple(value)

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], f"unknown key (known keys: {', '.join(sorted(self.used))})")


_SECTIONS = ("device", "broker", "trust", "policy", "store", "training", "platform", "privacy")


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and check `client.toml`; ConfigError (a ValueError) naming the file and key if it is wrong."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found (copy edge_client/deploy/client.example.toml)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # tomllib: a 4,300+ digit integer, arrays nested too deep
        raise ConfigError(f"{file}: not valid TOML: {str(exc)[:200]}") from None
    for name, value in doc.items():
        if name not in _SECTIONS:
            known = ", ".join(f"[{s}]" for s in _SECTIONS)
            raise ConfigError(f"{file}: unknown section [{name}] (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {name} must be a section [{name}], not a plain key")
    base = path.resolve().parent

    def section(name: str, required: bool) -> _Section:
        if required and name not in doc:
            raise ConfigError(f"{file}: missing section [{name}]")
        return _Section(file, name, doc.get(name, {}), base)

    s = section("device", True)
    state_dir = s.path("state_dir", Path(DEFAULT_STATE_DIR))
    device = DeviceSection(id=s.ident("id"), fleet=s.ident("fleet"), state_dir=state_dir,
                           data=s.path("data", state_dir / "texts.db"),
                           key_file=s.path("key_file", base / DEFAULT_KEY_FILE))
    s.check_unknown()

    s = section("broker", True)
    broker = _broker(s)
    s.check_unknown()

    s = section("trust", True)
    trust = TrustSection(aggregator_public_key=s.path("aggregator_public_key"))
    s.check_unknown()

    s = section("policy", False)
    policy = _policy(s)

    s = section("store", False)
    max_age = s.number("max_age_days", 90.0, 0.0)
    max_rows = s.integer("max_rows", 50_000, 0)
    # 0 means "no limit": keep texts forever / any number of them.
    store = StoreSection(max_age_days=max_age or None, max_rows=max_rows or None)
    s.check_unknown()

    s = section("training", False)
    training = TrainingSection(threads=s.integer("threads", 1, 1, 64))
    s.check_unknown()

    s = section("platform", False)
    platform = PlatformSection(metered_interfaces=s.strings("metered_interfaces"),
                               unmetered_interfaces=s.strings("unmetered_interfaces"),
                               idle_after_s=s.number("idle_after_s", 60.0, 0.0))
    s.check_unknown()

    s = section("privacy", False)
    privacy = _privacy(s)
    s.check_unknown()

    return ClientConfig(path=path.resolve(), device=device, broker=broker, trust=trust, policy=policy,
                        store=store, training=training, platform=platform, privacy=privacy)


def _privacy(s: _Section) -> PrivacySection:
    clip = s.number("local_dp_clip", 0.0, 0.0)
    epsilon = s.number("local_dp_epsilon", None, 0.0, strict=True)
    delta = s.number("local_dp_delta", 1e-5, 0.0, strict=True)
    if not clip:
        if epsilon is not None:
            raise s.error("local_dp_epsilon", "set local_dp_clip (the L2 bound of an update) too, or remove it")
        return PrivacySection()
    if epsilon is None:
        raise s.error("local_dp_epsilon", "missing: local DP (local_dp_clip > 0) needs an epsilon per update")
    if delta >= 1.0:
        raise s.error("local_dp_delta", f"expected a number in (0, 1), got {delta!r}")
    return PrivacySection(LocalDPConfig(clip=clip, epsilon=epsilon, delta=delta))


def _broker(s: _Section) -> BrokerSection:
    host = s.string("host")
    tls_ca = s.path("tls_ca", None)
    port = s.integer("port", 8883 if tls_ca else 1883, 1, 65535)
    username = s.string("username", None)
    password = s.string("password", None)
    password_file = s.path("password_file", None)
    if password is not None and password_file is not None:
        raise s.error("password_file", "give either password or password_file, not both")
    if (password is not None or password_file is not None) and username is None:
        raise s.error("username", "missing: a password needs a username")
    tls_cert, tls_key = s.path("tls_cert", None), s.path("tls_key", None)
    if (tls_cert is None) != (tls_key is None):
        raise s.error("tls_key" if tls_key is None else "tls_cert", "tls_cert and tls_key go together")
    if tls_cert is not None and tls_ca is None:
        raise s.error("tls_ca", "missing: a client certificate needs TLS (set tls_ca)")
    version = s.table["mqtt_version"] if s.given("mqtt_version", 5) else 5
    if isinstance(version, bool) or version not in (3, 5):
        raise s.error("mqtt_version", f"expected 5 or 3 (MQTT 3.1.1), got {version!r}")
    return BrokerSection(
        host=host, port=port, username=username, password=password, password_file=password_file,
        tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_insecure=s.boolean("tls_insecure", False),
        mqtt_version=version,
        keepalive_s=s.integer("keepalive_s", 60, 5, 3600),
        bootstrap_timeout_s=s.number("bootstrap_timeout_s", 60.0, 0.0, strict=True),
    )


def _policy(s: _Section) -> EligibilityPolicy:
    fields = {f.name: f for f in dataclasses.fields(EligibilityPolicy)}
    for key in s.table:
        if key not in fields:
            raise s.error(key, f"unknown key (known keys: {', '.join(sorted(fields))})")
    for key, value in s.table.items():
        if fields[key].type in ("bool", bool):
            if not isinstance(value, bool):
                raise s.error(key, f"expected true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise s.error(key, f"expected a number, got {value!r}")
    try:
        return EligibilityPolicy.from_dict(dict(s.table))
    except ValueError as exc:
        bad = next((k for k in s.table if k in str(exc)), "")
        raise ConfigError(f"{s.file}: [policy] {bad + ': ' if bad else ''}{exc}") from None
