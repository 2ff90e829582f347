"""StaticPlatform: the settable platform that tests and the simulator use."""
from __future__ import annotations

import threading

import pytest

from edge_client.platform import NetworkType, Platform, PlatformState, StaticPlatform


def test_default_is_an_ideal_always_powered_device():
    state = StaticPlatform(clock=lambda: 12.5).read()
    assert state.battery_percent is None and state.charging
    assert state.network is NetworkType.WIRED and state.link_up and not state.metered
    assert state.idle and state.free_memory_mb >= 200 and state.cpu_temp_c is None
    assert state.at == 12.5


def test_set_changes_only_the_given_fields_and_read_stamps_the_clock():
    now = [1.0]
    platform = StaticPlatform(clock=lambda: now[0], battery_percent=80.0)
    platform.set(charging=False, network=NetworkType.CELLULAR, metered=True)
    now[0] = 2.0
    state = platform.read()
    assert (state.battery_percent, state.charging) == (80.0, False)
    assert (state.network, state.metered) == (NetworkType.CELLULAR, True)
    assert state.at == 2.0 and platform.reads == 1


def test_network_given_as_string_becomes_the_enum():
    assert StaticPlatform(network="wifi").read().network is NetworkType.WIFI


def test_unknown_field_is_refused_and_names_it():
    platform = StaticPlatform()
    with pytest.raises(ValueError, match="batery"):
        platform.set(batery=3)
    with pytest.raises(ValueError, match="at"):
        platform.set(at=5.0)  # `at` is stamped at read time, not set


def test_invalid_value_is_refused_and_the_old_state_kept():
    platform = StaticPlatform(battery_percent=50.0)
    with pytest.raises(ValueError, match="battery_percent"):
        platform.set(battery_percent=150.0)
    with pytest.raises(ValueError, match="free_memory_mb"):
        platform.set(free_memory_mb=-1.0)
    assert platform.read().battery_percent == 50.0


def test_platform_state_is_frozen():
    state = StaticPlatform().read()
    with pytest.raises(AttributeError):
        state.charging = False  # type: ignore[misc]
    assert isinstance(state, PlatformState)


def test_static_platform_satisfies_the_protocol():
    assert isinstance(StaticPlatform(), Platform)


def test_concurrent_set_and_read_never_mix_two_updates():
    """Each set() changes battery and charging together; a reader must never see a half update."""
    platform = StaticPlatform(battery_percent=10.0, charging=False)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            if i % 2:
                platform.set(battery_percent=90.0, charging=True)
            else:
                platform.set(battery_percent=10.0, charging=False)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        for _ in range(20_000):
            state = platform.read()
            seen.add((state.battery_percent, state.charging))
    finally:
        stop.set()
        thread.join()
    assert seen <= {(10.0, False), (90.0, True)}


def test_device_modules_never_import_tensorflow():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, edge_client.platform, edge_client.linux_platform, edge_client.eligibility, "
            "edge_client.textstore; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras')]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
