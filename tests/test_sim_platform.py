import gc
import math
import tracemalloc

import numpy as np
import pytest

from device_sim.clock import DAY_S, DEFAULT_START_S, HOUR_S, ManualClock
from device_sim.connectivity import NetworkSpec, PerLink
from device_sim.failures import FailureSpec
from device_sim.profiles import LOW_END_PHONE, PHONE, RASPBERRY_PI, DeviceProfile, apply_overrides
from device_sim.sim_platform import ClientAdapter, SimulatedPlatform
from device_sim.timeline import PLUGGED, TRAINING, UNPLUGGED, UPLOAD, UPLOAD_LOST
from edge_client.eligibility import EligibilityPolicy, Reason
from edge_client.platform import NetworkType, Platform

POLICY = EligibilityPolicy()
QUIET = FailureSpec(kill_per_train_min=0.0, crash_per_round=0.0, upload_loss=0.0)


def quiet(profile: DeviceProfile) -> DeviceProfile:
    return apply_overrides(profile, {"failures": {"kill_per_train_min": 0, "crash_per_round": 0, "upload_loss": 0}}, "t")


def find(profile, predicate, *, seed=0, devices=200, hours=72, step_s=600.0):
    """The first (platform, t) where predicate(state) holds, scanning devices and times."""
    for index in range(devices):
        platform = SimulatedPlatform(profile, ManualClock(), seed, index)
        for t in np.arange(DEFAULT_START_S, DEFAULT_START_S + hours * HOUR_S, step_s):
            if predicate(platform.read_at(float(t))):
                return index, float(t)
    raise AssertionError("no such device/time found")


def test_it_is_a_platform_and_reads_at_the_clock():
    clock = ManualClock()
    platform = SimulatedPlatform(PHONE, clock, 0, 0)
    assert isinstance(platform, Platform)
    assert platform.read().at == clock.now()
    clock.advance(1234)
    assert platform.read().at == DEFAULT_START_S + 1234


def test_same_seed_same_timeline_different_seed_different_timeline():
    until = DEFAULT_START_S + 3 * DAY_S
    for profile in (PHONE, RASPBERRY_PI, LOW_END_PHONE):
        a = SimulatedPlatform(profile, ManualClock(), 42, 7).timeline(until)
        b = SimulatedPlatform(profile, ManualClock(), 42, 7).timeline(until)
        c = SimulatedPlatform(profile, ManualClock(), 43, 7).timeline(until)
        assert a == b and len(a) > 10
        assert a != c


def test_the_timeline_does_not_depend_on_when_the_device_was_read():
    """Wall-clock races change when a device is read, never what its timeline is."""
    until = DEFAULT_START_S + 2 * DAY_S
    untouched = SimulatedPlatform(PHONE, ManualClock(), 5, 3)
    clock = ManualClock()
    busy = SimulatedPlatform(PHONE, clock, 5, 3)
    for dt in np.random.default_rng(1).exponential(900, 150):
        clock.advance(float(dt))
        if clock.now() > until:
            break
        busy.read()
    assert busy.timeline(until) == untouched.timeline(until)
    assert busy.read_at(until).battery_percent == pytest.approx(untouched.read_at(until).battery_percent)


def test_battery_drains_with_training_and_charges_when_plugged():
    clock = ManualClock()
    phone = SimulatedPlatform(quiet(PHONE), clock, 0, 1)
    plug = phone.next_event(clock.now(), {PLUGGED})
    assert plug is not None
    clock.set(plug.t - 600)                       # ten minutes before being plugged in
    before = phone.read().battery_percent
    mah = phone.on_training_steps(100)
    expected = PHONE.battery.train_ma * 100 * phone.training_step_sim_s() / 3600
    assert mah == pytest.approx(expected)
    assert phone.read().battery_percent == pytest.approx(before - 100 * mah / 4000, abs=1e-9)
    assert phone.battery_spent_mah == pytest.approx(mah)
    low = phone.read().battery_percent
    clock.set(plug.t + 3600)                      # an hour on the charger
    assert phone.read().charging
    assert phone.read().battery_percent > low + 20 or phone.read().battery_percent == 100.0


