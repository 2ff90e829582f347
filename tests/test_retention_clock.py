"""Retention survives clock jumps: age is measured on the store's own clock, not on the stamps.

The simulated device clock is honest: real time moves the boot clock and the wall clock together;
a jump (NTP, a dead RTC, the user) moves the wall clock alone; a reboot starts a new boot clock and
may set the wall clock to anything. The store is closed and reopened around a reboot, as a
restarted client would.
"""
from __future__ import annotations

import logging

import pytest

from edge_client.retention_clock import ClockState, advance
from edge_client.textstore import TextStore

DAY = 86_400.0
YEAR = 365 * DAY
NOW = 1_796_000_000.0  # late 2026


class DeviceClock:
    def __init__(self, wall: float) -> None:
        self._wall, self._boot, self._since_boot = wall, 1, 100.0

    def wall(self) -> float:
        return self._wall

    def boot(self) -> tuple[str, float]:
        return f"boot-{self._boot}", self._since_boot

    def elapse(self, seconds: float) -> None:
        self._wall += seconds
        self._since_boot += seconds

    def jump(self, seconds: float) -> None:
        self._wall += seconds

    def reboot(self, off_seconds: float, wall_error: float = 0.0) -> None:
        """Off for `off_seconds` of real time; the wall clock then reads true time + `wall_error`."""
        self._wall += off_seconds + wall_error
        self._boot += 1
        self._since_boot = 5.0


@pytest.fixture
def clock() -> DeviceClock:
    return DeviceClock(NOW)


def open_store(tmp_path, clock, **limits) -> TextStore:
    return TextStore(tmp_path / "texts.db", clock=clock, **{"max_age_days": 90, "max_rows": None, **limits})


def test_text_typed_while_the_clock_was_10_years_behind_survives_the_clock_being_set_right(tmp_path, clock):
    clock.jump(-10 * YEAR)  # a device that booted with a dead RTC
    with open_store(tmp_path, clock) as store:
        store.add("typed in the wrong decade")
        clock.elapse(DAY)
        clock.jump(10 * YEAR)  # NTP sets it right
        assert store.texts() == ["typed in the wrong decade"]
        clock.elapse(88 * DAY)
        assert store.texts() == ["typed in the wrong decade"]  # 89 days old
        clock.elapse(2 * DAY)
        assert store.texts() == []  # 91 days old: gone, as if the clock had always been right


def test_a_text_stamped_in_the_future_ages_from_when_it_was_stored(tmp_path, clock):
    with open_store(tmp_path, clock) as store:
        store.add("stamped 2076", ts=NOW + 50 * YEAR)
        store.add("stamped now")
        clock.elapse(89 * DAY)
        assert store.count() == 2
        clock.elapse(2 * DAY)
        assert store.texts() == []  # not kept until 2076


def test_a_clock_set_back_makes_nothing_younger(tmp_path, clock):
    with open_store(tmp_path, clock) as store:
        store.add("before the jump")
        clock.elapse(60 * DAY)
        clock.jump(-5 * YEAR)
        store.add("after the jump")  # stamped 5 years ago by the wrong clock: still age 0
        clock.elapse(31 * DAY)
        assert store.texts() == ["after the jump"]  # the first is 91 days old, the second 31
        clock.elapse(60 * DAY)
        assert store.texts() == []


def test_a_reboot_counts_the_time_off_by_the_wall_clock_never_backwards_and_at_most_the_cap(
        tmp_path, clock, caplog):
    store = open_store(tmp_path, clock, max_offline_s=30 * DAY)
    store.add("first")
    store.close()
    clock.reboot(off_seconds=20 * DAY)  # a plausible time off: counted
    with open_store(tmp_path, clock, max_offline_s=30 * DAY) as store:
        clock.elapse(69 * DAY)
        assert store.texts() == ["first"]  # 89 days
        clock.elapse(2 * DAY)
        assert store.texts() == []  # 91 days: 20 of them while off
        store.add("second")
    clock.reboot(off_seconds=DAY, wall_error=-3 * YEAR)  # the RTC lost its battery: the wall clock went back
    with open_store(tmp_path, clock, max_offline_s=30 * DAY) as store:
        clock.elapse(50 * DAY)
        assert store.texts() == ["second"]  # 50 days: the day off is lost, nothing got younger
    clock.reboot(off_seconds=DAY, wall_error=+3 * YEAR)  # ... and is set right while off: +3 years at once
    with caplog.at_level(logging.WARNING, logger="edge_client.retention_clock"):
        with open_store(tmp_path, clock, max_offline_s=30 * DAY) as store:
            assert store.texts() == ["second"]  # 80 days: credited 30 (the cap), not 3 years
            assert "across a reboot" in caplog.text
            clock.elapse(11 * DAY)
            assert store.texts() == []


def test_the_row_limit_drops_the_first_stored_whatever_the_stamps_say(tmp_path, clock):
    with open_store(tmp_path, clock, max_rows=2, max_age_days=None) as store:
        store.add("stamped 2076", ts=NOW + 50 * YEAR)
        clock.elapse(1.0)
        store.add("second")
        clock.elapse(1.0)
        store.add("third")
        assert store.texts() == ["second", "third"]  # the 2076 stamp does not make it the newest


def test_a_store_of_an_older_client_gets_ages_from_its_stamps_once(tmp_path, clock):
    import sqlite3

    path = tmp_path / "texts.db"
    with sqlite3.connect(path) as conn:  # the schema before the retention clock
        conn.executescript("CREATE TABLE texts (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
                           "text TEXT NOT NULL, app TEXT);")
        conn.executemany("INSERT INTO texts (ts, text) VALUES (?, ?)",
                         [(NOW - 80 * DAY, "80 days old"), (NOW - 10 * DAY, "10 days old"),
                          (NOW + 40 * YEAR, "from the future")])
    with open_store(tmp_path, clock) as store:
        assert sorted(store.texts()) == ["10 days old", "80 days old", "from the future"]
        clock.jump(+5 * YEAR)  # after the upgrade, stamps no longer matter
        assert store.count() == 3
        clock.elapse(11 * DAY)
        assert sorted(store.texts()) == ["10 days old", "from the future"]


def test_advance_is_monotonic_within_a_boot_whatever_the_wall_clock_does(clock):
    state = advance(None, clock)
    for wall_jump in (-YEAR, +2 * YEAR, -0.5, 1e9):
        clock.jump(wall_jump)
        clock.elapse(10.0)
        before = state.elapsed
        state = advance(state, clock)
        assert state.elapsed == pytest.approx(before + 10.0)
    assert isinstance(state, ClockState)
