"""A simulated phone or Pi behind the same `Platform` interface a real device uses.

`SimulatedPlatform.read()` answers what a sensor would at the clock's current sim time:
battery, charger, link, user activity, memory, temperature. The edge client judges those
readings with its own `EligibilityPolicy`, exactly as on a real device. The simulator-facing
methods spend battery on training steps and uploads, time uploads on the current link, and
answer the injected failures (app killed, crash, upload cut off).

`ClientAdapter` plugs one platform into `edge_client.DeviceClient`: its `eligibility`
callable is the client's `eligibility=` argument, and it keeps the device's own simulated
time while training (step k of a run happens at start + k x step time, however long the
shared interpreter pool made the real step take).
"""
from __future__ import annotations

import array
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_sim.availability import UsageModel
from device_sim.battery import Battery
from device_sim.charging import ChargingModel
from device_sim.clock import HOUR_S, Clock
from device_sim.compute import Thermal
from device_sim.connectivity import CELLULAR, LINKS, OFFLINE, WIRED, WIFI, ConnectivityModel
from device_sim.failures import FailureModel
from device_sim.profiles import DeviceProfile
from device_sim.timeline import (APP_KILLED, CRASH, OVERRIDE, PLUGGED, TRAINING, UNPLUGGED, UPLOAD, UPLOAD_LOST,
                                 USER_ACTIVE, USER_IDLE, Event, Stream, check_seed, device_rng)
from edge_client.eligibility import EligibilityPolicy
from edge_client.platform import NetworkType, PlatformState


_NETWORK = {WIRED: NetworkType.WIRED, WIFI: NetworkType.WIFI, CELLULAR: NetworkType.CELLULAR, OFFLINE: NetworkType.NONE}
_OVERRIDABLE = ("battery_percent", "charging", "network", "metered", "link_up", "idle", "free_memory_mb", "cpu_temp_c")
NO_NETWORK, UPLOAD_CUT = "no_network", "upload_lost"


@dataclass(frozen=True)
class UploadOutcome:
    """One upload attempt: `ok`, how long it took (sim s) and what went through.

    `cause` is "" when ok, "no_network" when there was no link to start with, "upload_lost"
    when the link changed or dropped (or an injected loss hit) before the last byte.
    """

    ok: bool
    started_at: float
    sim_s: float
    bytes_sent: int
    nbytes: int
    link: str
    cause: str = ""
    detail: str = ""

    @property
    def done_at(self) -> float:
        return self.started_at + self.sim_s


