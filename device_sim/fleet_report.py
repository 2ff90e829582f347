"""The fleet section of a simulation report: who could train, who did, who dropped and why.

The simulator feeds a `FleetRecorder` while it runs (the DeviceClients' `on_event` callback,
plus a few calls of its own: round start/end, simulator-side drops), then `finish()` turns it
into a `FleetRun`, plain data. `summarize(run)` gives the JSON section (participation per
round, eligibility reasons, dropouts by cause, battery and bytes per device, overall and per
kind) and `plot_fleet(run, out_dir)` the PNGs. `timeline_summary` condenses per-device event
timelines (share of time plugged / on each link / in use, failure counts) per device kind.
"""
from __future__ import annotations

import enum
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_sim.timeline import (APP_KILLED, BATTERY_EMPTY, CELLULAR, CRASH, OFFLINE, PLUGGED, TRAINING, UNPLUGGED,
                                 UPLOAD, UPLOAD_LOST, USER_ACTIVE, USER_IDLE, WIFI, WIRED, Event)


class DropCause(str, enum.Enum):
    """Why a selected device did not report."""

    UNPLUGGED = "unplugged"
    WENT_METERED = "went_metered"
    WENT_OFFLINE = "went_offline"
    BATTERY_LOW = "battery_low"
    TOO_HOT = "too_hot"
    LOW_MEMORY = "low_memory"
    APP_KILLED = "app_killed"
    CRASH = "crash"
    UPLOAD_LOST = "upload_lost"
    DEADLINE = "deadline"        # the device's own deadline check stopped it
    ROUND_CLOSED = "round_closed"  # reported after the round had its goal or passed its deadline
    REJECTED = "rejected"        # the aggregator refused the update for another reason
    NO_REPORT = "no_report"      # selected, then nothing heard and no known cause
    OTHER = "other"


_CAUSE_OF_REASON = {
    "not_charging": DropCause.UNPLUGGED, "metered_network": DropCause.WENT_METERED,
    "no_network": DropCause.WENT_OFFLINE, "battery_low": DropCause.BATTERY_LOW, "too_hot": DropCause.TOO_HOT,
    "low_memory": DropCause.LOW_MEMORY, "app_killed": DropCause.APP_KILLED, "crash": DropCause.CRASH,
    "upload_lost": DropCause.UPLOAD_LOST, "deadline": DropCause.DEADLINE, "rejected": DropCause.REJECTED,
}


def drop_cause(reasons: Iterable[str] | str) -> DropCause:
    """The cause for a run stopped with these reasons (the client's stop reasons, the
    eligibility reasons, or the simulator's own words), the first one that maps."""
    if isinstance(reasons, str):
        reasons = [reasons]
    for reason in reasons:
        if reason in DropCause._value2member_map_:
            return DropCause(reason)
        if reason in _CAUSE_OF_REASON:
            return _CAUSE_OF_REASON[reason]
    return DropCause.OTHER


@dataclass
class RoundRecord:
    """One round as the fleet lived it; device ids as keys. Times are sim seconds."""

    round: int
    start_s: float | None = None
    end_s: float | None = None
    committed: bool | None = None
    eligible: set[str] = field(default_factory=set)
    ineligible: dict[str, tuple[str, ...]] = field(default_factory=dict)
    selected: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)       # device -> DropCause value
    upload_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class DeviceRecord:
    """One device at the end of a run."""

    device: str
    kind: str
    profile: str = ""
    index: int = -1
    battery_spent_mah: float = 0.0
    battery_spent_percent: float | None = None   # None: no battery
    battery_start_percent: float | None = None
    battery_end_percent: float | None = None
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    rounds_selected: int = 0
    rounds_reported: int = 0
    rounds_dropped: int = 0


@dataclass
class FleetRun:
    """Everything the report needs; `timelines` (optional) maps device -> events."""

    scenario: str
    rounds: list[RoundRecord]
    devices: list[DeviceRecord]
    start_s: float | None = None
    end_s: float | None = None
    timelines: dict[str, list[Event]] = field(default_factory=dict)


