"""Eligibility rules one by one, the policy's config parsing, and the training-time monitor."""
from __future__ import annotations

import threading

import pytest

from edge_client.eligibility import Decision, EligibilityMonitor, EligibilityPolicy, Reason
from edge_client.platform import NetworkType, PlatformState, StaticPlatform

GOOD = dict(battery_percent=80.0, charging=True, network=NetworkType.WIFI, metered=False, link_up=True,
            idle=True, free_memory_mb=1500.0, cpu_temp_c=45.0)


def state(**changes) -> PlatformState:
    return PlatformState(**{**GOOD, **changes}, at=0.0)


POLICY = EligibilityPolicy()


def test_a_good_device_is_eligible():
    decision = POLICY.check(state())
    assert decision == Decision(True, ())
    assert decision and decision.describe() == "eligible"


@pytest.mark.parametrize("changes, reason", [
    (dict(charging=False), Reason.NOT_CHARGING),
    (dict(network=NetworkType.CELLULAR, metered=True), Reason.METERED_NETWORK),
    (dict(network=NetworkType.WIFI, metered=True), Reason.METERED_NETWORK),  # a phone hotspot
    (dict(network=NetworkType.NONE, link_up=False, metered=False), Reason.NO_NETWORK),
    (dict(link_up=False), Reason.NO_NETWORK),
    (dict(idle=False), Reason.NOT_IDLE),
    (dict(battery_percent=19.9), Reason.BATTERY_LOW),  # plugged in but nearly empty: charge first
    (dict(cpu_temp_c=70.5), Reason.TOO_HOT),
    (dict(free_memory_mb=199.0), Reason.LOW_MEMORY),
])
def test_each_rule_on_its_own_blocks(changes, reason):
    decision = POLICY.check(state(**changes))
    assert not decision.eligible
    assert decision.reasons == (reason,)
    assert reason.value in decision.describe()


def test_all_failures_are_reported_together():
    decision = POLICY.check(state(charging=False, battery_percent=5.0, idle=False, cpu_temp_c=90.0))
    assert decision.reasons == (Reason.NOT_CHARGING, Reason.BATTERY_LOW, Reason.NOT_IDLE, Reason.TOO_HOT)


def test_no_battery_means_always_powered_and_unknown_temperature_passes():
    assert POLICY.check(state(battery_percent=None, cpu_temp_c=None)).eligible


def test_thresholds_are_inclusive_at_the_boundary():
    assert POLICY.check(state(battery_percent=20.0, cpu_temp_c=70.0, free_memory_mb=200.0)).eligible


def test_rules_can_be_switched_off():
    relaxed = EligibilityPolicy(require_charging=False, require_unmetered=False, require_idle=False,
                                min_battery_percent=0)
    assert relaxed.check(state(charging=False, network=NetworkType.CELLULAR, metered=True, idle=False,
                               battery_percent=3.0)).eligible
    assert relaxed.check(state(link_up=False)).reasons == (Reason.NO_NETWORK,)  # a link is always needed


def test_battery_floor_still_guards_when_charging_is_not_required():
    policy = EligibilityPolicy(require_charging=False, min_battery_percent=50)
    assert policy.check(state(charging=False, battery_percent=60.0)).eligible
    assert policy.check(state(charging=False, battery_percent=40.0)).reasons == (Reason.BATTERY_LOW,)


def test_idle_rule_is_relaxed_while_training_but_the_others_are_not():
    busy = state(idle=False)
    assert not POLICY.check(busy).eligible
    assert POLICY.check(busy, training=True).eligible
    assert POLICY.check(state(idle=False, charging=False), training=True).reasons == (Reason.NOT_CHARGING,)