class SimulatedPlatform:
    """One simulated device: `read()` for the client, the rest for the simulator.

    Everything random is drawn from (seed, index): the device's time zone, speed and
    bandwidth factor, its initial charge, and every day of its charging, usage and link
    timelines. Memory stays at a few kB per device: only the current days are cached.
    """

    __slots__ = ("profile", "clock", "seed", "index", "base_step_s", "utc_offset_h", "compute_factor",
                 "bandwidth_factor", "initial_battery_percent", "origin_s", "_charging", "_usage", "_network",
                 "_battery", "_thermal", "_failures", "_log", "_drain_t", "_drain_mah", "_override", "_lock",
                 "_draws", "uplink_bytes", "train_steps", "__weakref__")

    def __init__(self, profile: DeviceProfile, clock: Clock, seed: int, index: int, *, base_step_s: float = 1.0) -> None:
        if not (isinstance(index, int) and index >= 0):
            raise ValueError(f"device index must be an integer >= 0, got {index!r}")
        if not base_step_s > 0:
            raise ValueError(f"base_step_s must be > 0, got {base_step_s}")
        self.profile = profile
        self.clock = clock
        self.seed = check_seed(seed)
        self.index = index
        self.base_step_s = float(base_step_s)
        rng = device_rng(self.seed, index, Stream.TRAITS)
        u_zone, z_speed, z_bandwidth, u_battery = rng.random(), rng.standard_normal(), rng.standard_normal(), rng.random()
        offsets = profile.utc_offsets
        cumulative, pick = 0.0, offsets[-1][0]
        for offset, share in offsets:
            cumulative += share
            if u_zone < cumulative:
                pick = offset
                break
        self.utc_offset_h = float(pick)
        self.compute_factor = profile.compute.factor_from(z_speed)
        self.bandwidth_factor = float(math.exp(profile.network.bandwidth_sigma * z_bandwidth))
        low, high = profile.battery.initial_percent
        self.initial_battery_percent = float(low + (high - low) * u_battery) if profile.has_battery else None
        self.origin_s = float(clock.start_s)
        offset_s = self.utc_offset_h * HOUR_S
        self._charging = ChargingModel(profile.charging, self.seed, index, offset_s)
        self._usage = UsageModel(profile.usage, self.seed, index, offset_s)
        self._network = ConnectivityModel(profile.network, self.seed, index, offset_s, self.origin_s)
        self._battery = self._new_battery(self._charging, self._usage) if profile.has_battery else None
        self._thermal = Thermal(profile.compute, self.origin_s)
        self._failures = FailureModel(profile.failures, self.seed, index)
        self._log: list[Event] = []
        self._drain_t = array.array("d")
        self._drain_mah = array.array("d")
        self._override: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._draws = 0
        self.uplink_bytes = 0
        self.train_steps = 0

    def _new_battery(self, charging: ChargingModel, usage: UsageModel, record: bool = False) -> Battery:
        assert self.initial_battery_percent is not None
        return Battery(self.profile.battery, self.initial_battery_percent, self.origin_s, charging.intervals,
                       usage.intervals, record_events=record)

    def __repr__(self) -> str:
        return (f"SimulatedPlatform({self.profile.name} #{self.index}, UTC{self.utc_offset_h:+g}, "
                f"speed x{self.compute_factor:.2f})")

    # ---- the Platform protocol -------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.profile.kind

    def read(self) -> PlatformState:
        return self.read_at(self.clock.now())

    def read_at(self, t: float) -> PlatformState:
        """The readings at sim time `t` (the battery never integrates backwards: see Battery)."""
        with self._lock:
            plugged = self._charging.plugged_at(t)
            active = self._usage.active_at(t)
            link = self._network.link_at(t)
            percent = None if self._battery is None else min(self._battery.percent_at(t), 100.0)
            off = percent is not None and percent <= 0.0 and not plugged
            spec = self.profile.compute
            fields: dict[str, Any] = {
                "battery_percent": percent,
                "charging": plugged,
                "network": NetworkType.NONE if off else _NETWORK[link],
                "metered": link == CELLULAR and not off,
                "link_up": not off and link != OFFLINE,
                "idle": off or not active,
                "free_memory_mb": max(spec.free_memory_mb - (spec.active_memory_mb if active and not off else 0.0), 0.0),
                "cpu_temp_c": self._thermal.temp_at(t),
            }
            if self._override:
                fields.update(self._override)
            return PlatformState(**fields, at=t)

    def override(self, **fields: Any) -> None:
        """Force some readings (like StaticPlatform.set) until `clear_override()`; for tests and demos."""
        unknown = set(fields) - set(_OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown platform field(s) {sorted(unknown)}; settable: {', '.join(_OVERRIDABLE)}")
        with self._lock:
            self._override = {**(self._override or {}), **fields}
            self._log.append(Event(self.clock.now(), OVERRIDE, ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))))

    def clear_override(self) -> None:
        with self._lock:
            if self._override:
                self._override = None
                self._log.append(Event(self.clock.now(), OVERRIDE, "cleared"))

    def eligibility(self, policy: EligibilityPolicy | None = None) -> Callable[[bool], tuple[bool, tuple[str, ...]]]:
        """The `eligibility(training)` callable of DeviceClient, judging `read()` with `policy`."""
        policy = policy or EligibilityPolicy()

        def check(training: bool) -> tuple[bool, tuple[str, ...]]:
            decision = policy.check(self.read(), training=training)
            return decision.eligible, tuple(r.value for r in decision.reasons)

        return check

    # ---- what the simulator asks -------------------------------------------------------------
    def training_step_sim_s(self) -> float:
        """Simulated seconds one training step takes on this device (base x speed factor)."""
        return self.base_step_s * self.compute_factor

    def on_training_steps(self, n: int, *, at: float | None = None) -> float:
        """Account for `n` steps that ended at `at` (default now): battery and heat; returns mAh."""
        if n <= 0:
            return 0.0
        t = self.clock.now() if at is None else at
        seconds = n * self.training_step_sim_s()
        with self._lock:
            mah = 0.0
            if self._battery is not None:
                mah = self.profile.battery.train_ma * seconds / 3600.0
                self._spend(t, mah)
            self._thermal.trained(t, seconds)
            self.train_steps += n
            start = t - seconds
            last = self._log[-1] if self._log else None
            if last is not None and last.kind == TRAINING:
                steps = int(last.detail.split("=", 1)[1])
                if abs(last.t + steps * self.training_step_sim_s() - start) < 1e-6:
                    self._log[-1] = Event(last.t, TRAINING, f"steps={steps + n}")
                    return mah
            self._log.append(Event(start, TRAINING, f"steps={n}"))
        return mah

    def _spend(self, t: float, mah: float) -> None:
        assert self._battery is not None
        self._battery.drain(t, mah)
        self._drain_t.append(t)
        self._drain_mah.append(mah)

    def link_at(self, t: float | None = None) -> str:
        """The link kind ("wired", "wifi", "cellular", "offline") at `t` (default now)."""
        with self._lock:
            return LINKS[self._network.link_at(self.clock.now() if t is None else t)]

    def upload_sim_s(self, nbytes: int, *, at: float | None = None) -> float:
        """How long sending `nbytes` takes on the link at `at` (inf when offline)."""
        with self._lock:
            link = self._network.link_at(self.clock.now() if at is None else at)
        return self._duration(link, nbytes)

    def _duration(self, link: int, nbytes: int) -> float:
        spec = self.profile.network
        if link == OFFLINE:
            return math.inf
        bandwidth = spec.bandwidth_mbps[link] * self.bandwidth_factor * 1e6 / 8.0  # bytes per second
        return spec.latency_ms[link] / 1000.0 + nbytes / bandwidth

    def on_upload(self, nbytes: int, *, round_id: int | None = None, attempt: int = 0,
                  at: float | None = None) -> UploadOutcome:
        """Send `nbytes` starting at `at` (default now) on the current link.

        Takes latency + bytes / bandwidth simulated seconds. Fails when there is no link, when
        the link changes or drops before the end (the connectivity timeline decides), or when
        the injected loss of (seed, device, round, attempt) hits. Spends the radio energy of
        the bytes actually sent. Without `round_id` the loss draw follows the call order.
        """
        if nbytes < 0:
            raise ValueError(f"cannot upload {nbytes} bytes")
        t = self.clock.now() if at is None else at
        with self._lock:
            if round_id is None:
                key, self._draws = (1 << 40) + self._draws, self._draws + 1
            else:
                key = round_id
            state = self.read_at(t)
            link = self._network.link_at(t)
            if not state.link_up:
                outcome = UploadOutcome(False, t, 0.0, 0, nbytes, LINKS[link], NO_NETWORK, "no link at the start")
                self._log.append(Event(t, UPLOAD_LOST, f"round={round_id} no_network"))
                return outcome
            duration = self._duration(link, nbytes)
            latency = self.profile.network.latency_ms[link] / 1000.0
            cut_at, detail = math.inf, ""
            change = self._network.first_change(t, t + duration)
            if change is not None:
                cut_at, detail = change[0], f"link {LINKS[link]} -> {LINKS[change[1]]}"
            fraction = self._failures.upload_cut_at(key, attempt)
            if fraction is not None and t + fraction * duration < cut_at:
                cut_at, detail = t + fraction * duration, "injected loss"
            if math.isinf(cut_at):
                sent, took = nbytes, duration
            else:
                took = cut_at - t
                sent = int(nbytes * min(max((took - latency) / max(duration - latency, 1e-12), 0.0), 1.0))
            if self._battery is not None and sent:
                per_mb = self.profile.battery.mah_per_mb_cellular if link == CELLULAR else self.profile.battery.mah_per_mb_wifi
                self._spend(t, per_mb * sent / 1e6)
            self.uplink_bytes += sent
            ok = math.isinf(cut_at)
            self._log.append(Event(t, UPLOAD if ok else UPLOAD_LOST,
                                   f"round={round_id} bytes={sent}/{nbytes} s={took:.3f}" + ("" if ok else f" {detail}")))
            return UploadOutcome(ok, t, took, sent, nbytes, LINKS[link], "" if ok else UPLOAD_CUT, detail)

    def app_killed_during(self, sim_s: float, *, round_id: int | None = None, elapsed_s: float = 0.0) -> bool:
        """Is the app killed during training seconds (elapsed_s, elapsed_s + sim_s] of a round?

        With `round_id` the kill instant is one draw per (seed, device, round), so asking step
        by step or once for the whole run gives the same answer. Without it, every call is a
        fresh draw (call-order dependent).
        """
        with self._lock:
            if round_id is None:
                key, elapsed = (1 << 40) + self._draws, 0.0
                self._draws += 1
            else:
                key, elapsed = round_id, elapsed_s
            killed = self._failures.killed_during(key, elapsed, sim_s)
            if killed:
                self._log.append(Event(self.clock.now(), APP_KILLED, f"round={round_id} after {elapsed + sim_s:.1f}s"))
            return killed

    def kill_after_s(self, round_id: int) -> float:
        """Training seconds into round `round_id` at which the app gets killed (inf: never)."""
        return self._failures.kill_after_s(round_id)

    def crashes_this_round(self, round_id: int) -> bool:
        """Whether the app crashes in this round (one draw per seed, device, round)."""
        crashed = self._failures.crashes(round_id)
        if crashed:
            with self._lock:
                if not any(e.kind == CRASH and e.detail == f"round={round_id}" for e in self._log[-4:]):
                    self._log.append(Event(self.clock.now(), CRASH, f"round={round_id}"))
        return crashed

    # ---- reporting -------------------------------------------------------------------------------
    @property
    def battery_spent_mah(self) -> float:
        """Charge spent on federated learning (training and uploads) so far (mAh)."""
        return 0.0 if self._battery is None else self._battery.spent_mah

    @property
    def battery_spent_percent(self) -> float | None:
        if self._battery is None:
            return None
        return 100.0 * self._battery.spent_mah / self.profile.battery.capacity_mah

    def battery_percent_now(self) -> float | None:
        if self._battery is None:
            return None
        with self._lock:
            return self._battery.percent_at(self.clock.now())

    def timeline(self, until_s: float, *, since_s: float | None = None) -> list[Event]:
        """Every state change from the origin (or `since_s`) to `until_s`, in time order.

        Environment events (plugged, unplugged, wired/wifi/cellular/offline, user_active,
        user_idle, battery_empty) are regenerated from (seed, index) into fresh models, so the
        answer does not depend on when or how often the device was read; simulator events
        (training, upload, upload_lost, app_killed, crash, override) come from the log.
        The first events at the origin give the initial state (detail "initial").
        """
        origin = self.origin_s
        offset_s = self.utc_offset_h * HOUR_S
        charging = ChargingModel(self.profile.charging, self.seed, self.index, offset_s)
        usage = UsageModel(self.profile.usage, self.seed, self.index, offset_s)
        network = ConnectivityModel(self.profile.network, self.seed, self.index, offset_s, origin)
        events = [
            Event(origin, PLUGGED if charging.plugged_at(origin) else UNPLUGGED,
                  "initial, mains" if self.profile.charging.mains_powered else "initial"),
            Event(origin, LINKS[network.link_at(origin)], "initial"),
            Event(origin, USER_ACTIVE if usage.active_at(origin) else USER_IDLE, "initial"),
        ]
        if not self.profile.charging.mains_powered:
            events += _edges(charging.intervals(origin, until_s), origin, until_s, PLUGGED, UNPLUGGED)
        events += [Event(t, LINKS[link]) for t, link in network.changes(origin, until_s)]
        events += _edges(usage.intervals(origin, until_s), origin, until_s, USER_ACTIVE, USER_IDLE)
        with self._lock:
            drains = list(zip(self._drain_t, self._drain_mah))
            logged = [e for e in self._log if e.t <= until_s]
        if self._battery is not None:
            replay = self._new_battery(charging, usage, record=True)
            for t, mah in drains:
                if t <= until_s:
                    replay.drain(t, mah)
            replay.percent_at(until_s)
            events += [e for e in (replay.events or []) if e.t <= until_s]
        events += logged
        events.sort(key=lambda e: e.t)
        if since_s is not None:
            events = [e for e in events if e.t >= since_s]
        return events

    def next_event(self, after_s: float, kinds: set[str] | frozenset[str] | None = None,
                   horizon_s: float = 7 * 24 * HOUR_S) -> Event | None:
        """The first environment event of one of `kinds` strictly after `after_s` (None if none
        within `horizon_s`); lets a test jump the clock to e.g. the next "unplugged"."""
        for event in self.timeline(after_s + horizon_s, since_s=after_s):
            if event.t > after_s and (kinds is None or event.kind in kinds) and event.detail != "initial":
                return event
        return None


