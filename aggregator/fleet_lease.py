"""The fleet lease: one aggregator serves a fleet, and a second one says so and stops.

Two aggregators on one fleet (separate state directories, started by mistake) would share the
MQTT session of the aggregator's broker user (the generated broker configuration binds client
ids to usernames) and knock each other off the broker about once a second, each folding part
of the updates into its own model. So the serving aggregator holds a LEASE: a retained message
on `fedboard/<fleet>/agg/lease` (only the aggregator's broker user may write under `agg/`),
with its owner and a heartbeat it renews every `lease_interval_s`. An aggregator that starts
reads the lease before it processes (and acknowledges) anything: a fresh lease of another
owner makes it refuse to start (`FleetTaken`, exit code 4); a lease of another owner that
appears while it runs (a concurrent start) makes it stop the same way. A clean stop releases
the lease; after a crash it expires after `LEASE_TTL_INTERVALS` missed heartbeats.

The owner is stable per state directory (a token kept in the checkpoint directory), so an
aggregator restarted after `kill -9` on its own state takes its lease back at once; without a
checkpoint directory each process is its own owner.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import EnvelopeError, Reason
from protocol.topics import FleetTopics

FLEET_TAKEN_EXIT = 4          # `fedboard aggregator`'s exit code when another aggregator serves the fleet
LEASE_TTL_INTERVALS = 3.0     # a lease without a heartbeat for this many intervals has expired
OWNER_FILE = "lease-owner"
_CODEC = "fedboard-lease"


class FleetTaken(RuntimeError):
    """Another aggregator serves this fleet: this one must not take updates (it stops, exit code 4)."""


@dataclass(frozen=True)
class Lease:
    """Who serves the fleet, and until when without a new heartbeat."""

    owner: str
    host: str
    pid: int
    heartbeat_unix: float
    ttl_s: float
    released: bool = False

    def fresh(self, now_unix: float) -> bool:
        """Held and heard from within its time to live (wall clocks: keep the aggregators' hosts in NTP)."""
        return not self.released and now_unix - self.heartbeat_unix < self.ttl_s

    def describe(self, now_unix: float) -> str:
        return (f"owner {self.owner} on {self.host} pid {self.pid}, last heartbeat "
                f"{max(0.0, now_unix - self.heartbeat_unix):.1f} s ago")

    def encode(self, fleet: str) -> bytes:
        return Envelope(Kind.STATUS, fleet, "", codec=_CODEC, meta={"type": "lease", **asdict(self)}).encode()

    @classmethod
    def decode(cls, fleet: str, payload: bytes) -> "Lease":
        env = decode_envelope(payload, expect=Kind.STATUS)
        m = env.meta
        if env.codec != _CODEC or env.fleet != fleet or m.get("type") != "lease":
            raise EnvelopeError(Reason.BAD_FIELD, "not a lease message of this fleet")
        try:
            return cls(str(m["owner"]), str(m["host"]), int(m["pid"]), float(m["heartbeat_unix"]),
                       float(m["ttl_s"]), bool(m.get("released", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeError(Reason.BAD_FIELD, f"lease message lacks a field or has a wrong type: {exc}") from None


def lease_topic(topics: FleetTopics) -> str:
    return f"{topics.root}/agg/lease"


def probe_topic(topics: FleetTopics, owner: str) -> str:
    """An echo that tells the aggregator every retained message of its earlier subscriptions has arrived."""
    return f"{topics.root}/agg/lease-probe/{owner}"


def owner_token(checkpoint_dir: str | None) -> str:
    """The same token for every run on one state directory; a fresh one per process without it."""
    if checkpoint_dir is None:
        return "p-" + secrets.token_hex(8)
    path = Path(checkpoint_dir) / OWNER_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
        if token.isalnum() and 8 <= len(token) <= 64:
            return token
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    token = secrets.token_hex(8)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(OWNER_FILE + ".tmp")
    tmp.write_text(token + "\n", encoding="ascii")
    os.replace(tmp, path)
    return token


class FleetLease:
    """One aggregator's view of the lease: what to publish, and whether another owner holds it."""

    def __init__(self, topics: FleetTopics, owner: str, interval_s: float) -> None:
        self.topics = topics
        self.owner = owner
        self.interval_s = interval_s
        self.topic = lease_topic(topics)
        self.probe = probe_topic(topics, owner)
        self.host = socket.gethostname()

    def message(self, *, released: bool = False) -> bytes:
        lease = Lease(self.owner, self.host, os.getpid(), time.time(), self.interval_s * LEASE_TTL_INTERVALS, released)
        return lease.encode(self.topics.fleet)

    def check_before_start(self, retained: Lease | None) -> None:
        """Refuse to serve the fleet while another owner's lease is fresh."""
        now = time.time()
        if retained is not None and retained.owner != self.owner and retained.fresh(now):
            raise FleetTaken(
                f"another aggregator serves fleet {self.topics.fleet!r} ({retained.describe(now)}): this one "
                f"stops without taking any update. Run ONE aggregator per fleet; if the other one is gone for "
                f"good, start this one again after its lease expires ({retained.ttl_s:.0f} s without heartbeat)")

    def foreign(self, payload: bytes) -> str:
        """'' for our own (or a released, or an unreadable) lease; else why this aggregator must stop."""
        if not payload:
            return ""
        try:
            lease = Lease.decode(self.topics.fleet, payload)
        except EnvelopeError:
            return ""
        if lease.owner == self.owner or lease.released:
            return ""
        return (f"another aggregator claimed fleet {self.topics.fleet!r} ({lease.describe(time.time())}): two "
                f"aggregators must not serve one fleet, so this one stops now (what it acknowledged is in its "
                f"checkpoint; the broker keeps the rest). Run ONE aggregator per fleet")


def parse_retained(fleet: str, payload: bytes) -> Lease | None:
    """The retained lease, or None for none (an empty or unreadable message holds nothing)."""
    if not payload:
        return None
    try:
        return Lease.decode(fleet, payload)
    except EnvelopeError:
        return None


__all__ = ["FLEET_TAKEN_EXIT", "FleetLease", "FleetTaken", "Lease", "lease_topic", "owner_token", "parse_retained"]