class FleetRecorder:
    """Collects round records from DeviceClient events and simulator calls; thread-safe.

    - `register(device_id, kind, platform=None)` once per device;
    - `round_started(r, at_s)` before publishing round r's plan, `round_ended(r, at_s, committed)`;
    - `on_event(name, fields)`: pass as (or chain into) DeviceClient's `on_event`;
    - `eligibility(device_id, ok, reasons)`: ClientAdapter's `on_eligibility` (check-ins of
      the current round; the client's own "ineligible" events are understood too);
    - `dropped(r, device_id, cause)` for what only the simulator sees (upload_lost, ...).
    """

    def __init__(self, scenario: str = "") -> None:
        self.scenario = scenario
        self._lock = threading.Lock()
        self._rounds: dict[int, RoundRecord] = {}
        self._current: int | None = None
        self._kinds: dict[str, str] = {}
        self._platforms: dict[str, Any] = {}
        self._start_battery: dict[str, float | None] = {}

    def register(self, device_id: str, kind: str, platform: Any = None) -> None:
        with self._lock:
            self._kinds[device_id] = kind
            if platform is not None:
                self._platforms[device_id] = platform
                self._start_battery[device_id] = platform.initial_battery_percent

    def _round(self, round_id: int | None) -> RoundRecord | None:
        if round_id is None:
            round_id = self._current
            if round_id is None:
                return None
        record = self._rounds.get(round_id)
        if record is None:
            record = self._rounds[round_id] = RoundRecord(round_id)
        return record

    def round_started(self, round_id: int, at_s: float | None = None) -> None:
        with self._lock:
            self._current = round_id
            record = self._round(round_id)
            assert record is not None
            record.start_s = at_s

    def round_ended(self, round_id: int, at_s: float | None = None, committed: bool | None = None) -> None:
        """Close a round: selected devices with neither report nor known drop count as no_report."""
        with self._lock:
            record = self._round(round_id)
            assert record is not None
            record.end_s, record.committed = at_s, committed
            for device in record.selected - record.reported - set(record.dropped):
                record.dropped[device] = DropCause.NO_REPORT.value

    def eligibility(self, device_id: str, ok: bool, reasons: Sequence[str], round_id: int | None = None) -> None:
        with self._lock:
            record = self._round(round_id)
            if record is None:
                return
            if ok:
                record.eligible.add(device_id)
                record.ineligible.pop(device_id, None)
            else:
                record.ineligible[device_id] = tuple(reasons)
                record.eligible.discard(device_id)

    def dropped(self, round_id: int, device_id: str, cause: DropCause | str) -> None:
        with self._lock:
            record = self._round(round_id)
            assert record is not None
            record.dropped[device_id] = drop_cause(cause.value if isinstance(cause, DropCause) else cause).value
            record.reported.discard(device_id)

    def on_event(self, name: str, fields: Mapping[str, Any]) -> None:
        device = str(fields.get("device", ""))
        round_id = fields.get("round")
        with self._lock:
            record = self._round(None if round_id is None else int(round_id))
            if record is None:
                return
            if name == "ineligible":
                record.ineligible[device] = tuple(fields.get("reasons", ()))
                record.eligible.discard(device)
            elif name == "checkin":
                record.eligible.add(device)
            elif name == "selected":
                record.selected.add(device)
                record.eligible.add(device)
            elif name == "abandoned":
                record.dropped[device] = drop_cause(fields.get("reasons", ())).value
            elif name == "sent":
                if device not in record.dropped:
                    record.reported.add(device)
                record.upload_bytes[device] = int(fields.get("bytes", 0))
            elif name == "ack" and not fields.get("accepted", True):
                record.reported.discard(device)
                late = fields.get("reason") == DropCause.ROUND_CLOSED.value
                record.dropped[device] = (DropCause.ROUND_CLOSED if late else DropCause.REJECTED).value

    def finish(self, *, device_stats: Mapping[str, Any] | None = None, timelines_for: Iterable[str] = (),
               until_s: float | None = None) -> FleetRun:
        """The run so far as plain data; `device_stats` (device -> DeviceStats) supplies the bytes
        the real clients counted; `timelines_for` picks devices whose event timelines to keep."""
        with self._lock:
            rounds = [self._rounds[r] for r in sorted(self._rounds)]
            kinds = dict(self._kinds)
            platforms = dict(self._platforms)
            starts = dict(self._start_battery)
        selected, reported, dropped = Counter(), Counter(), Counter()
        for record in rounds:
            selected.update(record.selected)
            reported.update(record.reported)
            dropped.update(record.dropped.keys())
        devices = []
        for device, kind in kinds.items():
            platform = platforms.get(device)
            stats = (device_stats or {}).get(device)
            devices.append(DeviceRecord(
                device=device, kind=kind,
                profile=getattr(getattr(platform, "profile", None), "name", kind),
                index=getattr(platform, "index", -1),
                battery_spent_mah=float(platform.battery_spent_mah) if platform is not None else 0.0,
                battery_spent_percent=platform.battery_spent_percent if platform is not None else None,
                battery_start_percent=starts.get(device),
                battery_end_percent=platform.battery_percent_now() if platform is not None else None,
                uplink_bytes=int(stats.uplink_bytes) if stats is not None else int(getattr(platform, "uplink_bytes", 0)),
                downlink_bytes=int(stats.downlink_bytes) if stats is not None else 0,
                rounds_selected=selected[device], rounds_reported=reported[device], rounds_dropped=dropped[device],
            ))
        starts_s = [r.start_s for r in rounds if r.start_s is not None]
        ends_s = [r.end_s for r in rounds if r.end_s is not None]
        end = until_s if until_s is not None else (max(ends_s) if ends_s else None)
        timelines = {}
        for device in timelines_for:
            platform = platforms.get(device)
            if platform is not None and end is not None:
                timelines[device] = platform.timeline(end)
        return FleetRun(self.scenario, rounds, devices, min(starts_s) if starts_s else None, end, timelines)


