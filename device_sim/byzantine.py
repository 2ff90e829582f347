"""Byzantine devices for the simulator: real clients whose update is corrupted before it is encoded.

Why: robust aggregation is only worth its cost if it is measured against the faults it claims
to survive. A Byzantine device here trains honestly through the real `DeviceClient` (same data,
same interpreter, same codec), and only the finished delta is corrupted, through the client's
`update_transform` hook, just before encoding:

- ``scale``:    delta * factor (default 10; ``scale=-20`` scales and flips at once)
- ``signflip``: -delta
- ``nan``:      every value NaN. The codec's encoder refuses non-finite values, so the payload is
                built by the codec's own stages without that check: NaN really goes on the wire,
                and the aggregator's validation is what stops it.
- ``mixed``:    each Byzantine device gets one of the three, in turn.

Which devices are Byzantine is decided by the seed alone (a permutation of the device indices),
so a sharded fleet agrees on it and the same seed gives the same attackers in every run.
`ByzantineFleet` also records what became of the attackers' updates (selected, sent, accepted,
rejected with reason, clipped by the aggregator) for the report's "byzantine" section.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_client.device import UpdateTransform
from protocol.codec.container import ByteWriter
from protocol.codec.pipeline import FORMAT_VERSION, Codec

log = logging.getLogger(__name__)

ATTACKS = ("scale", "signflip", "nan")
ATTACK_KINDS = ATTACKS + ("mixed",)
DEFAULT_SCALE = 10.0
SPEC_HELP = ("FRACTION:ATTACK[=FACTOR] with ATTACK one of scale, signflip, nan, mixed and FACTOR the "
             f"multiplier of 'scale' (and of mixed's scale devices; default {DEFAULT_SCALE:g}), "
             "e.g. '0.1:mixed', '0.1:scale=-20', '0.05:nan'")


@dataclass(frozen=True)
class ByzantineConfig:
    """What share of the fleet is Byzantine and what it does to its updates."""

    fraction: float
    attack: str = "mixed"
    scale: float = DEFAULT_SCALE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0.0 <= self.fraction < 1.0):
            raise ValueError(f"Byzantine fraction must be in [0, 1), got {self.fraction!r}. {SPEC_HELP}")
        if self.attack not in ATTACK_KINDS:
            raise ValueError(f"unknown Byzantine attack {self.attack!r}; known: {', '.join(ATTACK_KINDS)}")
        if not (math.isfinite(self.scale) and self.scale != 0.0):
            raise ValueError(f"Byzantine scale factor must be finite and non-zero, got {self.scale!r}")

    @property
    def spec(self) -> str:
        """The spec `parse_byzantine` turns back into this config."""
        factor = f"={self.scale:g}" if self.attack in ("scale", "mixed") and self.scale != DEFAULT_SCALE else ""
        return f"{self.fraction:g}:{self.attack}{factor}"

    def count(self, n_devices: int) -> int:
        """How many of `n_devices` are Byzantine (rounded to nearest, at least 1 if fraction > 0)."""
        if self.fraction == 0.0 or n_devices == 0:
            return 0
        return max(1, min(n_devices, int(math.floor(self.fraction * n_devices + 0.5))))


def parse_byzantine(spec: str | None) -> ByzantineConfig | None:
    """"0.1:mixed" -> ByzantineConfig(0.1, "mixed"); "" / "none" / None -> None (no attackers)."""
    if spec is None or not spec.strip() or spec.strip().lower() in ("none", "off", "0"):
        return None
    text = spec.strip().lower()

    def number(what: str, value: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"bad --byzantine spec {spec!r}: {what} {value!r} is not a number. {SPEC_HELP}") from None

    fraction_text, sep, attack_text = text.partition(":")
    if not sep:
        raise ValueError(f"bad --byzantine spec {spec!r}: missing ':ATTACK'. {SPEC_HELP}")
    fraction = number("fraction", fraction_text)
    attack, eq, factor_text = attack_text.partition("=")
    attack = attack.strip()
    scale = DEFAULT_SCALE
    if eq:
        if attack not in ("scale", "mixed"):
            raise ValueError(f"bad --byzantine spec {spec!r}: only 'scale' and 'mixed' take a factor. {SPEC_HELP}")
        scale = number("factor", factor_text)
    return ByzantineConfig(fraction, attack, scale)


def choose_byzantine(n_devices: int, config: ByzantineConfig, seed: int) -> dict[int, str]:
    """Device index -> attack, for the Byzantine devices only; a function of (n, config, seed).

    The devices are a seeded permutation's first `config.count(n)` indices; with ``mixed`` they
    take scale, signflip, nan in turn in index order, so each attack gets a third of them.
    """
    if n_devices < 0:
        raise ValueError(f"n_devices must be >= 0, got {n_devices}")
    k = config.count(n_devices)
    chosen = sorted(np.random.default_rng([int(seed), 0xB1A5]).permutation(n_devices)[:k].tolist())
    if config.attack == "mixed":
        return {int(i): ATTACKS[j % len(ATTACKS)] for j, i in enumerate(chosen)}
    return {int(i): config.attack for i in chosen}


def corrupt_update(delta: np.ndarray, attack: str, codec: Codec, *, scale: float = DEFAULT_SCALE,
                   seed: int = 0) -> np.ndarray | bytes:
    """The Byzantine version of an honest `delta`: the changed delta (in place) for the codec to
    encode, or, for ``nan``, the finished payload (the honest encoder would refuse it)."""
    if attack == "scale":
        return np.multiply(delta, np.float32(scale), out=delta)
    if attack == "signflip":
        return np.negative(delta, out=delta)
    if attack == "nan":
        delta.fill(np.nan)
        return encode_unchecked(codec, delta, np.random.default_rng(seed))
    raise ValueError(f"unknown Byzantine attack {attack!r}; known: {', '.join(ATTACKS)}")


def encode_unchecked(codec: Codec, vec: np.ndarray, rng: np.random.Generator) -> bytes:
    """`codec.encode(vec).payload` without its finite-values check: the codec's own stages write
    whatever `vec` holds. For fault injection only; a real device never sends this.

    Uses the codec's internal stage pipeline (the same code `Codec.encode` runs after its check).
    """
    out = ByteWriter()
    out.u8(FORMAT_VERSION)
    out.varint(int(vec.size))
    with np.errstate(invalid="ignore", over="ignore"):
        codec._encode_from(0, np.ascontiguousarray(vec, dtype=np.float32), None, out, rng)
    payload = out.getvalue()
    byte_coder = codec._bytes
    return byte_coder.encode(payload) if byte_coder is not None else payload


@dataclass
class RoundCounts:
    """What became of the Byzantine devices' updates in one round."""

    round: int
    selected: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)    # reason -> count
    clipped: int = 0                                      # accepted, then scaled down by the aggregator
    honest_clipped: int = 0                               # the defence's cost: honest updates scaled down
    dropped: int = 0                                      # accepted, then left out by Krum
    honest_dropped: int = 0                               # the defence's cost: honest updates left out
    by_attack: Counter = field(default_factory=Counter)   # "attack/outcome" -> count

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "selected": self.selected, "sent": self.sent, "accepted": self.accepted,
                "rejected": dict(self.rejected), "clipped": self.clipped, "honest_clipped": self.honest_clipped,
                "dropped": self.dropped, "honest_dropped": self.honest_dropped,
                "by_attack": dict(sorted(self.by_attack.items()))}


