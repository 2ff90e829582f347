"""The aggregator's side of secure aggregation over MQTT: the four phases after check-in.

`Aggregator.run_round` hands a secure round to `SecureAggregation.run(r)` instead of the plain
reporting phase. The protocol itself is `protocol.secagg.SecAggServer`; this module carries it:

    advertise  devices -> secagg/up/<d>: AdvertiseKeys     until the whole cohort or secagg_phase_s
               server  -> secagg/roster (retained): KeyRoster
    share      devices -> secagg/up/<d>: ShareKeys         until the whole roster or secagg_phase_s
               server  -> secagg/down/<d>: ShareBundle
    mask       devices -> secagg/up/<d>: MaskedInput       until the goal or report_deadline_s (as updates)
               server  -> secagg/unmask (retained): UnmaskRequest
    unmask     devices -> secagg/up/<d>: UnmaskResponse    until every survivor or secagg_phase_s
               server: finish() -> the exact sum -> the round's aggregator (mean or DP-FedAvg)

Why it is safe to run on the aggregator's threads: the intake thread feeds messages in under
the aggregator's lock, the round thread closes phases under the same lock, and `SecAggServer`
keeps one running uint32 sum, never an individual input (tests/test_secagg_mqtt.py looks). A
secure round holds nothing on disk: an aggregator restart in the middle abandons it.

Weighting: with `secagg_weighted` (the default for `mean`) each device masks (examples x
update, examples), one more coordinate, so the server divides two secret sums and gets
FedAvg's example-weighted mean; the grid's range is scaled by the largest check-in count.
Under DP-FedAvg devices weigh 1 (its sensitivity bound needs it).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.dp import DPFedAvgAggregator
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError, Reason, ValidationError
from protocol.messages import Ack
from protocol.secagg import MessageType, SecAggAbortedError, SecAggParams, SecAggServer, ServerPhase, message_type

if TYPE_CHECKING:  # no import cycle at run time: the aggregator passes itself in
    from aggregator.server import Aggregator, _OpenRound, _Pending

log = logging.getLogger(__name__)

PHASES = ("advertise", "share", "mask", "unmask")
_PHASE_OF = {MessageType.ADVERTISE_KEYS: "advertise", MessageType.SHARE_KEYS: "share",
             MessageType.MASKED_INPUT: "mask", MessageType.UNMASK_RESPONSE: "unmask"}
_SERVER_PHASE = {"advertise": ServerPhase.KEYS, "share": ServerPhase.SHARES, "mask": ServerPhase.INPUTS,
                 "unmask": ServerPhase.UNMASKING}
SECAGG_CODEC = "secagg"


def secure_params(round_id: int, cohort: int, dim: int, bits: int, value_range: float) -> SecAggParams:
    """The round's grid: threshold ceil(2/3 n) (more than half: the honest-but-curious bound, and
    two thirds against an active server), max_clients n so the modular sum cannot wrap."""
    threshold = min(cohort, max(2, math.ceil(2 * cohort / 3 - 1e-9)))
    return SecAggParams(round_id, dim, threshold=threshold, max_clients=cohort, bits=bits, value_range=value_range)


def max_weight(r: _OpenRound, cohort: tuple[str, ...], weighted: bool) -> float:
    """Largest example count a cohort device can weigh (check-in windows x epochs); 1 when unweighted.

    The grid must hold ``weight x update`` and the weight itself, so its range scales with it."""
    if not weighted:
        return 1.0
    counts = [r.checkins[d].train_examples for d in cohort if d in r.checkins]
    return float(max(counts or [1]) * max(1, r.plan.local_epochs))


@dataclass
class SecureRound:
    """One round's protocol state and its cost figures (what goes into the round report)."""

    round_id: int
    cohort: tuple[str, ...]
    server: SecAggServer | None
    weighted: bool = False        # inputs are (examples x update, examples): an example-weighted mean
    started: float = field(default_factory=time.monotonic)
    phase: str = "advertise"
    abandoned: str = ""
    up_bytes: dict[str, dict[str, int]] = field(default_factory=lambda: {p: {} for p in PHASES})
    down_bytes: dict[str, dict[str, int]] = field(default_factory=lambda: {p: {} for p in PHASES})
    phase_s: dict[str, float] = field(default_factory=dict)      # wall time of each phase
    server_s: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})  # compute in receive/close
    digests: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (phase, device) -> sha256 of the envelope
    duplicates: int = 0
    survivors: tuple[str, ...] = ()
    roster: tuple[str, ...] = ()
    sharers: tuple[str, ...] = ()
    responders: tuple[str, ...] = ()
    total_weight: float = 0.0

    def count(self, phase: str) -> int:
        return len(self.up_bytes[phase])

    def report(self) -> dict[str, Any]:
        params = self.server.params if self.server is not None else None
        out: dict[str, Any] = {
            "phase_s": {k: round(v, 4) for k, v in self.phase_s.items()},
            "server_compute_s": {k: round(v, 4) for k, v in self.server_s.items()},
            "up_bytes": self.up_bytes, "down_bytes": self.down_bytes,
            "up_bytes_total": sum(sum(d.values()) for d in self.up_bytes.values()),
            "down_bytes_total": sum(sum(d.values()) for d in self.down_bytes.values()),
            "cohort": len(self.cohort), "advertised": len(self.roster), "shared": len(self.sharers),
            "survivors": list(self.survivors), "responders": len(self.responders),
            "dropped_before_keys": sorted(set(self.cohort) - set(self.roster)),
            "dropped_after_advertising": sorted(set(self.roster) - set(self.sharers)),
            "dropped_after_sharing": sorted(set(self.sharers) - set(self.survivors)) if self.survivors else [],
            "dropped_after_masking": sorted(set(self.survivors) - set(self.responders)) if self.responders else [],
            "duplicates": self.duplicates, "abandoned": self.abandoned, "weighted": self.weighted,
        }
        if self.weighted and self.total_weight:
            out["total_weight"] = self.total_weight
        if params is not None:
            out["params"] = {"bits": params.bits, "threshold": params.threshold, "max_clients": params.max_clients,
                             "value_range": params.value_range, "step": params.step, "dim": params.dim}
        return out