# ---- summaries ------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max()), "total": float(a.sum())}


def summarize(run: FleetRun) -> dict[str, Any]:
    """The report section as plain JSON-able data."""
    per_round = []
    reasons_total: Counter[str] = Counter()
    causes_total: Counter[str] = Counter()
    for r in run.rounds:
        reasons = Counter(reason for rs in r.ineligible.values() for reason in rs)
        causes = Counter(r.dropped.values())
        reasons_total.update(reasons)
        causes_total.update(causes)
        per_round.append({
            "round": r.round, "start_s": r.start_s, "end_s": r.end_s, "committed": r.committed,
            "eligible": len(r.eligible), "ineligible": len(r.ineligible), "selected": len(r.selected),
            "reported": len(r.reported), "dropped": len(r.dropped),
            "ineligible_reasons": dict(reasons.most_common()), "dropped_by_cause": dict(causes.most_common()),
            "uplink_bytes": int(sum(r.upload_bytes.get(d, 0) for d in r.reported)),
        })
    selected = sum(p["selected"] for p in per_round)
    reported = sum(p["reported"] for p in per_round)
    by_kind: dict[str, list[DeviceRecord]] = defaultdict(list)
    for d in run.devices:
        by_kind[d.kind].append(d)

    def battery(devices: Sequence[DeviceRecord]) -> dict[str, Any]:
        with_battery = [d for d in devices if d.battery_spent_percent is not None]
        return {"devices_with_battery": len(with_battery),
                "spent_mah": _stats([d.battery_spent_mah for d in with_battery]),
                "spent_percent": _stats([d.battery_spent_percent for d in with_battery])}  # type: ignore[misc]

    return {
        "scenario": run.scenario,
        "devices": len(run.devices),
        "devices_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "rounds": len(run.rounds),
        "sim_start_s": run.start_s, "sim_end_s": run.end_s,
        "participation": {
            "mean_eligible": float(np.mean([p["eligible"] for p in per_round])) if per_round else 0.0,
            "mean_eligible_share": (float(np.mean([p["eligible"] / max(p["eligible"] + p["ineligible"], 1)
                                                   for p in per_round])) if per_round else 0.0),
            "selected_total": selected, "reported_total": reported,
            "dropout_rate": 1.0 - reported / selected if selected else 0.0,
            # without the over-selected devices whose report came after the round closed
            "failure_rate": (sum(n for c, n in causes_total.items() if c != DropCause.ROUND_CLOSED.value) / selected
                             if selected else 0.0),
            "devices_that_reported": sum(1 for d in run.devices if d.rounds_reported),
            "committed_rounds": sum(1 for p in per_round if p["committed"]),
        },
        "eligibility_reasons": dict(reasons_total.most_common()),
        "dropouts_by_cause": dict(causes_total.most_common()),
        "battery_spent": {"all": battery(run.devices), "by_kind": {k: battery(v) for k, v in sorted(by_kind.items())}},
        "uplink_bytes_per_device": {"all": _stats([d.uplink_bytes for d in run.devices]),
                                    "by_kind": {k: _stats([d.uplink_bytes for d in v]) for k, v in sorted(by_kind.items())}},
        "downlink_bytes_per_device": {"all": _stats([d.downlink_bytes for d in run.devices])},
        "per_round": per_round,
        "timelines": timeline_summary(run.timelines, {d.device: d.kind for d in run.devices}, run.start_s, run.end_s)
        if run.timelines else {},
    }