def test_from_dict_accepts_known_keys_and_ints_for_floats():
    policy = EligibilityPolicy.from_dict({"require_idle": False, "max_cpu_temp_c": 65, "min_battery_percent": 30.5})
    assert policy.require_idle is False and policy.max_cpu_temp_c == 65.0 and policy.min_battery_percent == 30.5
    assert EligibilityPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize("data, key", [
    ({"require_charing": True}, "require_charing"),
    ({"require_charging": "yes"}, "require_charging"),
    ({"require_idle": 1}, "require_idle"),
    ({"max_cpu_temp_c": "70"}, "max_cpu_temp_c"),
    ({"min_free_memory_mb": True}, "min_free_memory_mb"),
    ({"min_free_memory_mb": float("nan")}, "min_free_memory_mb"),
    ({"min_battery_percent": 120}, "min_battery_percent"),
    ({"min_free_memory_mb": -5}, "min_free_memory_mb"),
])
def test_bad_policy_dict_names_the_key(data, key):
    with pytest.raises(ValueError, match=key):
        EligibilityPolicy.from_dict(data)


def test_from_dict_refuses_a_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        EligibilityPolicy.from_dict(["require_idle"])  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_monitor_stops_training_when_the_device_is_unplugged_mid_way():
    clock = FakeClock()
    platform = StaticPlatform(clock=clock, **{**GOOD, "idle": False})  # training keeps the CPU busy
    monitor = EligibilityMonitor(platform, POLICY, check_interval_s=1.0, clock=clock)
    steps = 0
    for step in range(100):
        if monitor.should_stop():
            break
        steps += 1
        clock.now += 0.1  # a training step takes 0.1 s
        if step == 42:
            platform.set(charging=False)
    # the unplug is noticed at the next reading, at most one interval (10 steps) later
    assert 43 <= steps <= 53
    assert monitor.stop_reasons == (Reason.NOT_CHARGING,)
    assert monitor.last_decision is not None and not monitor.last_decision.eligible


def test_monitor_caches_the_platform_read_for_the_interval():
    clock = FakeClock()
    platform = StaticPlatform(clock=clock, **GOOD)
    monitor = EligibilityMonitor(platform, check_interval_s=1.0, clock=clock)
    for _ in range(1000):
        assert not monitor.should_stop()
    assert platform.reads == 1
    clock.now = 1.0
    monitor.should_stop()
    assert platform.reads == 2


def test_monitor_stays_stopped_until_reset_and_keeps_the_first_reasons():
    clock = FakeClock()
    platform = StaticPlatform(clock=clock, **GOOD)
    monitor = EligibilityMonitor(platform, check_interval_s=0.0, clock=clock)
    platform.set(cpu_temp_c=85.0)
    assert monitor.should_stop()
    platform.set(cpu_temp_c=40.0, network=NetworkType.CELLULAR, metered=True)
    assert monitor.should_stop()  # a run never resumes half-way
    assert monitor.stop_reasons == (Reason.TOO_HOT,)
    platform.set(network=NetworkType.WIRED, metered=False)
    monitor.reset()
    assert monitor.stop_reasons == () and not monitor.should_stop()


def test_monitor_check_now_outside_training_applies_the_idle_rule():
    platform = StaticPlatform(**{**GOOD, "idle": False})
    monitor = EligibilityMonitor(platform)
    assert monitor.check_now(training=False).reasons == (Reason.NOT_IDLE,)
    assert monitor.stop_reasons == ()  # a pre-training check is not a stop
    assert not monitor.should_stop()


def test_monitor_is_safe_across_threads():
    platform = StaticPlatform(**GOOD)
    monitor = EligibilityMonitor(platform, check_interval_s=0.0)
    results: list[list[bool]] = [[], []]

    def trainer(seen: list[bool]) -> None:
        for _ in range(2000):
            seen.append(monitor.should_stop())

    threads = [threading.Thread(target=trainer, args=(seen,)) for seen in results]
    for t in threads:
        t.start()
    platform.set(charging=False)
    for t in threads:
        t.join()
    assert monitor.should_stop() and monitor.stop_reasons == (Reason.NOT_CHARGING,)
    for seen in results:  # once True, a thread never sees False again
        assert all(a <= b for a, b in zip(seen, seen[1:]))
