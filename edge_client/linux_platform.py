"""The Platform of a real Linux device (Raspberry Pi, laptop, phone running Linux).

Reads the kernel's own files (sysfs, procfs) rather than calling tools, so it needs nothing
installed, costs well under a millisecond, and can be tested against a fake tree: every path
is taken under `root`. A file that is missing or unreadable never raises: the reading falls
back to UNKNOWN/None (or to the cautious value) and the gap is logged once at debug level.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_client.platform import NetworkType, PlatformState

log = logging.getLogger(__name__)

# Interfaces that never carry the device's own traffic to the broker.
_VIRTUAL_PREFIXES = ("lo", "docker", "veth", "br-", "virbr", "ifb", "dummy", "tun", "tap", "wg",
                     "tailscale", "zt", "vmnet", "vboxnet", "sit", "ip6tnl", "gre")
_CELLULAR_PREFIXES = ("wwan", "rmnet", "ppp", "wwp", "usb_rmnet", "ccmni")
_POWERED_TYPES = ("Mains", "USB", "Wireless")
# "Not charging" is what a battery with a charge limit reports while plugged in.
_ON_POWER_STATUSES = ("Charging", "Full", "Not charging")
# Priority when no default route tells which link is used: the OS prefers these first.
_PREFERENCE = {NetworkType.WIRED: 0, NetworkType.WIFI: 1, NetworkType.CELLULAR: 2}


class LinuxPlatform:
    """Reads battery, power, network, memory, temperature and load from sysfs/procfs.

    Args:
        root: filesystem root to read under; tests pass a fake tree.
        idle_after_s: the device counts as idle only once its load has stayed under the
            threshold for this long (across reads), so a short lull while the user types is
            not mistaken for idleness. 0 means "idle as soon as the load is low".
        idle_load_per_core: 1-minute load average per core below which the device is idle.
        metered_interfaces: interface names to treat as metered although not cellular
            (a Wi-Fi hotspot of a phone, a satellite modem on ethernet).
        unmetered_interfaces: cellular interfaces to treat as unmetered (a flat-rate plan).
        cpu_count: cores for the load ratio; by default read from the tree, else os.cpu_count().
        clock: monotonic clock for `at` and for the idle timer.
        use_psutil: when reading the real root, fall back to psutil for memory and load if
            /proc is unreadable (psutil itself reads /proc on Linux, so this rarely matters).
    """

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        idle_after_s: float = 60.0,
        idle_load_per_core: float = 0.5,
        metered_interfaces: Iterable[str] = (),
        unmetered_interfaces: Iterable[str] = (),
        cpu_count: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        use_psutil: bool = True,
    ) -> None:
        if idle_after_s < 0 or idle_load_per_core <= 0:
            raise ValueError("idle_after_s must be >= 0 and idle_load_per_core > 0")
        self.root = Path(root)
        self.idle_after_s = float(idle_after_s)
        self.idle_load_per_core = float(idle_load_per_core)
        self.metered_interfaces = frozenset(metered_interfaces)
        self.unmetered_interfaces = frozenset(unmetered_interfaces)
        self._clock = clock
        self._use_psutil = use_psutil and self.root == Path("/")
        self._cpu_count = cpu_count or self._read_cpu_count()
        self._low_load_since: float | None = None
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    # -- the Platform protocol -------------------------------------------------------------
    def read(self) -> PlatformState:
        now = self._clock()
        battery, charging = self.read_power()
        network, link_up, metered = self.read_network()
        return PlatformState(
            battery_percent=battery,
            charging=charging,
            network=network,
            metered=metered,
            link_up=link_up,
            idle=self.read_idle(now),
            free_memory_mb=self.read_free_memory_mb(),
            cpu_temp_c=self.read_cpu_temp_c(),
            at=now,
        )

    # -- power -----------------------------------------------------------------------------
    def read_power(self) -> tuple[float | None, bool]:
        """(battery percent or None if there is no battery, on external power?)."""
        supplies = self._path("sys/class/power_supply")
        try:
            entries = sorted(supplies.iterdir())
        except OSError:
            self._debug_once(f"no {supplies}: assuming mains power and no battery")
            return None, True
        capacities: list[float] = []
        statuses: list[str] = []
        any_online = False
        for entry in entries:
            kind = self._text(entry / "type")
            if kind == "Battery":
                if self._text(entry / "scope") == "Device":
                    continue  # a wireless mouse's battery, not ours
                capacity = self._number(entry / "capacity")
                if capacity is None:
                    capacity = self._energy_ratio(entry)
                if capacity is not None:
                    capacities.append(min(100.0, max(0.0, capacity)))
                statuses.append(self._text(entry / "status") or "Unknown")
            elif kind in _POWERED_TYPES:
                if self._number(entry / "online") == 1:
                    any_online = True
        if not capacities and not statuses:
            return None, True  # no battery (a Pi): runs on external power by definition
        battery = sum(capacities) / len(capacities) if capacities else None
        if battery is None:
            self._debug_once("a battery without readable capacity: reporting no battery level")
        charging = any_online or any(s in _ON_POWER_STATUSES for s in statuses)
        return battery, charging

    def _energy_ratio(self, entry: Path) -> float | None:
        for now_name, full_name in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            now, full = self._number(entry / now_name), self._number(entry / full_name)
            if now is not None and full:
                return 100.0 * now / full
        return None

    # -- network ---------------------------------------------------------------------------
    def read_network(self) -> tuple[NetworkType, bool, bool]:
        """(type of the link in use, is it up, is it metered).

        The link in use is the one holding the default route (/proc/net/route, lowest
        metric) when that is readable, else the most preferred link that is up
        (wired, then Wi-Fi, then cellular), as the kernel's routing usually chooses.
        """
        net = self._path("sys/class/net")
        try:
            names = sorted(p.name for p in net.iterdir())
        except OSError:
            self._debug_once(f"no {net}: network unknown, treated as down and metered")
            return NetworkType.UNKNOWN, False, True
        up: dict[str, NetworkType] = {}
        for name in names:
            kind = self._interface_type(net / name)
            if kind is not None and self._interface_up(net / name):
                up[name] = kind
        if not up:
            return NetworkType.NONE, False, False
        chosen = None
        for iface in self._default_route_interfaces():
            if iface in up:
                chosen = iface
                break
        if chosen is None:
            chosen = min(up, key=lambda n: (_PREFERENCE.get(up[n], 9), n))
        kind = up[chosen]
        metered = (kind is NetworkType.CELLULAR and chosen not in self.unmetered_interfaces) or (
            chosen in self.metered_interfaces
        )
        return kind, True, metered

    def _interface_type(self, iface: Path) -> NetworkType | None:
        """WIRED/WIFI/CELLULAR, or None for loopback and virtual interfaces."""
        name = iface.name
        uevent = self._uevent(iface)
        devtype = uevent.get("DEVTYPE", "")
        if (iface / "wireless").exists() or (iface / "phy80211").exists() or devtype == "wlan":
            return NetworkType.WIFI
        if devtype == "wwan" or name.startswith(_CELLULAR_PREFIXES):
            return NetworkType.CELLULAR
        if self._text(iface / "type") == "772" or name.startswith(_VIRTUAL_PREFIXES):
            return None  # 772 = ARPHRD_LOOPBACK
        if devtype in ("bridge", "wireguard", "tun", "veth", "gre"):
            return None
        return NetworkType.WIRED

    def _interface_up(self, iface: Path) -> bool:
        state = self._text(iface / "operstate")
        if state == "up":
            return True
        if state == "unknown":  # ppp and some drivers never report "up": trust the carrier
            return self._number(iface / "carrier") == 1
        return False

    def _default_route_interfaces(self) -> list[str]:
        """Interfaces with a default route, lowest metric first; [] when unreadable."""
        text = self._text(self._path("proc/net/route"), strip=False)
        if not text:
            return []
        routes: list[tuple[int, str]] = []
        for line in text.splitlines()[1:]:
            cols = line.split()
            # Iface Destination Gateway Flags RefCnt Use Metric Mask ...: default = 0/0
            if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
                try:
                    flags, metric = int(cols[3], 16), int(cols[6])
                except ValueError:
                    continue
                if flags & 0x1:  # RTF_UP
                    routes.append((metric, cols[0]))
        return [name for _, name in sorted(routes)]

    # -- memory, heat, load ----------------------------------------------------------------
    def read_free_memory_mb(self) -> float:
        """MemAvailable in MiB; 0.0 (cautious: no training) when it cannot be read."""
        text = self._text(self._path("proc/meminfo"), strip=False)
        fields: dict[str, float] = {}
        for line in (text or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                try:
                    fields[key.strip()] = float(parts[0])
                except ValueError:
                    continue
        if "MemAvailable" in fields:
            return fields["MemAvailable"] / 1024.0
        if "MemFree" in fields:  # kernels before 3.14
            return (fields["MemFree"] + fields.get("Buffers", 0.0) + fields.get("Cached", 0.0)) / 1024.0
        if self._use_psutil:
            try:
                import psutil

                return psutil.virtual_memory().available / 2**20
            except Exception as exc:  # noqa: BLE001 - any failure means "unknown"
                self._debug_once(f"psutil memory failed: {exc}")
        self._debug_once("no /proc/meminfo: reporting 0 MB free so the policy stays cautious")
        return 0.0

    def read_cpu_temp_c(self) -> float | None:
        """Hottest thermal zone in degrees Celsius; None if the device exposes none."""
        hottest: float | None = None
        try:
            zones = sorted(self._path("sys/class/thermal").glob("thermal_zone*"))
        except OSError:
            zones = []
        for zone in zones:
            milli = self._number(zone / "temp")
            if milli is None:
                continue
            celsius = milli / 1000.0
            if -40.0 <= celsius <= 150.0:  # drivers report -273 or garbage for absent sensors
                hottest = celsius if hottest is None else max(hottest, celsius)
        if hottest is None:
            self._debug_once("no readable thermal zone: cpu temperature unknown")
        return hottest

    def read_load_per_core(self) -> float | None:
        """1-minute load average divided by the core count; None if unreadable."""
        text = self._text(self._path("proc/loadavg"))
        load: float | None = None
        if text:
            try:
                load = float(text.split()[0])
            except (ValueError, IndexError):
                load = None
        if load is None and self._use_psutil:
            try:
                import psutil

                load = psutil.getloadavg()[0]
            except Exception as exc:  # noqa: BLE001
                self._debug_once(f"psutil load failed: {exc}")
        if load is None:
            self._debug_once("no /proc/loadavg: device never counts as idle")
            return None
        return load / self._cpu_count

    def read_idle(self, now: float | None = None) -> bool:
        """Low load for at least `idle_after_s` (timed across successive reads)."""
        now = self._clock() if now is None else now
        load = self.read_load_per_core()
        with self._lock:
            if load is None or load >= self.idle_load_per_core:
                self._low_load_since = None
                return False
            if self._low_load_since is None:
                self._low_load_since = now
            return now - self._low_load_since >= self.idle_after_s

    def _read_cpu_count(self) -> int:
        text = self._text(self._path("sys/devices/system/cpu/online"))
        count = 0
        for part in (text or "").split(","):
            lo, _, hi = part.partition("-")
            try:
                count += int(hi or lo) - int(lo) + 1
            except ValueError:
                count = 0
                break
        if count <= 0:
            count = os.cpu_count() or 1
        return count

    # -- file helpers ----------------------------------------------------------------------
    def _path(self, relative: str) -> Path:
        return self.root / relative

    def _text(self, path: Path, *, strip: bool = True) -> str | None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return text.strip() if strip else text

    def _number(self, path: Path) -> float | None:
        text = self._text(path)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            self._debug_once(f"{path} holds {text[:40]!r}, not a number")
            return None
        return value if math.isfinite(value) else None

    def _uevent(self, iface: Path) -> dict[str, str]:
        text = self._text(iface / "uevent") or ""
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def _debug_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.debug("%s", message)
