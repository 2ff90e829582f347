"""LinuxPlatform against fake sysfs/procfs trees, and once against this machine's real /."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_client.linux_platform import LinuxPlatform
from edge_client.platform import NetworkType, PlatformState

MEMINFO = "MemTotal:        3884328 kB\nMemFree:          812000 kB\nMemAvailable:    2048000 kB\n"
ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_iface(root: Path, name: str, *, state: str = "up", wireless: bool = False, devtype: str = "",
              carrier: str | None = None, kind: str = "1") -> None:
    base = f"sys/class/net/{name}"
    write(root, f"{base}/operstate", state + "\n")
    write(root, f"{base}/type", kind + "\n")
    write(root, f"{base}/uevent", f"INTERFACE={name}\n" + (f"DEVTYPE={devtype}\n" if devtype else ""))
    if wireless:
        (root / base / "wireless").mkdir(exist_ok=True)
    if carrier is not None:
        write(root, f"{base}/carrier", carrier + "\n")


def add_route(root: Path, iface: str, metric: int) -> None:
    path = root / "proc/net/route"
    text = path.read_text() if path.exists() else ROUTE_HEADER
    text += f"{iface}\t00000000\t0101A8C0\t0003\t0\t0\t{metric}\t00000000\t0\t0\t0\n"
    write(root, "proc/net/route", text)


def pi_tree(root: Path, *, load: float = 0.1, temp_milli: int = 48_312) -> Path:
    """A Raspberry Pi 4: no battery, ethernet up, Wi-Fi down, 4 cores, one thermal zone."""
    write(root, "proc/meminfo", MEMINFO)
    write(root, "proc/loadavg", f"{load:.2f} 0.20 0.15 1/180 4242\n")
    write(root, "sys/devices/system/cpu/online", "0-3\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", f"{temp_milli}\n")
    (root / "sys/class/power_supply").mkdir(parents=True)
    add_iface(root, "lo", state="unknown", kind="772", carrier="1")
    add_iface(root, "eth0")
    add_iface(root, "wlan0", state="down", wireless=True, devtype="wlan")
    return root


def add_battery(root: Path, capacity: int, status: str, *, ac_online: int | None = None) -> None:
    write(root, "sys/class/power_supply/BAT0/type", "Battery\n")
    write(root, "sys/class/power_supply/BAT0/capacity", f"{capacity}\n")
    write(root, "sys/class/power_supply/BAT0/status", f"{status}\n")
    if ac_online is not None:
        write(root, "sys/class/power_supply/AC/type", "Mains\n")
        write(root, "sys/class/power_supply/AC/online", f"{ac_online}\n")


def test_raspberry_pi_without_battery_is_always_powered(tmp_path):
    state = LinuxPlatform(pi_tree(tmp_path), idle_after_s=0, clock=lambda: 7.0).read()
    assert state == PlatformState(battery_percent=None, charging=True, network=NetworkType.WIRED, metered=False,
                                  link_up=True, idle=True, free_memory_mb=2000.0, cpu_temp_c=48.312, at=7.0)


def test_laptop_on_battery_discharging(tmp_path):
    pi_tree(tmp_path)
    add_battery(tmp_path, 57, "Discharging", ac_online=0)
    battery, charging = LinuxPlatform(tmp_path).read_power()
    assert (battery, charging) == (57.0, False)


@pytest.mark.parametrize("status, ac, expected", [
    ("Charging", 1, True),
    ("Full", None, True),
    ("Not charging", None, True),  # charge limit reached while plugged in
    ("Discharging", 1, True),  # AC says online even if the battery driver lags
    ("Unknown", 0, False),
])
def test_charging_from_battery_status_or_mains(tmp_path, status, ac, expected):
    pi_tree(tmp_path)
    add_battery(tmp_path, 80, status, ac_online=ac)
    assert LinuxPlatform(tmp_path).read_power() == (80.0, expected)


def test_usb_supply_online_counts_as_powered_and_device_scope_batteries_are_ignored(tmp_path):
    pi_tree(tmp_path)
    add_battery(tmp_path, 30, "Discharging")
    write(tmp_path, "sys/class/power_supply/usb/type", "USB\n")
    write(tmp_path, "sys/class/power_supply/usb/online", "1\n")
    write(tmp_path, "sys/class/power_supply/hidpp_battery_0/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/hidpp_battery_0/scope", "Device\n")
    write(tmp_path, "sys/class/power_supply/hidpp_battery_0/capacity", "5\n")
    assert LinuxPlatform(tmp_path).read_power() == (30.0, True)


def test_battery_level_from_energy_when_capacity_is_missing(tmp_path):
    pi_tree(tmp_path)
    write(tmp_path, "sys/class/power_supply/BAT1/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/BAT1/status", "Discharging\n")
    write(tmp_path, "sys/class/power_supply/BAT1/energy_now", "25000000\n")
    write(tmp_path, "sys/class/power_supply/BAT1/energy_full", "50000000\n")
    assert LinuxPlatform(tmp_path).read_power() == (50.0, False)


def test_wifi_is_told_apart_from_ethernet(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, "wlan0", wireless=True)
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.WIFI, True, False)


def test_wifi_detected_by_phy80211_link_alone(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, "wlp2s0")
    (tmp_path / "sys/class/net/wlp2s0/phy80211").mkdir()
    assert LinuxPlatform(tmp_path).read_network()[0] is NetworkType.WIFI


@pytest.mark.parametrize("name, devtype", [("wwan0", ""), ("rmnet_data0", ""), ("ppp0", ""), ("mhi0", "wwan")])
def test_cellular_is_metered(tmp_path, name, devtype):
    pi_tree(tmp_path)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, name, devtype=devtype)
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.CELLULAR, True, True)


def test_ppp_with_unknown_operstate_is_up_when_it_has_carrier(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, "ppp0", state="unknown", carrier="1")
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.CELLULAR, True, True)


def test_metered_overrides(tmp_path):
    pi_tree(tmp_path)
    assert LinuxPlatform(tmp_path, metered_interfaces=["eth0"]).read_network() == (NetworkType.WIRED, True, True)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, "wwan0")
    flat_rate = LinuxPlatform(tmp_path, unmetered_interfaces=["wwan0"])
    assert flat_rate.read_network() == (NetworkType.CELLULAR, True, False)


def test_without_default_route_wired_is_preferred_over_cellular(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "wwan0")
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.WIRED, True, False)


def test_default_route_decides_which_link_is_in_use(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "wwan0")
    add_route(tmp_path, "eth0", 600)
    add_route(tmp_path, "wwan0", 100)  # lower metric: the traffic goes over cellular
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.CELLULAR, True, True)


def test_virtual_interfaces_do_not_count_as_a_link(tmp_path):
    pi_tree(tmp_path)
    add_iface(tmp_path, "eth0", state="down")
    add_iface(tmp_path, "docker0", devtype="bridge")
    add_iface(tmp_path, "veth1a2b")
    add_iface(tmp_path, "br0", devtype="bridge")
    assert LinuxPlatform(tmp_path).read_network() == (NetworkType.NONE, False, False)


def test_hot_cpu_reports_the_hottest_zone_and_skips_bogus_ones(tmp_path):
    pi_tree(tmp_path, temp_milli=61_000)
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "82500\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/temp", "-273000\n")  # absent sensor
    write(tmp_path, "sys/class/thermal/thermal_zone3/temp", "garbage\n")
    assert LinuxPlatform(tmp_path).read_cpu_temp_c() == 82.5


def test_memory_falls_back_to_memfree_on_old_kernels(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal: 1000 kB\nMemFree: 1024 kB\nBuffers: 1024 kB\nCached: 2048 kB\n")
    assert LinuxPlatform(tmp_path).read_free_memory_mb() == 4.0


def test_idle_needs_low_load_for_idle_after_s(tmp_path):
    now = [100.0]
    platform = LinuxPlatform(pi_tree(tmp_path, load=0.4), idle_after_s=30, clock=lambda: now[0])
    assert platform.read_load_per_core() == pytest.approx(0.1)
    assert not platform.read().idle  # low load just seen: not yet idle
    now[0] = 131.0
    assert platform.read().idle
    write(tmp_path, "proc/loadavg", "3.20 1.0 0.5 3/180 4242\n")  # 0.8 per core: busy
    assert not platform.read().idle
    write(tmp_path, "proc/loadavg", "0.10 1.0 0.5 3/180 4242\n")
    now[0] = 140.0
    assert not platform.read().idle  # the timer restarted when the load went up
    now[0] = 170.0
    assert platform.read().idle


def test_cpu_count_from_the_tree_scales_the_load(tmp_path):
    pi_tree(tmp_path, load=1.5)
    write(tmp_path, "sys/devices/system/cpu/online", "0-1,4-5\n")
    assert LinuxPlatform(tmp_path).read_load_per_core() == pytest.approx(0.375)
    assert LinuxPlatform(tmp_path, cpu_count=1).read_load_per_core() == pytest.approx(1.5)


def test_empty_tree_does_not_crash_and_falls_back_cautiously(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_client.linux_platform")
    state = LinuxPlatform(tmp_path, idle_after_s=0, clock=lambda: 1.0).read()
    assert state.battery_percent is None and state.charging  # no power_supply: assume mains
    assert (state.network, state.link_up, state.metered) == (NetworkType.UNKNOWN, False, True)
    assert state.free_memory_mb == 0.0  # fake root: psutil is not consulted
    assert state.cpu_temp_c is None and not state.idle
    assert "no /proc/meminfo" in caplog.text and "no /proc/loadavg" in caplog.text


def test_unreadable_files_and_garbage_values_do_not_crash(tmp_path):
    pi_tree(tmp_path)
    add_battery(tmp_path, 50, "Discharging")
    write(tmp_path, "sys/class/power_supply/BAT0/capacity", "n/a\n")
    write(tmp_path, "proc/loadavg", "\n")
    write(tmp_path, "proc/meminfo", "nonsense\n")
    (tmp_path / "sys/class/net/eth0/operstate").unlink()
    state = LinuxPlatform(tmp_path, idle_after_s=0).read()
    assert state.battery_percent is None and not state.charging
    assert not state.idle and state.free_memory_mb == 0.0
    assert state.network is NetworkType.NONE


def test_debug_gaps_are_logged_once(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_client.linux_platform")
    platform = LinuxPlatform(tmp_path)
    for _ in range(3):
        platform.read()
    assert caplog.text.count("no /proc/loadavg") == 1


def test_reads_this_machine(caplog):
    """The real / of whatever runs the tests: values must have the right types and ranges."""
    platform = LinuxPlatform(idle_after_s=0)
    state = platform.read()
    assert state.battery_percent is None or 0.0 <= state.battery_percent <= 100.0
    assert isinstance(state.charging, bool) and isinstance(state.idle, bool)
    assert isinstance(state.link_up, bool) and isinstance(state.metered, bool)
    assert isinstance(state.network, NetworkType)
    assert isinstance(state.free_memory_mb, float) and state.free_memory_mb > 0
    assert state.cpu_temp_c is None or isinstance(state.cpu_temp_c, float)
    assert isinstance(state.at, float)
    load = platform.read_load_per_core()
    assert load is None or load >= 0.0