def test_a_phone_unplugged_mid_training_becomes_ineligible_for_training():
    clock = ManualClock()
    phone = SimulatedPlatform(quiet(PHONE), clock, 0, 2)
    unplug = phone.next_event(clock.now() + 2 * HOUR_S, {UNPLUGGED})
    assert unplug is not None
    clock.set(unplug.t - 60)
    state = phone.read()
    assert state.charging
    during = POLICY.check(state, training=True)
    assert Reason.NOT_CHARGING not in during.reasons
    clock.advance(120)                             # the user pulls the cable during the run
    after = POLICY.check(phone.read(), training=True)
    assert not after.eligible and Reason.NOT_CHARGING in after.reasons


def test_metered_cellular_blocks_check_in():
    index, t = find(PHONE, lambda s: s.network is NetworkType.CELLULAR and s.charging)
    state = SimulatedPlatform(PHONE, ManualClock(), 0, index).read_at(t)
    assert state.metered and state.link_up
    decision = POLICY.check(state, training=False)
    assert Reason.METERED_NETWORK in decision.reasons
    assert POLICY.check(state, training=True).reasons.count(Reason.METERED_NETWORK) == 1


def test_offline_means_no_network():
    index, t = find(PHONE, lambda s: s.network is NetworkType.NONE)
    state = SimulatedPlatform(PHONE, ManualClock(), 0, index).read_at(t)
    assert not state.link_up and Reason.NO_NETWORK in POLICY.check(state).reasons


def test_a_pi_has_no_battery_and_is_always_powered():
    clock = ManualClock()
    for index in range(20):
        pi = SimulatedPlatform(RASPBERRY_PI, clock, 0, index)
        for t in np.arange(DEFAULT_START_S, DEFAULT_START_S + 7 * DAY_S, 5 * 3600.0):
            state = pi.read_at(float(t))
            assert state.battery_percent is None and state.charging
            assert state.network in (NetworkType.WIRED, NetworkType.WIFI, NetworkType.NONE)
        assert pi.on_training_steps(1000) == 0.0 and pi.battery_spent_percent is None


def test_compute_factor_scales_step_time():
    clock = ManualClock()
    phones = [SimulatedPlatform(PHONE, clock, 0, i, base_step_s=2.0) for i in range(300)]
    lowends = [SimulatedPlatform(LOW_END_PHONE, clock, 0, i, base_step_s=2.0) for i in range(300)]
    for p in phones[:5]:
        assert p.training_step_sim_s() == pytest.approx(2.0 * p.compute_factor)
    ratio = np.median([p.training_step_sim_s() for p in lowends]) / np.median([p.training_step_sim_s() for p in phones])
    assert ratio == pytest.approx(LOW_END_PHONE.compute.factor_median / PHONE.compute.factor_median, rel=0.1)
    slow = max(phones, key=lambda p: p.compute_factor)
    adapter = ClientAdapter(slow, EligibilityPolicy(require_charging=False, require_unmetered=False,
                                                    min_battery_percent=0, min_free_memory_mb=0))
    adapter.begin_round(1)
    for _ in range(10):
        adapter.eligibility(True)
    assert adapter.finish_training() == pytest.approx(clock.now() + 10 * slow.training_step_sim_s())


def test_training_heats_a_phone():
    clock = ManualClock()
    phone = SimulatedPlatform(PHONE, clock, 0, 0)
    cool = phone.read().cpu_temp_c
    clock.advance(600)
    phone.on_training_steps(int(600 / phone.training_step_sim_s()))
    assert phone.read().cpu_temp_c > cool + 10


def wired_pi(**network):
    spec = NetworkSpec(day=PerLink(wired=1.0), night=None, bandwidth_mbps=PerLink(wired=8.0),
                       latency_ms=PerLink(wired=50.0), bandwidth_sigma=0.0, **network)
    return DeviceProfile(name="pi", kind="pi", battery=RASPBERRY_PI.battery, charging=RASPBERRY_PI.charging,
                         network=spec, failures=QUIET)


def test_upload_takes_latency_plus_bytes_over_bandwidth():
    clock = ManualClock()
    pi = SimulatedPlatform(wired_pi(), clock, 0, 0)
    outcome = pi.on_upload(1_000_000, round_id=1)
    assert outcome.ok and outcome.bytes_sent == 1_000_000 and outcome.link == "wired"
    assert outcome.sim_s == pytest.approx(0.05 + 1.0)          # 8 Mbit/s = 1 MB/s
    assert outcome.done_at == pytest.approx(clock.now() + 1.05)
    assert pi.uplink_bytes == 1_000_000
    assert pi.timeline(clock.now() + 10)[-1].kind == UPLOAD


