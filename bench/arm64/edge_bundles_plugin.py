"""pytest plugin: run fedboard's device-side tests where TensorFlow is absent (the emulated arm64 root).

Training bundles are exported with TensorFlow, which the device does not have. This plugin lets the
host (x86, TensorFlow installed) export them and hands the files to the device's test run:

  FEDBOARD_BUNDLES_DIR=DIR FEDBOARD_BUNDLES_MODE=record   (host)  every bundle a test exports, through
      `models.export.export_bundle` or into a `cache_dir` fixture's bundle cache, is copied into DIR,
      keyed by everything that determines it (config, vocabulary, seed, initial weights).
  FEDBOARD_BUNDLES_DIR=DIR FEDBOARD_BUNDLES_MODE=replay   (device) `models.export` is a stand-in whose
      `export_bundle` copies the recorded file for the same inputs, and every `cache_dir` fixture
      starts with the recorded bundle cache. Nothing of TensorFlow is imported.

In either mode a test (or a whole module) that fails only because a server/simulator-only package
is missing (TensorFlow, dp-accounting, amqtt, ...) is reported as skipped, naming the package, so
the device's run separates "needs the server extra" from real failures. tests/test_no_tensorflow.py
still checks that no device module imports TensorFlow.

Load with `-p edge_bundles_plugin` and this directory on PYTHONPATH. Not part of the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

SERVER_ONLY = {"tensorflow", "keras", "tf_keras", "dp_accounting", "prometheus_client", "amqtt", "matplotlib",
               "tqdm", "scipy", "h5py"}
MISSING = re.compile(r"No module named '([\w.]+)'")

try:  # registered at import (`-p` loads this before tests/conftest.py picks HYPOTHESIS_PROFILE)
    from hypothesis import HealthCheck, Phase, settings

    # Emulation is 30-100x slower: fewer examples, no deadline, no shrinking; derandomized, so a
    # run is repeatable (a failure prints its reproduction blob).
    settings.register_profile(
        "emulated", deadline=None, print_blob=True, derandomize=True, database=None,
        max_examples=int(os.environ.get("FEDBOARD_EXAMPLES", "10")),
        suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target))
except ImportError:
    pass

_DIR = Path(os.environ["FEDBOARD_BUNDLES_DIR"]) if os.environ.get("FEDBOARD_BUNDLES_DIR") else None
_MODE = os.environ.get("FEDBOARD_BUNDLES_MODE", "")
_CACHE_DIRS: list[Path] = []
_STATS = {"recorded": 0, "replayed": 0, "missing": 0}


def export_key(config, vocab_json: dict, seed: int, initial_weights) -> str:
    import numpy as np

    weights = None if initial_weights is None else hashlib.sha256(
        np.ascontiguousarray(initial_weights, dtype="<f4").tobytes()).hexdigest()
    blob = json.dumps({"config": config.to_dict(), "vocab": vocab_json, "seed": int(seed), "weights": weights},
                      sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _install_recorder() -> None:
    import models.export as real

    original = real.export_bundle

    def export_bundle(config, vocab_json, out_path, *, seed=0, initial_weights=None):
        path = original(config, vocab_json, out_path, seed=seed, initial_weights=initial_weights)
        target = _DIR / "exports" / f"{export_key(config, vocab_json, seed, initial_weights)}.fbz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        _STATS["recorded"] += 1
        return path

    real.export_bundle = export_bundle


def _install_replayer() -> None:
    import models

    stand_in = types.ModuleType("models.export")
    stand_in.__doc__ = "Replays bundles exported on the host (bench/arm64/edge_bundles_plugin.py)."

    def export_bundle(config, vocab_json, out_path, *, seed=0, initial_weights=None):
        source = _DIR / "exports" / f"{export_key(config, vocab_json, seed, initial_weights)}.fbz"
        if not source.is_file():
            _STATS["missing"] += 1
            raise ModuleNotFoundError("No module named 'tensorflow' (and no bundle recorded on the host for "
                                      "these inputs)", name="tensorflow")
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out)
        _STATS["replayed"] += 1
        return out

    stand_in.export_bundle = export_bundle
    sys.modules["models.export"] = stand_in
    models.export = stand_in


def pytest_configure(config):
    if _DIR is None or _MODE not in ("record", "replay"):
        return
    _DIR.mkdir(parents=True, exist_ok=True)
    if _MODE == "record":
        _install_recorder()
    else:
        _install_replayer()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    result = yield
    if _DIR is not None and fixturedef.argname == "cache_dir" and isinstance(result, Path):
        _CACHE_DIRS.append(result)
        recorded = _DIR / "cache"
        if _MODE == "replay" and recorded.is_dir():
            shutil.copytree(recorded, result, dirs_exist_ok=True)
    return result


def pytest_sessionfinish(session):
    if _DIR is None or _MODE != "record":
        return
    for directory in _CACHE_DIRS:
        for path in directory.rglob("*.fbz"):
            if ".tmp." in path.name:
                continue
            target = _DIR / "cache" / path.relative_to(directory)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            _STATS["recorded"] += 1


def pytest_terminal_summary(terminalreporter):
    if _DIR is not None and _MODE:
        terminalreporter.write_line(f"edge_bundles_plugin ({_MODE}): {_STATS}")


def _server_only_missing(text: str) -> str | None:
    for name in MISSING.findall(text):
        if name.split(".")[0] in SERVER_ONLY:
            return name.split(".")[0]
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(ImportError):
        missing = _server_only_missing(str(call.excinfo.value))
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {missing} (server side)")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.failed and report.longrepr is not None:
        missing = _server_only_missing(str(report.longrepr))
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: needs {missing} (server side)")
    return report
