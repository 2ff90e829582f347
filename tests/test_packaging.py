"""The wheel users install holds every package and data file of the tree.

Editable installs (what the tests and the README use) see the source tree, so a package or a
data file missing from the wheel would go unnoticed until a device installs `fedboard[edge]`
from a wheel: this builds the real wheel and compares it with the tree.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("models", "protocol", "edge_client", "aggregator", "device_sim")
DATA = ("edge_client/deploy/client.example.toml", "edge_client/deploy/fedboard-client.service",
        "aggregator/deploy/fedboard-aggregator.service", "device_sim/scenarios/iot-pis.toml",
        "device_sim/scenarios/phones-overnight.toml", "device_sim/scenarios/flaky-network.toml")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, timeout=300, cwd=build)
    (wheel,) = out.glob("fedboard-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_every_module_of_the_tree_is_in_the_wheel(wheel_names: set[str]) -> None:
    modules = {p.relative_to(ROOT).as_posix() for top in TOP for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert any(m.startswith("protocol/codec/") for m in modules)  # subpackages are part of the check
    assert not modules - wheel_names, f"missing from the wheel: {sorted(modules - wheel_names)}"


def test_data_files_are_in_the_wheel(wheel_names: set[str]) -> None:
    assert not set(DATA) - wheel_names, f"missing from the wheel: {sorted(set(DATA) - wheel_names)}"