def test_upload_fails_when_offline_or_when_the_link_changes_mid_upload():
    profile = apply_overrides(quiet(PHONE), {"network": {"bandwidth_sigma": 0.0}}, "t")
    index, t = find(profile, lambda s: s.network is NetworkType.NONE)
    clock = ManualClock(t)
    phone = SimulatedPlatform(profile, clock, 0, index)
    offline = phone.on_upload(1000, round_id=1)
    assert not offline.ok and offline.cause == "no_network" and offline.bytes_sent == 0
    # now start an upload that cannot finish before the next link change
    back = phone.next_event(clock.now(), {"wifi", "cellular"})
    change = phone.next_event(back.t, {"wifi", "cellular", "offline"})
    clock.set(back.t + 1)
    huge = int(1e12)
    outcome = phone.on_upload(huge, round_id=2)
    assert not outcome.ok and outcome.cause == "upload_lost" and "link" in outcome.detail
    assert outcome.sim_s == pytest.approx(change.t - clock.now())
    assert 0 < outcome.bytes_sent < huge
    assert any(e.kind == UPLOAD_LOST for e in phone.timeline(change.t + 1))


def test_cellular_uploads_cost_more_battery_than_wifi():
    spent = {}
    for link in ("wifi", "cellular"):
        profile = apply_overrides(quiet(PHONE), {"network": {"day": {link: 1.0}, "night": {link: 1.0}}}, "t")
        phone = SimulatedPlatform(profile, ManualClock(), 0, 0)
        phone.on_upload(10_000_000, round_id=1)
        spent[link] = phone.battery_spent_mah
    assert spent["wifi"] == pytest.approx(10 * PHONE.battery.mah_per_mb_wifi)
    assert spent["cellular"] == pytest.approx(10 * PHONE.battery.mah_per_mb_cellular)


def test_injected_failure_rates_match_the_profile_over_many_rounds():
    profile = apply_overrides(wired_pi(), {"failures": {"crash_per_round": 0.1, "upload_loss": 0.2,
                                                        "kill_per_train_min": 0.05}}, "t")
    platforms = [SimulatedPlatform(profile, ManualClock(), 3, i) for i in range(100)]
    rounds = range(100)
    n = 100 * len(rounds)
    crashes = sum(p.crashes_this_round(r) for p in platforms for r in rounds) / n
    killed = sum(p.app_killed_during(60.0, round_id=r) for p in platforms for r in rounds) / n
    lost = sum(not p.on_upload(1000, round_id=r).ok for p in platforms[:20] for r in rounds) / (20 * len(rounds))
    assert crashes == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / n))
    assert killed == pytest.approx(0.05, abs=4 * math.sqrt(0.0475 / n))
    assert lost == pytest.approx(0.2, abs=4 * math.sqrt(0.16 / 2000))
    again = SimulatedPlatform(profile, ManualClock(), 3, 0)
    assert [again.crashes_this_round(r) for r in rounds] == [platforms[0].crashes_this_round(r) for r in rounds]


def test_adapter_stops_a_run_when_the_phone_is_unplugged_and_charges_each_step():
    clock = ManualClock()
    phone = SimulatedPlatform(quiet(PHONE), clock, 0, 2)
    unplug = phone.next_event(clock.now() + 2 * HOUR_S, {UNPLUGGED})
    policy = EligibilityPolicy(require_unmetered=False, min_free_memory_mb=0, min_battery_percent=0)
    adapter = ClientAdapter(phone, policy)
    step = phone.training_step_sim_s()
    clock.set(unplug.t - 10.5 * step)             # 10 steps fit before the cable is pulled
    adapter.on_event("selected", {"round": 3})
    answers = []
    while True:                                    # what DeviceClient.should_stop does before each step
        ok, reasons = adapter.eligibility(True)
        answers.append(ok)
        if not ok:
            break
        assert len(answers) < 1000
    assert reasons == ("not_charging",) and answers.count(True) == 11
    adapter.on_event("abandoned", {"round": 3, "reasons": list(reasons)})
    assert phone.train_steps == 11
    adapter.on_event("selected", {"round": 4})
    assert adapter.eligibility(True) == (True, ())  # a new run starts fresh, at the clock's now
    trainings = [e for e in phone.timeline(unplug.t + 60) if e.kind == TRAINING]
    assert trainings[-1].detail == "steps=11"