class ByzantineFleet:
    """The Byzantine devices of one simulated fleet: their hooks, and a record of their fate."""

    def __init__(self, config: ByzantineConfig, n_devices: int, seed: int) -> None:
        self.config = config
        self.seed = int(seed)
        self.n_devices = n_devices
        self.attack_of_index = choose_byzantine(n_devices, config, seed)
        self.attack_of: dict[str, str] = {}   # device id -> attack, filled as clients are built
        self._rounds: dict[int, RoundCounts] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str | None, n_devices: int, seed: int) -> ByzantineFleet | None:
        config = parse_byzantine(spec)
        return None if config is None else cls(config, n_devices, seed)

    # ---- building the clients --------------------------------------------------------------
    def client_kwargs(self, index: int, device_id: str,
                      on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
        """DeviceClient keyword arguments for device `index`: `on_event` unchanged for an honest
        device; for a Byzantine one also `update_transform`, and `on_event` chained with the record."""
        attack = self.attack_of_index.get(index)
        if attack is None:
            return {"on_event": on_event}
        self.attack_of[device_id] = attack
        log.info("device %s (index %d) is Byzantine: %s", device_id, index, attack)

        def record_then_forward(name: str, fields: dict) -> None:
            self._record(name, fields)
            if on_event is not None:
                on_event(name, fields)

        return {"on_event": record_then_forward, "update_transform": self._transform_for(device_id, attack)}

    def _transform_for(self, device_id: str, attack: str) -> UpdateTransform:
        def transform(round_id: int, delta: np.ndarray, codec: Codec) -> np.ndarray | bytes:
            seed = int.from_bytes(hashlib.blake2b(f"byz/{self.seed}/{device_id}/{round_id}".encode(),
                                                  digest_size=8).digest(), "little") >> 1
            return corrupt_update(delta, attack, codec, scale=self.config.scale, seed=seed)

        return transform

    # ---- recording ---------------------------------------------------------------------------
    def _counts(self, round_id: int) -> RoundCounts:
        counts = self._rounds.get(round_id)
        if counts is None:
            counts = self._rounds[round_id] = RoundCounts(round_id)
        return counts

    def _record(self, name: str, fields: dict) -> None:
        round_id = fields.get("round")
        attack = self.attack_of.get(str(fields.get("device")), "?")
        if not isinstance(round_id, int):
            return
        with self._lock:
            counts = self._counts(round_id)
            if name == "selected":
                counts.selected += 1
            elif name == "sent":
                counts.sent += 1
            elif name == "ack":
                if fields.get("accepted"):
                    counts.accepted += 1
                    counts.by_attack[f"{attack}/accepted"] += 1
                else:
                    reason = str(fields.get("reason") or "unknown")
                    counts.rejected[reason] += 1
                    counts.by_attack[f"{attack}/rejected:{reason}"] += 1
            elif name == "abandoned":
                counts.by_attack[f"{attack}/abandoned"] += 1

    def note_aggregate(self, round_id: int, aggregate: Any) -> None:
        """After a round: count the updates the aggregator's robust stages scaled down (normclip,
        `clipped_ids`) or left out (Krum, `dropped_ids`), Byzantine and honest. `aggregate` is the
        round's UpdateAggregator; its wrapper chain is walked through `.inner`."""
        clipped: set[str] = set()
        dropped: set[str] = set()
        stage = aggregate
        while stage is not None:
            clipped.update(getattr(stage, "clipped_ids", None) or ())
            dropped.update(getattr(stage, "dropped_ids", None) or ())
            stage = getattr(stage, "inner", None)
        with self._lock:
            counts = self._counts(round_id)
            counts.clipped = sum(1 for d in clipped if d in self.attack_of)
            counts.honest_clipped = len(clipped) - counts.clipped
            counts.dropped = sum(1 for d in dropped if d in self.attack_of)
            counts.honest_dropped = len(dropped) - counts.dropped
            for outcome, ids in (("clipped", clipped), ("dropped", dropped)):
                for d in ids:
                    if d in self.attack_of:
                        counts.by_attack[f"{self.attack_of[d]}/{outcome}"] += 1

    def summary(self) -> dict[str, Any]:
        """The report's "byzantine" section: who, and per round what became of their updates."""
        with self._lock:
            rows = [self._rounds[r].to_dict() for r in sorted(self._rounds)]
        rejected: Counter = Counter()
        for row in rows:
            rejected.update(row["rejected"])
        return {
            "spec": self.config.spec,
            "fraction": self.config.fraction,
            "attack": self.config.attack,
            "scale": self.config.scale,
            "devices": dict(sorted(self.attack_of.items())),
            "per_round": rows,
            "totals": {
                "selected": sum(r["selected"] for r in rows),
                "sent": sum(r["sent"] for r in rows),
                "accepted": sum(r["accepted"] for r in rows),
                "rejected": dict(rejected),
                "clipped": sum(r["clipped"] for r in rows),
                "honest_clipped": sum(r["honest_clipped"] for r in rows),
                "dropped": sum(r["dropped"] for r in rows),
                "honest_dropped": sum(r["honest_dropped"] for r in rows),
            },
        }


__all__ = [
    "ATTACKS", "ATTACK_KINDS", "ByzantineConfig", "ByzantineFleet", "DEFAULT_SCALE", "RoundCounts", "SPEC_HELP",
    "UpdateTransform", "choose_byzantine", "corrupt_update", "encode_unchecked", "parse_byzantine",
]