def _edges(intervals: list[tuple[float, float]], t0: float, t1: float, rise: str, fall: str) -> list[Event]:
    out = []
    for a, b in intervals:
        if a > t0:
            out.append(Event(a, rise))
        if b < t1:
            out.append(Event(b, fall))
    return out


@dataclass
class _Run:
    round_id: int | None
    start_s: float
    calls: int = 0
    drained_steps: int = 0
    stopped: str = ""
    finished: bool = False


class ClientAdapter:
    """One SimulatedPlatform as seen by one `edge_client.DeviceClient`.

    Wire it as `DeviceClient(..., eligibility=adapter.eligibility, on_event=adapter.on_event)`
    (chain `on_event` with a FleetRecorder if you use one). Then:

    - `eligibility(False)` (check-in): the policy on `read()` at the clock's now;
    - `eligibility(True)` is what the client's `should_stop` asks before every training step.
      The first call of a run fixes the device's start time; call k happens at device time
      start + k x step time, after step k-1 was charged to the battery. It answers ("crash",)
      at the start of a round the device crashes in, ("app_killed",) once the kill instant of
      the round has passed, else the policy on `read_at(device time)` (e.g. not_charging
      when the phone was unplugged mid-run): the client then abandons and reports nothing.
    - `upload(nbytes)` times the upload on the link from the end of training in device time
      and says whether it got through. The simulator should drop the update when not ok, and
      otherwise publish it at `outcome.done_at` (sim time): at once when that is already past
      (the real steps were slower than the simulated device), later when the simulated device
      is slower than the real steps were.
    """

    def __init__(self, platform: SimulatedPlatform, policy: EligibilityPolicy | None = None, *,
                 device_id: str = "", on_eligibility: Callable[[str, bool, tuple[str, ...]], None] | None = None) -> None:
        self.platform = platform
        self.policy = policy or EligibilityPolicy()
        self.device_id = device_id or f"device-{platform.index}"
        self._on_eligibility = on_eligibility
        self._lock = threading.Lock()
        self._round: int | None = None
        self._run: _Run | None = None

    def on_event(self, name: str, fields: dict) -> None:
        """DeviceClient's on_event: "selected" starts a round, "sent"/"abandoned" end it."""
        if name == "selected":
            with self._lock:
                self._round = int(fields["round"])
                self._run = None
        elif name == "sent":
            self.finish_training()
        elif name == "abandoned":
            self.finish_training(completed=False)

    def begin_round(self, round_id: int) -> None:
        self.on_event("selected", {"round": round_id})

    def eligibility(self, training: bool) -> tuple[bool, tuple[str, ...]]:
        if not training:  # a check-in: any earlier run is over
            with self._lock:
                if self._run is not None:
                    self._run.finished = True
            decision = self.policy.check(self.platform.read(), training=False)
            reasons = tuple(r.value for r in decision.reasons)
            if self._on_eligibility is not None:
                self._on_eligibility(self.device_id, decision.eligible, reasons)
            return decision.eligible, reasons
        platform = self.platform
        step_s = platform.training_step_sim_s()
        with self._lock:
            run = self._run
            if run is None or run.finished:
                run = self._run = _Run(self._round, platform.clock.now())
            else:
                run.calls += 1
            if run.stopped:
                return False, tuple(run.stopped.split(","))
            done = run.calls  # steps finished before this check
            if done > run.drained_steps:
                platform.on_training_steps(done - run.drained_steps, at=run.start_s + done * step_s)
                run.drained_steps = done
            if run.round_id is not None:
                if done == 0 and platform.crashes_this_round(run.round_id):
                    run.stopped = "crash"
                elif done > 0 and platform.app_killed_during(step_s, round_id=run.round_id, elapsed_s=(done - 1) * step_s):
                    run.stopped = "app_killed"
                if run.stopped:
                    return False, (run.stopped,)
            decision = self.policy.check(platform.read_at(run.start_s + done * step_s), training=True)
            reasons = tuple(r.value for r in decision.reasons)
            if not decision.eligible:
                run.stopped = ",".join(reasons)
        return decision.eligible, reasons

    def finish_training(self, *, completed: bool = True) -> float:
        """End the current run; returns the device time at which training ended.

        A completed run (the update is about to be sent) also charges its last step, which
        no check followed; an abandoned one was charged up to its last check. Idempotent.
        """
        with self._lock:
            run = self._run
            if run is None:
                return self.platform.clock.now()
            step_s = self.platform.training_step_sim_s()
            if run.finished:
                return run.start_s + run.drained_steps * step_s
            if completed and not run.stopped and run.drained_steps == run.calls:
                steps = run.calls + 1
                self.platform.on_training_steps(1, at=run.start_s + steps * step_s)
                run.drained_steps = steps
            run.finished = True
            return run.start_s + run.drained_steps * step_s

    def training_end_s(self) -> float | None:
        with self._lock:
            run = self._run
            return None if run is None else run.start_s + run.drained_steps * self.platform.training_step_sim_s()

    def upload(self, nbytes: int, *, attempt: int = 0) -> UploadOutcome:
        """Time (and maybe lose) the upload of `nbytes`, starting when the device finished
        training in its own time (so the outcome depends on device speed, not on how long the
        shared interpreter pool made the real steps take); see the class doc."""
        at = self.finish_training()
        with self._lock:
            run, round_id = self._run, self._round
        if run is not None and run.round_id is not None:
            trained_s = run.drained_steps * self.platform.training_step_sim_s()
            if self.platform.kill_after_s(run.round_id) <= trained_s:  # killed during the last step
                self.platform.app_killed_during(trained_s, round_id=run.round_id)
                link = self.platform.link_at(at)
                return UploadOutcome(False, at, 0.0, 0, nbytes, link, APP_KILLED, "killed during the last step")
        return self.platform.on_upload(nbytes, round_id=round_id, attempt=attempt, at=at)