def test_adapter_injects_crash_and_kill_and_times_the_upload():
    profile = apply_overrides(wired_pi(), {"failures": {"crash_per_round": 0.3, "kill_per_train_min": 0.3}}, "t")
    pi = SimulatedPlatform(profile, ManualClock(), 0, 0)
    adapter = ClientAdapter(pi, EligibilityPolicy(require_idle=False))
    seen = set()
    for round_id in range(1, 40):
        adapter.on_event("selected", {"round": round_id})
        steps = 0
        while steps < 20:
            ok, reasons = adapter.eligibility(True)
            if not ok:
                break
            steps += 1
        if not ok:
            seen.add(reasons[0])
            assert reasons[0] in ("crash", "app_killed")
            assert reasons[0] != "crash" or (steps == 0 and pi.crashes_this_round(round_id))
            adapter.on_event("abandoned", {"round": round_id})
            continue
        outcome = adapter.upload(500_000)
        assert outcome.ok or outcome.cause == "app_killed"
        if outcome.ok:
            assert outcome.started_at == pytest.approx(pi.clock.now() + 20 * pi.training_step_sim_s())
        adapter.on_event("sent", {"round": round_id})
    assert seen == {"crash", "app_killed"}


def test_override_forces_readings_until_cleared():
    clock = ManualClock()
    pi = SimulatedPlatform(RASPBERRY_PI, clock, 0, 0)
    pi.override(charging=False, network=NetworkType.CELLULAR, metered=True)
    state = pi.read()
    assert not state.charging and state.metered
    pi.clear_override()
    assert pi.read().charging
    with pytest.raises(ValueError, match="unknown platform field"):
        pi.override(voltage=3)


def test_eligibility_callable_for_device_client():
    check = SimulatedPlatform(RASPBERRY_PI, ManualClock(), 0, 0).eligibility(EligibilityPolicy(require_idle=False))
    ok, reasons = check(False)
    assert isinstance(ok, bool) and all(isinstance(r, str) for r in reasons)


def test_ten_thousand_platforms_stay_small_in_memory():
    """Memory is per device (a few kB), never per simulated event; prints the figures.

    All 10,000 are created under tracemalloc; reading is measured on every 10th device (a
    read at the start and one 20 simulated hours later, so two days of timelines are cached)
    and scaled to the fleet, because tracemalloc makes 20,000 reads take ~20 s.
    """
    gc.collect()
    tracemalloc.start()
    try:
        clock = ManualClock()
        profiles = (PHONE, RASPBERRY_PI, LOW_END_PHONE)
        base = tracemalloc.get_traced_memory()[0]
        fleet = [SimulatedPlatform(profiles[i % 3], clock, 0, i) for i in range(10_000)]
        created = tracemalloc.get_traced_memory()[0] - base
        sample = fleet[::10]
        for at in (0.0, 20 * HOUR_S):
            clock.set(DEFAULT_START_S + at)
            for platform in sample:
                platform.read()
        read_per_device = (tracemalloc.get_traced_memory()[0] - base - created) / len(sample)
    finally:
        tracemalloc.stop()
    total = created + read_per_device * len(fleet)
    print(f"\n10,000 SimulatedPlatform: {created / 1e6:.1f} MB created; "
          f"+{read_per_device / 1e3:.1f} kB per device once read over two days; {total / 1e6:.1f} MB in all")
    assert created < 30e6
    assert total < 100e6


def test_reads_from_many_threads_while_training_is_charged():
    """The simulator reads from paho's thread while training threads spend the battery."""
    import threading

    from device_sim.clock import VirtualClock

    clock = VirtualClock(speedup=36_000)  # 10 simulated hours per wall second
    phone = SimulatedPlatform(PHONE, clock, 0, 0)
    errors = []

    def reader():
        try:
            for _ in range(300):
                assert 0.0 <= phone.read().battery_percent <= 100.0
                phone.link_at()
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    def trainer():
        for _ in range(300):
            phone.on_training_steps(1)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=trainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and phone.train_steps == 300
