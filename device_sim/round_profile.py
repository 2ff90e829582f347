"""Where a simulated round's non-training time went: interpreter idle time split by round phase.

The simulator's overhead figure (bench/fleet_scale.py) is `1 - pool_busy_s / (pool_size x
round_wall_s)`: interpreter-seconds in which no device trained. This module splits those idle
interpreter-seconds over the phases of the round, using the aggregator's phase marks
(`RoundResult.phase_marks`, time.monotonic()) and the pool's first lease after the cohort was
told, so a profile says which phase to make cheaper instead of one opaque percentage.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

# (phase, mark that ends it); "prepare" starts at the simulator's t0, "commit" ends at its t1
PHASES: tuple[tuple[str, str], ...] = (
    ("prepare", "opened"),            # simulator counts the eligible devices; the plan is published
    ("checkin", "window_closed"),     # every eligible device gets the plan and checks in
    ("assign", "assigned"),           # cohort chosen, check-ins acknowledged, the cohort told
    ("first_model", "first_lease"),   # a selected device downloads and verifies the model, then trains
    ("training", "reports_closed"),   # interpreters idle while the cohort trains (no device ready)
    ("commit", "end"),                # aggregate, server optimizer, sign and publish the new model
)
PHASE_NAMES: tuple[str, ...] = tuple(name for name, _ in PHASES)


def idle_by_phase(busy_s: Callable[[float, float], float], pool_size: int, t0: float, t1: float,
                  marks: Mapping[str, float], first_lease: float | None) -> dict[str, float]:
    """Idle interpreter-seconds of each phase of the round [t0, t1] (all times monotonic).

    `busy_s(a, b)` is the pool's leased interpreter-seconds inside [a, b]. A phase whose end mark
    is missing (a resumed round, secure aggregation's own phases) merges into the next one, so the
    phases always add up to the round's whole idle time.
    """
    ends = dict(marks)
    if first_lease is not None:
        ends["first_lease"] = first_lease
    ends["end"] = t1
    out: dict[str, float] = {}
    start = t0
    for name, mark in PHASES:
        end = ends.get(mark)
        if end is None:
            out[name] = 0.0
            continue
        end = min(max(end, start), t1)
        out[name] = max(0.0, pool_size * (end - start) - busy_s(start, end))
        start = end
    return out


def overhead_table(rows: list[Mapping]) -> dict[str, dict[str, float]]:
    """Sum of `idle_by_phase` over report rows: idle interpreter-seconds and their share of
    pool_size x round_wall_s (the shares add up to the overall overhead)."""
    capacity = sum(r["pool_size"] * r["round_wall_s"] for r in rows)
    table: dict[str, dict[str, float]] = {}
    for name in PHASE_NAMES:
        idle = sum(r.get("idle_by_phase", {}).get(name, 0.0) for r in rows)
        table[name] = {"idle_s": round(idle, 3), "share": round(idle / capacity, 4) if capacity else 0.0}
    return table
