"""edge_client/timers.py: one thread runs every delayed call, in time order."""
from __future__ import annotations

import threading

from edge_client.timers import TimerThread, call_later


def test_calls_run_in_time_order_on_one_thread() -> None:
    timers = TimerThread(name="test-timers")
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def record(label: str) -> None:
        seen.append((label, threading.current_thread().name))
        if len(seen) == 3:
            done.set()

    timers.call_later(0.15, record, "late")
    timers.call_later(0.0, record, "now")
    timers.call_later(0.05, record, "soon")
    assert done.wait(5)
    assert [label for label, _ in seen] == ["now", "soon", "late"]
    assert {name for _, name in seen} == {"test-timers"} and timers.pending() == 0


def test_a_failing_callback_does_not_stop_later_ones() -> None:
    timers = TimerThread(name="test-timers-2")
    done = threading.Event()
    timers.call_later(0.0, lambda: 1 / 0)
    timers.call_later(0.01, done.set)
    assert done.wait(5)


def test_many_calls_share_the_thread() -> None:
    before = threading.active_count()
    hits: list[int] = []
    finished = threading.Event()

    def hit(i: int) -> None:
        hits.append(i)
        if len(hits) == 500:
            finished.set()

    for i in range(500):
        call_later(0.01 + i * 1e-5, hit, i)
    assert threading.active_count() <= before + 1  # one shared thread, not 500
    assert finished.wait(10) and hits == list(range(500))
