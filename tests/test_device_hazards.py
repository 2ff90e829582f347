"""Hostile and broken surroundings of a device, tried through the real `fedboard client` processes.

A Mosquitto runs the configuration `fedboard broker-config` writes; the client runs as its
own process with TensorFlow blocked (bench/bundle_bomb.py has the pieces). Each test is one
hazard of issue 15: a bundle bomb, unbounded text imports, a state directory the client
cannot write, two devices with one id.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.benchkit import load_bench

bomb = load_bench("bundle_bomb")

KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]
MEMORY_MAX_MB = 300  # edge_client/deploy/fedboard-client.service


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from device_sim.mosquitto import find_mosquitto

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    with bomb.FleetBroker(tmp_path_factory.mktemp("fleet")) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def bundle(cache_dir):
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import build_vocabulary

    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


def start_aggregator(fleet, bundle, checkin_window_s: float = 4.0):
    from aggregator.server import Aggregator, AggregatorConfig

    config = AggregatorConfig(fleet=bomb.FLEET, clients_per_round=1, expected_checkins=1,
                              checkin_window_s=checkin_window_s, report_deadline_s=60.0, codec="q8", downlink="f32",
                              local_epochs=1, client_lr=1.0)
    agg = Aggregator(config, bundle, fleet.settings(), fleet.private_key, client_id="aggregator-hazards")
    agg.start()
    return agg


def without_root_privileges() -> tuple[str, ...]:
    """argv prefix under which file permissions bind (root ignores them unless it drops these capabilities)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable for the client")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