class SecureAggregation:
    """Runs the secure phases of an `Aggregator`'s rounds (one instance per aggregator)."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.current: SecureRound | None = None

    # -- intake thread -----------------------------------------------------------------------------
    def on_message(self, device: str, data: bytes, token: _Pending) -> None:
        """One message on secagg/up/<device>: into the protocol, acknowledged after the checkpoint."""
        agg = self.agg
        try:
            env = decode_envelope(data, max_payload=agg.config.max_payload, expect=Kind.SECAGG)
            if env.device != device:
                raise ValidationError(Reason.BAD_FIELD, f"envelope says device {env.device!r}, topic says {device!r}")
            kind = message_type(env.payload)
            phase = _PHASE_OF.get(kind)
            if phase is None:
                raise ValidationError(Reason.BAD_KIND, f"{kind.name} is a server message, devices do not send it")
        except ProtocolError as exc:
            agg._reject(token, device, -1, exc)
            return
        reply = None
        with agg._cv:
            sr = self._ensure(agg._round)
            try:
                if sr is None or sr.round_id != env.round:
                    raise ValidationError(Reason.ROUND_CLOSED if sr is None or env.round < sr.round_id
                                          else Reason.WRONG_ROUND, f"no secure round {env.round} is open")
                digest = hashlib.sha256(data).digest()
                if sr.digests.get((phase, device)) == digest:  # QoS 1 redelivery, maybe of an earlier phase
                    sr.duplicates += 1
                    agg.metrics.c(agg.metrics.duplicates).inc()
                    if phase == "mask":
                        again = Ack(env.round, True, Reason.DUPLICATE.value, "already counted")
                        reply = agg._ack_message(device, again)
                    agg._defer(token, reply)
                    return
                if sr.server is None or sr.abandoned:
                    raise ValidationError(Reason.ROUND_CLOSED, f"secure round {sr.round_id} is over: {sr.abandoned}")
                r = agg._round
                if phase == "mask" and r is not None and len(sr.up_bytes["mask"]) >= r.goal:
                    raise ValidationError(Reason.ROUND_CLOSED, "the round has all the masked inputs it needs")
                started = time.perf_counter()
                fresh = sr.server.receive(device, env.payload)
                sr.server_s[phase] += time.perf_counter() - started
            except ProtocolError as exc:
                agg._reject(token, device, env.round, exc)
                return
            if fresh:
                sr.digests[(phase, device)] = digest
                sr.up_bytes[phase][device] = len(data)
                agg._dirty = True
                agg._cv.notify_all()
            if phase == "mask":
                reply = agg._ack_message(device, Ack(env.round, True))
        if phase == "mask" and fresh:
            agg.metrics.c(agg.metrics.updates_accepted).inc()
        agg.metrics.c(agg.metrics.uplink_bytes).inc(len(data))
        agg._defer(token, reply)

    def _ensure(self, r: _OpenRound | None) -> SecureRound | None:
        """The SecureRound of the open round, created once its cohort is chosen (caller holds the lock)."""
        if r is None:
            return self.current
        if self.current is not None and self.current.round_id == r.plan.round_id:
            return self.current
        if r.phase != "reporting" or r.resumed:
            return self.current
        cfg = self.agg.config
        cohort = tuple(sorted(r.cohort))
        sr = SecureRound(r.plan.round_id, cohort, None, weighted=r.plan.secure_weighted)
        if len(cohort) < 2:
            sr.abandoned = f"secure aggregation needs at least 2 devices, the cohort has {len(cohort)}"
        else:
            params = secure_params(r.plan.round_id, len(cohort), self.agg.dim + 1 if sr.weighted else self.agg.dim,
                                   cfg.secagg_bits, cfg.secure_value_range() * max_weight(r, cohort, sr.weighted))
            sr.server = SecAggServer(params, cohort=cohort)
            if sr.weighted and params.bits < 32:
                log.warning("aggregator: secure round %d: a %d-bit grid holding examples x update has step %.3g: "
                            "too coarse for a useful mean; use 32 bits, or secagg_weighted=false with update_clip",
                            r.plan.round_id, params.bits, params.step)
        self.current = sr
        return sr

    # -- round thread --------------------------------------------------------------------------------
    def run(self, r: _OpenRound) -> None:
        """The four phases; afterwards the round's aggregator holds the unmasked sum, or the round
        carries the reason it is abandoned (`commit_reason`)."""
        agg = self.agg
        with agg._cv:
            sr = self._ensure(r)
            if sr is None or sr.round_id != r.plan.round_id:  # resumed after a restart: keys were in memory
                sr = SecureRound(r.plan.round_id, tuple(r.cohort), None,
                                 abandoned="the aggregator restarted during a secure round (keys are not checkpointed)")
                self.current = sr
        try:
            if not sr.abandoned:
                self._phases(r, sr)
        except SecAggAbortedError as exc:
            sr.abandoned = str(exc.detail)
        except ProtocolError as exc:  # e.g. a rebuilt key that is not the advertised one
            sr.abandoned = f"secure aggregation failed: {exc}"
            log.error("aggregator: secure round %d failed: %s", r.plan.round_id, exc)
        finally:
            with agg._cv:
                if sr.abandoned and sr.server is not None and sr.server.phase not in (ServerPhase.DONE,
                                                                                      ServerPhase.FAILED):
                    sr.server.fail(sr.abandoned)
                assert agg._state is not None
                agg._state.open = False
                agg._dirty = True
        agg.flush()
        agg._raise_if_failed()

    def _phases(self, r: _OpenRound, sr: SecureRound) -> None:
        agg, cfg = self.agg, self.agg.config
        server = sr.server
        assert server is not None
        topics, fleet = agg.topics, cfg.fleet
        phase_s = cfg.secagg_phase_s

        def envelope(message_bytes: bytes, device: str = "") -> bytes:
            return Envelope(Kind.SECAGG, fleet, device, round=sr.round_id, codec=SECAGG_CODEC,
                            payload=message_bytes).encode()

        # phase 0 -> the roster
        self._wait(sr, "advertise", lambda: sr.count("advertise") >= len(sr.cohort), time.time() + phase_s)
        with agg._cv:
            roster = self._close(sr, "advertise", server.close_keys)
            sr.roster = roster.devices
        data = envelope(roster.to_bytes())
        sr.down_bytes["share"] = {d: len(data) for d in sr.roster}
        agg._publish(topics.secagg_roster, data, retain=True)
        # phase 1 -> one bundle per sharer
        self._wait(sr, "share", lambda: sr.count("share") >= len(sr.roster), time.time() + phase_s)
        with agg._cv:
            bundles = self._close(sr, "share", server.close_shares)
            sr.sharers = server.sharers
        for device, bundle in bundles.items():
            data = envelope(bundle.to_bytes(), device)
            sr.down_bytes["mask"][device] = len(data)
            agg._publish(topics.secagg_down(device), data)
        # phase 2: masked inputs count toward the goal exactly as plain updates do
        self._wait(sr, "mask", lambda: sr.count("mask") >= min(r.goal, len(sr.sharers)), r.deadline_unix)
        with agg._cv:
            request = self._close(sr, "mask", server.close_inputs)
            sr.survivors = request.survivors
            agg._state.accepted = set(sr.survivors)
        data = envelope(request.to_bytes())
        sr.down_bytes["unmask"] = {d: len(data) for d in sr.survivors}
        agg._publish(topics.secagg_unmask, data, retain=True)
        # phase 3: every survivor, or the deadline with at least `threshold` answers
        self._wait(sr, "unmask", lambda: sr.count("unmask") >= len(sr.survivors), time.time() + phase_s)
        with agg._cv:
            sr.responders = tuple(sorted(sr.up_bytes["unmask"]))
            started = time.perf_counter()
            result = self._close(sr, "unmask", server.finish)
            self._fold(sr, result)
            sr.server_s["unmask"] += time.perf_counter() - started
            r.uplink_bytes += sum(sum(d.values()) for d in sr.up_bytes.values())
        log.info("aggregator: secure round %d: sum of %d masked inputs (cohort %d, %d responders) in %s",
                 sr.round_id, result.count, len(sr.cohort), len(sr.responders),
                 ", ".join(f"{p} {s:.2f} s" for p, s in sr.phase_s.items()))

    def _wait(self, sr: SecureRound, phase: str, done: Any, deadline_unix: float) -> None:
        agg = self.agg
        started = time.monotonic()
        with agg._cv:
            while not done():
                agg._raise_if_failed()
                left = deadline_unix - time.time()
                if left <= 0:
                    log.info("aggregator: secure round %d: %s phase deadline with %d messages", sr.round_id, phase,
                             sr.count(phase))
                    break
                agg._cv.wait(timeout=min(0.5, left))
        sr.phase_s[phase] = time.monotonic() - started

    @staticmethod
    def _close(sr: SecureRound, phase: str, close: Any) -> Any:
        started = time.perf_counter()
        out = close()
        sr.server_s[phase] += time.perf_counter() - started
        nxt = PHASES.index(phase) + 1
        sr.phase = PHASES[nxt] if nxt < len(PHASES) else "done"
        return out

    def _fold(self, sr: SecureRound, result: Any) -> None:
        """The unmasked sum into the round's aggregator: a weighted or equal-weight mean, or DP-FedAvg's sum."""
        aggregate = self.agg._aggregate
        total = result.float_sum()
        if sr.weighted:  # last coordinate: the sum of the devices' example counts
            weight = float(total[-1])
            if not weight > 0:
                raise SecAggAbortedError(f"the secure sum of example counts is {weight}: no weight to divide by")
            sr.total_weight = weight
            aggregate.add((total[:-1] / weight).astype(np.float32), weight)
        elif isinstance(aggregate, DPFedAvgAggregator):
            aggregate.add_aggregate(total, result.count, client_ids=result.survivors)
        else:
            aggregate.add((total / result.count).astype(np.float32), float(result.count))

    # -- after the round -------------------------------------------------------------------------
    def commit_reason(self, r: _OpenRound) -> str:
        """'' when the secure sum is in the aggregator, else why the round is abandoned."""
        sr = self.current
        if sr is None or sr.round_id != r.plan.round_id:
            return "no secure aggregation ran for this round"
        if sr.abandoned:
            return sr.abandoned
        if sr.phase != "done":
            return f"secure aggregation stopped in phase {sr.phase!r}"
        needed = self.agg.config.report_floor()
        if len(sr.survivors) < needed:
            return f"{len(sr.survivors)} masked inputs, the min_reports floor is {needed}"
        return ""

    def report(self, r: _OpenRound) -> dict[str, Any]:
        sr = self.current
        if sr is None or sr.round_id != r.plan.round_id:
            return {}
        return sr.report()
