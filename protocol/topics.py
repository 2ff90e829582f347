"""MQTT topic names of one fleet: the only place that spells them.

Retained topics hold the fleet's state (current model, bundle, round plan) so a device that
wakes up learns it at once; per-device topics let a broker ACL (`pattern write .../%u`)
confine each device to its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import EnvelopeError, Reason

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")  # \Z: `$` would accept a trailing newline


def check_id(kind: str, value: str) -> str:
    """Fleet and device ids become topic levels: no wildcards, slashes or spaces."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise EnvelopeError(
            Reason.BAD_FIELD,
            f"{kind} id {value!r} is not allowed: use 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric)",
        )
    return value


def slugify(name: str, taken: set[str] | None = None) -> str:
    """Turn a user name ('FIRST CITIZEN') into a valid, unique device id ('first-citizen')."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:56] or "device"
    candidate, n = base, 1
    while taken is not None and candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    if taken is not None:
        taken.add(candidate)
    return candidate


@dataclass(frozen=True)
class FleetTopics:
    """Topic names under `fedboard/<fleet>/`."""

    fleet: str
    prefix: str = "fedboard"

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    # retained fleet state
    @property
    def model(self) -> str:
        """Signed manifest + full global weights, one retained message so they never disagree."""
        return f"{self.root}/model/current"

    @property
    def model_delta(self) -> str:
        """Signed manifest + weights as a delta against the previous version (smaller)."""
        return f"{self.root}/model/delta"

    @property
    def model_int8(self) -> str:
        """Int8 inference model for suggestions, published beside the global model."""
        return f"{self.root}/model/int8"

    @property
    def bundle(self) -> str:
        """The TFLite training bundle (graph + vocabulary), once per model id."""
        return f"{self.root}/model/bundle"

    @property
    def round(self) -> str:
        return f"{self.root}/round/current"

    # per-device topics
    def checkin(self, device: str) -> str:
        return f"{self.root}/checkin/{check_id('device', device)}"

    def assign(self, device: str) -> str:
        return f"{self.root}/assign/{check_id('device', device)}"

    def update(self, device: str) -> str:
        return f"{self.root}/update/{check_id('device', device)}"

    def ack(self, device: str) -> str:
        return f"{self.root}/ack/{check_id('device', device)}"

    def status(self, device: str) -> str:
        return f"{self.root}/status/{check_id('device', device)}"

    # secure aggregation (aggregator/PRIVACY.md): device -> server on up/<device>, server -> one
    # device on down/<device>, server -> the cohort on the retained roster and unmask topics
    def secagg_up(self, device: str) -> str:
        return f"{self.root}/secagg/up/{check_id('device', device)}"

    def secagg_down(self, device: str) -> str:
        return f"{self.root}/secagg/down/{check_id('device', device)}"

    @property
    def secagg_roster(self) -> str:
        """Retained KeyRoster of the current secure round (it carries its round id)."""
        return f"{self.root}/secagg/roster"

    @property
    def secagg_unmask(self) -> str:
        """Retained UnmaskRequest of the current secure round."""
        return f"{self.root}/secagg/unmask"

    # wildcard subscriptions of the aggregator
    @property
    def all_checkins(self) -> str:
        return f"{self.root}/checkin/+"

    @property
    def all_updates(self) -> str:
        return f"{self.root}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.root}/status/+"

    @property
    def all_secagg_up(self) -> str:
        return f"{self.root}/secagg/up/+"

    def device_of(self, topic: str) -> str:
        """The device id that is the last level of a per-device topic."""
        head, _, device = topic.rpartition("/")
        if not head.startswith(self.root + "/"):
            raise EnvelopeError(Reason.BAD_FIELD, f"topic {topic!r} is not under {self.root}/")
        return check_id("device", device)