_LINK_KINDS = (WIRED, WIFI, CELLULAR, OFFLINE)


def timeline_summary(timelines: Mapping[str, Sequence[Event]], kinds: Mapping[str, str],
                     t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """Per device kind: mean share of [t0, t1) plugged / on each link / in use, and event counts
    per device (unplugs, link changes, battery empties, trainings, failures)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for device, events in timelines.items():
        if not events:
            continue
        start = events[0].t if t0 is None else t0
        end = events[-1].t if t1 is None else t1
        span = max(end - start, 1e-9)
        time_in: Counter[str] = Counter()
        state = {"power": None, "link": None, "use": None}
        last = start
        counts: Counter[str] = Counter()
        for e in sorted(events, key=lambda e: e.t):
            t = min(max(e.t, start), end)
            for value in state.values():
                if value is not None:
                    time_in[value] += t - last
            last = t
            if e.kind in (PLUGGED, UNPLUGGED):
                state["power"] = e.kind
            elif e.kind in _LINK_KINDS:
                state["link"] = e.kind
            elif e.kind in (USER_ACTIVE, USER_IDLE):
                state["use"] = e.kind
            if e.detail != "initial" and start <= e.t < end:
                counts[e.kind] += 1
        for value in state.values():
            if value is not None:
                time_in[value] += end - last
        bucket = acc[kinds.get(device, "?")]
        bucket["share_plugged"].append(time_in[PLUGGED] / span)
        bucket["share_in_use"].append(time_in[USER_ACTIVE] / span)
        for link in _LINK_KINDS:
            bucket[f"share_{link}"].append(time_in[link] / span)
        bucket["link_changes"].append(sum(counts[k] for k in _LINK_KINDS))
        for kind in (UNPLUGGED, BATTERY_EMPTY, TRAINING, UPLOAD, UPLOAD_LOST, APP_KILLED, CRASH):
            bucket[kind].append(counts[kind])
    return {kind: {"devices": len(next(iter(values.values()))),
                   **{name: round(float(np.mean(v)), 4) for name, v in sorted(values.items())}}
            for kind, values in sorted(acc.items())}


# ---- plots ------------------------------------------------------------------------------------
_CAUSE_COLORS = {c.value: col for c, col in zip(DropCause, (
    "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#1f77b4",
    "#aec7e8", "#dbdb8d", "#ffbb78", "#c7c7c7", "#98df8a"))}


def plot_fleet(run: FleetRun, out_dir: str | Path, *, prefix: str = "fleet_") -> list[Path]:
    """Write the participation, eligibility and battery PNGs (and device timelines, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(run)
    rows = summary["per_round"]
    rounds = [r["round"] for r in rows]
    paths = []

    # participation / dropout timeline
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 3), 4.2))
    bottom = np.array([r["reported"] for r in rows], dtype=float)
    ax.bar(rounds, bottom, color="#2ca02c", label="reported")
    causes = sorted({c for r in rows for c in r["dropped_by_cause"]})
    for cause in causes:
        values = np.array([r["dropped_by_cause"].get(cause, 0) for r in rows], dtype=float)
        ax.bar(rounds, values, bottom=bottom, color=_CAUSE_COLORS.get(cause, "#333333"), label=f"dropped: {cause}")
        bottom += values
    ax.plot(rounds, [r["selected"] for r in rows], "k_", markersize=18, mew=2, label="selected")
    for r in rows:
        if r["committed"] is False:
            ax.annotate("not committed", (r["round"], r["selected"]), ha="center", va="bottom", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("devices")
    ax.set_title(f"{run.scenario}: selected devices, reports and dropouts by cause")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(_save(fig, out / f"{prefix}participation.png", plt))

    # eligibility reasons per round
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 3), 4.2))
    reasons = sorted({k for r in rows for k in r["ineligible_reasons"]})
    bottom = np.zeros(len(rows))
    cmap = plt.get_cmap("tab10")
    for i, reason in enumerate(reasons):
        values = np.array([r["ineligible_reasons"].get(reason, 0) for r in rows], dtype=float)
        ax.bar(rounds, values, bottom=bottom, color=cmap(i % 10), label=reason)
        bottom += values
    ax.plot(rounds, [r["eligible"] for r in rows], "o-", color="black", label="eligible (checked in)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("devices (a device may have several reasons)")
    ax.set_title(f"{run.scenario}: why devices were not eligible")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(_save(fig, out / f"{prefix}eligibility.png", plt))

    # battery spent per device, per kind
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_kind: dict[str, list[float]] = defaultdict(list)
    for d in run.devices:
        if d.battery_spent_percent is not None:
            by_kind[d.kind].append(d.battery_spent_percent)
    if by_kind:
        top = max(max(v) for v in by_kind.values())
        bins = np.linspace(0.0, max(top, 1e-3) * 1.05, 30)
        for kind, values in sorted(by_kind.items()):
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{kind} ({len(values)} devices)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no device with a battery", ha="center", va="center", transform=ax.transAxes)
    no_battery = sum(1 for d in run.devices if d.battery_spent_percent is None)
    ax.set_xlabel("battery spent on federated learning (% of capacity)")
    ax.set_ylabel("devices")
    ax.set_title(f"{run.scenario}: battery cost per device" + (f" ({no_battery} mains-powered not shown)" if no_battery else ""))
    fig.tight_layout()
    paths.append(_save(fig, out / f"{prefix}battery.png", plt))

    if run.timelines:
        paths.append(plot_device_timelines(run.timelines, out / f"{prefix}device_timelines.png",
                                           kinds={d.device: d.kind for d in run.devices},
                                           t0=run.start_s, t1=run.end_s))
    return paths


def plot_device_timelines(timelines: Mapping[str, Sequence[Event]], path: str | Path, *,
                          kinds: Mapping[str, str] | None = None, t0: float | None = None,
                          t1: float | None = None, max_devices: int = 16) -> Path:
    """One row per device: plugged, link and in-use bands over sim time (hours from t0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(timelines)[:max_devices]
    all_t = [e.t for d in devices for e in timelines[d]]
    if not all_t:
        raise ValueError("no events to plot")
    start = min(all_t) if t0 is None else t0
    end = max(all_t) if t1 is None else t1
    colors = {PLUGGED: "#2ca02c", WIRED: "#1f77b4", WIFI: "#17becf", CELLULAR: "#ff7f0e", OFFLINE: "#d62728",
              USER_ACTIVE: "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(devices) + 1.6))
    for row, device in enumerate(devices):
        events = sorted(timelines[device], key=lambda e: e.t)
        lanes = ({PLUGGED, UNPLUGGED}, set(_LINK_KINDS), {USER_ACTIVE, USER_IDLE})
        for lane, group in enumerate(lanes):
            current, since, height = None, start, 0.25
            for e in events + [Event(end, "_end")]:
                if e.kind not in group and e.kind != "_end":
                    continue
                t = min(max(e.t, start), end)
                if current in colors and t > since:
                    ax.broken_barh([((since - start) / 3600, (t - since) / 3600)], (row + lane * 0.3 - 0.4, height),
                                   color=colors[current])
                if e.kind in group:
                    current, since = e.kind, t
        for e in events:
            if e.kind in (APP_KILLED, CRASH, UPLOAD_LOST, BATTERY_EMPTY) and start <= e.t <= end:
                ax.plot((e.t - start) / 3600, row + 0.45, "x", color="black", ms=5)
            elif e.kind == TRAINING and start <= e.t <= end:
                ax.plot((e.t - start) / 3600, row + 0.45, "v", color="#2ca02c", ms=4)
    ax.set_yticks(range(len(devices)))
    ax.set_yticklabels([f"{d} ({(kinds or {}).get(d, '')})" for d in devices], fontsize=7)
    ax.set_xlabel("simulated hours from the start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["plugged", "wired", "wifi", "cellular", "offline", "in use"], fontsize=7, ncol=6,
              loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("device timelines (v training, x failure)")
    fig.tight_layout()
    return _save(fig, Path(path), plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_to_dict(run: FleetRun) -> dict[str, Any]:
    """The raw records as JSON-able data (sets become sorted lists)."""
    def rec(r: RoundRecord) -> dict[str, Any]:
        d = asdict(r)
        for key in ("eligible", "selected", "reported"):
            d[key] = sorted(d[key])
        d["ineligible"] = {k: list(v) for k, v in d["ineligible"].items()}
        return d

    return {"scenario": run.scenario, "start_s": run.start_s, "end_s": run.end_s,
            "rounds": [rec(r) for r in run.rounds], "devices": [asdict(d) for d in run.devices]}


__all__ = ["DropCause", "drop_cause", "RoundRecord", "DeviceRecord", "FleetRun", "FleetRecorder", "summarize",
           "timeline_summary", "plot_fleet", "plot_device_timelines", "run_to_dict"]