class ClientProcess:
    """`fedboard client` running in the background; its stderr collected line by line."""

    def __init__(self, toml: Path, *, prefix: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(bomb.REPO)}
        self.proc = subprocess.Popen(bomb.client_command(["client", "--config", str(toml)], prefix),
                                     cwd=toml.parent, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                hit = next((line for line in self.lines if re.search(pattern, line)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                assert left > 0 and (self.proc.poll() is None or self._reader.is_alive()), \
                    f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:])
                self._cv.wait(min(left, 0.5))

    def matching(self, pattern: str) -> list[str]:
        with self._cv:
            return [line for line in self.lines if re.search(pattern, line)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


def add_texts(toml: Path, texts: list[str]) -> None:
    run = bomb.run_client(["client", "add-text", "--config", str(toml), *texts], cwd=toml.parent)
    assert run.code == 0, run.stderr


# -- 1. a zip bomb in the bundle -------------------------------------------------------------------------------
@pytest.mark.mosquitto
@pytest.mark.parametrize("variant", ["unsigned", "signed-manifest", "signed-member"])
def test_a_bundle_bomb_is_refused_within_the_services_memory_limit(fleet, variant, tmp_path):
    """400 MB inflated from 0.4 MB: refused (unopened when nobody signed it), peak RSS far under MemoryMax."""
    run = bomb.refuse_bomb(fleet, variant, tmp_path, 400 * 2**20)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr
    error = run.lines[-1]
    assert "the retained bundle on fedboard/home/model/bundle is unusable" in error
    if variant == "unsigned":
        assert "refusing it unopened" in error
    assert run.peak_rss_mb < MEMORY_MAX_MB, f"peak RSS {run.peak_rss_mb:.0f} MB refusing {variant}"
    assert not (tmp_path / variant / "state" / "bundle.fbz").exists()
    print(f"{variant}: peak RSS {run.peak_rss_mb:.1f} MB ({error[-120:]})")


def test_bounded_reads_refuse_every_bomb_shape_in_process():
    """Honest header, lying header, lying member: each refused by a bound, not by running out of memory."""
    import tracemalloc

    from models.bundle import Bundle, BundleError

    for kind in ("manifest", "manifest-honest", "member"):
        data = bomb.bomb_bundle(kind, 200 * 2**20)
        tracemalloc.start()
        try:
            with pytest.raises(BundleError, match="manifest.json|model.tflite"):
                Bundle.from_bytes(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, f"{kind}: {peak / 2**20:.1f} MB held while refusing"


# -- 2. unbounded reads in add-text ------------------------------------------------------------------------
def test_add_text_bounds_every_read_and_names_file_line_and_limit(fleet, tmp_path):
    toml = fleet.client_toml(tmp_path / "device", fleet.devices[1])
    no_newline = tmp_path / "one-line.txt"
    no_newline.write_bytes(b"a" * (2 * 2**20))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
    deeper = tmp_path / "deeper.jsonl"
    deeper.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    cases = [
        (["--file", "/dev/zero"], r"/dev/zero:1: line longer than \d+ bytes"),
        (["--file", str(no_newline)], rf"{re.escape(str(no_newline))}:1: line longer than \d+ bytes"),
        (["--file", str(deep), "--format", "jsonl"], rf"{re.escape(str(deep))}:2: JSON nested deeper than 8 levels"),
        (["--file", str(deeper), "--format", "jsonl"], rf"{re.escape(str(deeper))}:2: line longer than \d+ bytes"),
        (["--file", str(tmp_path)], rf"{re.escape(str(tmp_path))}.*(is a directory|Is a directory)"),
    ]
    for args, expected in cases:
        run = bomb.run_client(["client", "add-text", "--config", str(toml), *args], cwd=tmp_path, timeout_s=120)
        assert run.code == 2, (args, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
        assert re.search(expected, run.lines[-1]), (expected, run.lines[-1])
        assert run.peak_rss_mb < 150, f"{args}: peak RSS {run.peak_rss_mb:.0f} MB"
    # all or nothing: the refused imports left the store empty
    run = bomb.run_client(["client", "add-text", "--config", str(toml), "one more"], cwd=tmp_path)
    assert run.code == 0 and "(1 stored)" in run.stdout, run.stdout + run.stderr


def test_predict_bounds_the_bundle_file_it_reads(tmp_path):
    bomb_file = tmp_path / "bomb.fbz"
    bomb_file.write_bytes(bomb.bomb_bundle("manifest", 400 * 2**20))
    cases = [("/dev/zero", r"/dev/zero is larger than 67108864 bytes"),
             (str(tmp_path), r"cannot read bundle .*: Is a directory"),
             (str(bomb_file), rf"{re.escape(str(bomb_file))}: member manifest.json")]
    for path, expected in cases:
        run = bomb.run_client(["predict", "i am", "--bundle", path], cwd=tmp_path)
        assert run.code == 2 and "Traceback" not in run.stderr, run.stderr
        assert re.search(expected, run.lines[-1]), (expected, run.lines[-1])
        assert run.peak_rss_mb < 150, f"{path}: peak RSS {run.peak_rss_mb:.0f} MB"


def test_text_import_unit_bounds(tmp_path):
    from edge_client.text_import import ImportLimits, import_lines, json_record

    path = tmp_path / "t.txt"
    path.write_bytes(b"short\n" + b"x" * 100 + b"\nlast")
    limits = ImportLimits(max_line_bytes=50, max_total_bytes=10_000)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: line longer than 50 bytes"):
        list(import_lines(path, limits))
    path.write_bytes(b"a\n" * 100)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:51: the import passes 100 bytes"):
        list(import_lines(path, ImportLimits(max_line_bytes=50, max_total_bytes=100)))
    assert json_record('{"text": "[[[[[[[[[[[[[[[[[[[[ \\" {{{{{{{{{{"}')["text"].startswith("[[[[")
    with pytest.raises(ValueError, match="nested deeper than 8"):
        json_record('{"text": [[[[[[[[["x"]]]]]]]]]}')


# -- 3. a state directory the client cannot write ---------------------------------------------------------------
@pytest.mark.mosquitto
def test_an_unwritable_state_directory_is_a_clear_error_at_start(fleet, bundle, tmp_path):
    prefix = without_root_privileges()
    toml = fleet.client_toml(tmp_path / "device", fleet.devices[0])
    state = tmp_path / "device" / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o500)
    try:
        run = bomb.run_client(["client", "--config", str(toml)], cwd=tmp_path, prefix=prefix)
    finally:
        state.chmod(0o700)
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(rf"state directory {re.escape(str(state))} is not writable \(Permission denied\)", run.lines[-1])


@pytest.mark.mosquitto
def test_a_device_that_cannot_persist_does_not_check_in(fleet, bundle, tmp_path):
    """With a cached bundle it used to check in, take a seat, train and discard the update, every round."""
    prefix = without_root_privileges()
    agg = start_aggregator(fleet, bundle)
    client = None
    state = tmp_path / "device" / "state"
    try:
        toml = fleet.client_toml(tmp_path / "device", fleet.devices[0])
        add_texts(toml, KEYBOARD * 5)
        client = ClientProcess(toml, prefix=prefix)
        client.wait_for("running with model")
        assert (state / "bundle.fbz").exists()
        for directory in (state / "outbox", state):
            directory.chmod(0o500)
        for _ in range(2):
            result = agg.run_round()
            assert result.checkins == 0 and not result.committed, result
        assert client.proc.poll() is None, "\n".join(client.lines[-20:])
        warnings = client.matching(r"WARNING.*cannot persist updates")
        assert len(warnings) == 1, "\n".join(client.lines[-30:])
        assert str(state) in warnings[0] and "state_not_writable" in warnings[0]
        assert client.matching(r"not eligible for rounds: .*state_not_writable")
    finally:
        for directory in (state, state / "outbox"):
            if directory.exists():
                directory.chmod(0o700)
        if client is not None:
            client.stop()
        agg.stop()


# -- 4. two devices with one id -----------------------------------------------------------------------------------
@pytest.mark.mosquitto
def test_two_devices_with_one_id_back_off_and_say_so(fleet, bundle, tmp_path):
    agg = start_aggregator(fleet, bundle)
    clients: list[ClientProcess] = []
    try:
        for name in ("a", "b"):
            toml = fleet.client_toml(tmp_path / name, fleet.devices[0])
            clients.append(ClientProcess(toml))
            clients[-1].wait_for("running with model")
        watch_s = 30.0
        started = time.monotonic()
        time.sleep(watch_s)  # observing a rate over a window: nothing to wait on but the clock
        elapsed = time.monotonic() - started
        lost = [c.matching(r"will reconnect in") for c in clients]
        total = sum(len(x) for x in lost)
        # the old behaviour: each reconnected every 0.8-0.9 s, ~70 losses in 30 s between the two
        assert 1 <= total <= 20, f"{total} reconnects in {elapsed:.0f} s:\n" + "\n".join(sum(lost, []))
        delays = [float(m.group(1)) for line in sum(lost, []) if (m := re.search(r"reconnect in ([\d.]+) s", line))]
        assert max(delays) > 4.0, delays  # backing off, not hammering
        warnings = sum((c.matching(r"WARNING.*another client uses this client id 'device-0001'") for c in clients), [])
        assert warnings, "\n".join(clients[0].lines[-20:] + clients[1].lines[-20:])
        print(f"two clients with one id: {total} reconnects in {elapsed:.0f} s, delays {sorted(delays)}")
    finally:
        for c in clients:
            c.stop()
        agg.stop()
