"""One timer thread for every delayed call of the process.

`threading.Timer` starts a thread per call. A pace-steered device schedules a check-in retry
every round, so a simulated fleet of 1,000 devices started ~900 threads a round (100-200 us of
the network thread's time each, in the check-in phase the whole fleet waits on). Here the
calls wait in a heap and one daemon thread runs them in order; a call must be quick (they
share the thread), as the device's retry and timeout callbacks are.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class TimerThread:
    """`call_later(delay_s, fn, *args)` runs ``fn(*args)`` on this object's thread after ``delay_s``."""

    def __init__(self, name: str = "fedboard-timers") -> None:
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._order = itertools.count()  # ties run in the order they were scheduled
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay_s), next(self._order), fn, args))
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:  # one callback's bug must not stop every later one
                log.exception("timer callback %s failed", getattr(fn, "__qualname__", fn))


_shared: TimerThread | None = None
_shared_lock = threading.Lock()


def call_later(delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` after ``delay_s`` seconds on the process's shared timer thread."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TimerThread()
    _shared.call_later(delay_s, fn, *args)
