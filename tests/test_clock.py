import threading

import pytest

from device_sim.clock import (DAY_S, DEFAULT_START_S, Clock, ManualClock, VirtualClock, describe, local_day, local_hour,
                              local_to_sim, parse_start, weekday)


class FakeWall:
    def __init__(self):
        self.t = 100.0
        self.slept = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept.append(s)
        self.t += s


def test_default_start_is_a_monday_midnight_utc():
    assert describe(DEFAULT_START_S) == "Mon 2024-01-01 00:00:00 UTC"
    assert weekday(local_day(DEFAULT_START_S, 0)) == 0


def test_virtual_clock_runs_speedup_times_faster_than_the_wall():
    wall = FakeWall()
    clock = VirtualClock(600, wall=wall, sleeper=wall.sleep)
    assert clock.now() == DEFAULT_START_S
    wall.t += 2.0
    assert clock.now() == pytest.approx(DEFAULT_START_S + 1200)
    assert clock.wall_seconds(600) == pytest.approx(1.0)
    assert clock.sim_seconds(0.5) == pytest.approx(300)
    clock.sleep(1800)
    assert wall.slept == [pytest.approx(3.0)]
    assert clock.now() == pytest.approx(DEFAULT_START_S + 1200 + 1800)


def test_virtual_clock_freeze_stops_sim_time_and_resume_continues():
    wall = FakeWall()
    clock = VirtualClock(10, start_s=1000.0, wall=wall)
    wall.t += 1
    clock.freeze()
    frozen = clock.now()
    wall.t += 50
    assert clock.frozen and clock.now() == frozen == pytest.approx(1010)
    clock.resume()
    wall.t += 1
    assert clock.now() == pytest.approx(1020)


def test_virtual_clock_on_the_real_wall_is_monotonic():
    clock = VirtualClock(1000)
    readings = [clock.now() for _ in range(1000)]
    assert readings == sorted(readings)


def test_manual_clock_moves_only_when_told_and_only_forward():
    clock = ManualClock(start_s=5000.0, speedup=60)
    assert isinstance(clock, Clock)
    assert clock.now() == 5000.0
    clock.advance(30)
    clock.sleep(30)  # instant, advances
    assert clock.now() == 5060.0
    clock.set(6000)
    assert clock.now() == 6000
    assert clock.wall_seconds(120) == 2.0
    with pytest.raises(ValueError, match="forward"):
        clock.set(10)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def test_manual_clock_is_safe_from_several_threads():
    clock = ManualClock(start_s=0.0)
    threads = [threading.Thread(target=lambda: [clock.advance(1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.now() == 4000


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True])
def test_speedup_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="speedup"):
        VirtualClock(bad)


def test_local_calendar_helpers():
    t = DEFAULT_START_S + 22 * 3600  # Monday 22:00 UTC
    assert local_hour(t, 0) == pytest.approx(22)
    assert local_hour(t, 5.5 * 3600) == pytest.approx(3.5)  # Tuesday 03:30 in UTC+5:30
    assert weekday(local_day(t, 5.5 * 3600)) == 1
    assert weekday(local_day(t, -8 * 3600)) == 0
    day = local_day(t, 3600)
    assert local_to_sim(day, 23.0, 3600) == pytest.approx(t)
    assert local_to_sim(day, 25.0, 3600) - local_to_sim(day, 1.0, 3600) == DAY_S


@pytest.mark.parametrize("text, expected", [
    ("monday 00:00", DEFAULT_START_S),
    ("Wednesday 21:30", DEFAULT_START_S + 2 * DAY_S + 21.5 * 3600),
    ("sun 08:00", DEFAULT_START_S + 6 * DAY_S + 8 * 3600),
    ("2024-01-03T08:00Z", DEFAULT_START_S + 2 * DAY_S + 8 * 3600),
    ("2024-01-03 08:00", DEFAULT_START_S + 2 * DAY_S + 8 * 3600),
    ("2024-01-03T09:00:00+01:00", DEFAULT_START_S + 2 * DAY_S + 8 * 3600),
])
def test_parse_start(text, expected):
    assert parse_start(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["someday 08:00", "monday 25:00", "tomorrow", "", "mo 08:00"])
def test_parse_start_rejects_nonsense_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="start"):
        parse_start(bad)
