"""Results are hard to lose: Ctrl-C keeps what was done, a bad --out fails before anything runs.

Real `fedboard` processes (python -m device_sim.cli) with tiny settings get a real SIGINT once
their log says the first round (point, epoch) is done: they must stop cleanly (exit 130, no
traceback), write the report of what was done marked partial, and say where on stderr.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_SIM = ["--devices", "6", "--clients-per-round", "3", "--vocab-size", "300", "--embed-dim", "16", "--units", "32",
            "--seed", "3", "--no-progress", "--deadline-s", "120"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Fedboard:
    """A `fedboard` subprocess whose stderr is read on a thread, so a test can wait for a line."""

    def __init__(self, *argv: str) -> None:
        # a terminal's Ctrl-C: SIGINT at its default disposition in the child, even when this test
        # runs as a background job of a non-interactive shell (which starts it ignored)
        self.proc = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "--log-level", "INFO", *argv], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_default_sigint)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float, after: int = 0) -> int:
        """Until a stderr line after line `after` matches `pattern`; returns its index (fails at the
        timeout or if the process ends first)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((i for i in range(after, len(self.lines)) if regex.search(self.lines[i])), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    self.kill()
                    pytest.fail(f"no line matching {pattern!r} within {timeout_s} s:\n{self.stderr[-3000:]}")
                self._changed.wait(min(left, 1.0))

    def interrupt(self, timeout_s: float = 120.0) -> tuple[int, str]:
        """SIGINT (what Ctrl-C sends); returns the exit status and the whole stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout_s} s after SIGINT:\n{self.stderr[-3000:]}")
        self._reader.join(10)
        return self.proc.returncode, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def fedboard():
    started: list[Fedboard] = []

    def start(*argv: str) -> Fedboard:
        started.append(Fedboard(*argv))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def last_stderr_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_ctrl_c_in_simulate_keeps_a_partial_report_of_the_rounds_done(tmp_path, cache_dir, fedboard):
    out = tmp_path / "run"
    run = fedboard("simulate", *TINY_SIM, "--rounds", "200", "--out", str(out))
    run.wait_for(r"device_sim\.simulate: round 1\b", 300)  # its row is in the report
    code, stderr = run.interrupt()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] is True and report["stopped_by"] == "SIGINT"
    assert 1 <= report["rounds"] == len(report["per_round"]) < 200
    assert report["rounds_requested"] == 200 and report["config"]["rounds"] == 200
    assert (out / "accuracy.png").stat().st_size > 1000
    said = last_stderr_line(stderr)
    assert said.startswith("fedboard simulate: interrupted; kept the partial report of ")
    assert str(out / "report.json") in said


def test_ctrl_c_before_the_first_round_is_one_line_and_keeps_no_results(tmp_path, cache_dir, fedboard):
    out = tmp_path / "run"
    run = fedboard("simulate", *TINY_SIM, "--rounds", "200", "--out", str(out))
    run.wait_for(r"device_sim\.simulate: task ", 300)  # corpus and model ready; the broker is starting
    code, stderr = run.interrupt()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    said = last_stderr_line(stderr)
    if (out / "report.json").exists():  # the signal was slower than a whole round: a partial report
        assert json.loads((out / "report.json").read_text())["partial"] is True
        assert said.startswith("fedboard simulate: interrupted; kept the partial report of ")
    else:
        assert said == f"fedboard simulate: interrupted; no round had finished: no results written to {out}"


def test_ctrl_c_in_tune_keeps_the_points_done_and_the_sweep_resumes(tmp_path, cache_dir, fedboard):
    out = tmp_path / "tune"
    argv = ["tune", "--codec", "q8", *TINY_SIM, "--rounds", "10", "--out", str(out)]
    run = fedboard(*argv)
    baseline_done = run.wait_for(r"tune: f32 \(c3 e1\): top-3", 300)
    run.wait_for(r"device_sim\.simulate: round 1\b", 120, after=baseline_done)  # a round of the q8 point is done
    code, stderr = run.interrupt()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    doc = json.loads((out / "tune.json").read_text())
    assert doc["partial"] is True and doc["stopped_by"] == "SIGINT"
    assert doc["points_requested"] == 2 and doc["points_done"] == len(doc["rows"]) == 1
    assert doc["rows"][0]["spec"] == "f32"
    assert (out / "tune.csv").exists() and (out / "pareto.png").exists()
    said = last_stderr_line(stderr)
    assert said.startswith("fedboard tune: interrupted; kept the partial sweep of ") and str(out / "tune.json") in said
    q8 = json.loads((out / "runs" / "q8__c3_e1" / "report.json").read_text())  # the point it stopped in
    assert q8["partial"] is True and 1 <= q8["rounds"] < 10

    # the same command resumes: the finished baseline is read back, the interrupted point runs again
    done = subprocess.run([sys.executable, "-m", "device_sim.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "tune.json").read_text())
    assert doc["partial"] is False and {r["spec"] for r in doc["rows"]} == {"f32", "q8"}
    q8 = json.loads((out / "runs" / "q8__c3_e1" / "report.json").read_text())
    assert q8["partial"] is False and q8["rounds"] == 10
    assert "(1 of 2 points read back" in done.stdout


def test_ctrl_c_in_train_central_keeps_the_epochs_done(tmp_path, fedboard):
    out = tmp_path / "central"
    run = fedboard("train-central", "--epochs", "500", "--vocab-size", "300", "--embed-dim", "8", "--units", "16",
                   "--seed", "3", "--no-progress", "--out", str(out))
    run.wait_for(r"central epoch 1:", 300)
    code, stderr = run.interrupt()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    report = json.loads((out / "central.json").read_text())
    assert report["partial"] is True and report["stopped_by"] == "SIGINT"
    assert 1 <= report["epochs"] == len(report["per_epoch"]) < 500 and report["epochs_requested"] == 500
    said = last_stderr_line(stderr)
    assert said.startswith("fedboard train-central: interrupted; kept the partial report of ")
    assert str(out / "central.json") in said


@pytest.mark.parametrize("command", ["simulate", "tune", "train-central"])
def test_an_unwritable_out_fails_at_once_with_exit_2(command, tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "device_sim.cli", command, "--out", "/proc/x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"fedboard {command}: error: --out /proc/x: cannot write there (No such file or "
                                   "directory); choose a directory you can create and write to")
    assert took < 20, f"{took:.1f} s: the check must come before any work"  # about 1 s alone; generous under load
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_text("")
    done = subprocess.run([sys.executable, "-m", "device_sim.cli", command, "--out", str(file_in_the_way / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Not a directory" in done.stderr and "Traceback" not in done.stderr
