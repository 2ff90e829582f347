"""The README's "Deploy on a Raspberry Pi" section, end to end, with files from the repo only.

Every step is the command the README gives, run as a process: `fedboard keygen`, openssl for the
broker's certificates, `fedboard export-bundle --corpus builtin`, `fedboard broker-config` and
Mosquitto started exactly as it prints, `fedboard aggregator` with aggregator.example.toml, two
`fedboard client` processes with client.example.toml, `client add-text`, one committed round,
`fedboard predict`. Only what a reader must fill in is changed (host, port, paths, a small
model so the test is quick, `require_idle = false` on a busy test box, as the README explains).
If the walkthrough rots, this test fails.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEDBOARD = [sys.executable, "-m", "device_sim.cli"]
TEXTS = ["i am going to the park", "see you at the station at six", "i am going to call you later",
         "we are at home now", "can you call me later", "i am going to the station", "thanks for the dinner",
         "see you at home", "i am going to be late", "the cat is on the sofa"] * 3


def set_key(text: str, key: str, value: str) -> str:
    """Replace the first `key = ...` line (what a reader edits in the example file)."""
    new, n = re.subn(rf"(?m)^#?\s*{re.escape(key)}\s*=.*$", f"{key} = {value}", text, count=1)
    assert n == 1, f"the example has no key {key!r}: the walkthrough and the example file disagree"
    return new


def run(*args: str, cwd: Path, timeout: float = 180, env: dict | None = None) -> str:
    proc = subprocess.run([*FEDBOARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, f"fedboard {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mosquitto exited: {proc.stdout.read() if proc.stdout else ''}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not listen on {port}")


def openssl_certificates(directory: Path) -> None:
    """The README's openssl commands, for the name 127.0.0.1."""
    script = """
set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fedboard CA" -keyout ca.key -out ca.crt
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -out server.crt \\
    -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:localhost")
"""
    subprocess.run(["bash", "-c", script], cwd=directory, check=True, capture_output=True, timeout=120)


def test_the_pi_walkthrough_runs_end_to_end(tmp_path, cache_dir):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the walkthrough's certificates (Debian package openssl)")
    from device_sim.mosquitto import find_mosquitto

    mosquitto = find_mosquitto()
    assert mosquitto is not None, "mosquitto is not installed: run bash .ci/run"
    # /etc/mosquitto in the README; here a directory the broker's user can enter when we are root
    base = Path(tempfile.mkdtemp(prefix="fedboard-walkthrough-"))
    procs: list[subprocess.Popen] = []
    try:
        base.chmod(0o755)
        server = base / "server"
        server.mkdir()
        port = free_port()

        # 1. keys and the training bundle, on the server
        run("keygen", "--out", "keys", cwd=server)
        run("export-bundle", "--corpus", "builtin", "--vocab-size", "300", "--embed-dim", "16", "--units", "32",
            "--out", "model.fbz", cwd=server)

        # 2. the broker: certificates, then the generated configuration, started as printed
        openssl_certificates(server)
        if os.geteuid() == 0:  # README: install -m 0640 -g mosquitto server.key
            import grp

            os.chown(server / "server.key", 0, grp.getgrnam("mosquitto").gr_gid)
            os.chmod(server / "server.key", 0o640)
        printed = run("broker-config", "--out", str(base / "broker"), "--fleet", "home", "--devices", "2",
                      "--tls-ca", "server/ca.crt", "--tls-cert", "server/server.crt", "--tls-key", "server/server.key",
                      "--port", str(port), "--bind", "127.0.0.1", cwd=base)
        start = re.search(r"start it with:\s+(.+)", printed).group(1).split()
        assert start[0] == "mosquitto"
        broker = subprocess.Popen([mosquitto, *start[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(broker)
        wait_listening(port, broker)
        credentials = base / "broker" / "credentials"

        # 3. the aggregator, from the documented example configuration
        agg_toml = (ROOT / "aggregator/deploy/aggregator.example.toml").read_text()
        for key, value in {"host": '"127.0.0.1"', "port": str(port),
                           "password_file": f'"{credentials / "aggregator.password"}"',
                           "tls_ca": '"ca.crt"', "clients_per_round": "2", "over_selection": "1.0",
                           "checkin_window_s": "5.0", "report_deadline_s": "120.0", "rounds": "1"}.items():
            agg_toml = set_key(agg_toml, key, value)
        (server / "aggregator.toml").write_text(agg_toml)
        aggregator_log = open(base / "aggregator.log", "w")
        aggregator = subprocess.Popen([*FEDBOARD, "aggregator", "--config", "aggregator.toml"], cwd=server,
                                      stdout=aggregator_log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(aggregator)

        # 4-6. two devices: the example client.toml, text added, the client started
        clients = []
        for n in (1, 2):
            device = f"device-000{n}"
            home = base / device
            home.mkdir()
            shutil.copy(server / "keys" / "aggregator.pub", home)
            shutil.copy(server / "ca.crt", home)
            toml = (ROOT / "edge_client/deploy/client.example.toml").read_text()
            for key, value in {"id": f'"{device}"', "fleet": '"home"', "state_dir": f'"{home / "state"}"',
                               "data": f'"{home / "state" / "texts.db"}"', "key_file": f'"{home / "store.key"}"',
                               "host": '"127.0.0.1"', "port": str(port), "username": f'"{device}"',
                               "password_file": f'"{credentials / (device + ".password")}"',
                               "tls_ca": f'"{home / "ca.crt"}"',
                               "aggregator_public_key": f'"{home / "aggregator.pub"}"',
                               "require_idle": "false", "min_free_memory_mb": "0", "max_cpu_temp_c": "100"}.items():
                toml = set_key(toml, key, value)
            (home / "client.toml").write_text(toml)
            run("client", "add-text", "--config", "client.toml", *TEXTS, cwd=home)
            log = open(home / "client.log", "w")
            clients.append((home, log))
            procs.append(subprocess.Popen([*FEDBOARD, "client", "--config", "client.toml"], cwd=home, stdout=log,
                                          stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}))

        # one committed round: `rounds = 1`, so the aggregator exits after it
        try:
            code = aggregator.wait(timeout=420)
        except subprocess.TimeoutExpired:
            code = None
        output = (base / "aggregator.log").read_text()
        logs = "\n".join(f"--- {h.name}\n{(h / 'client.log').read_text()[-3000:]}" for h, _ in clients)
        assert code == 0 and re.search(r"round 1: committed v1 2/2 reports", output), \
            f"aggregator exit {code}:\n{output[-4000:]}\n{logs}"

        # 7. suggestions on a device, from the model it trained on
        home = clients[0][0]
        # the README's form, `fedboard predict "i am going to"`: the config at its default path
        # (/etc/fedboard/client.toml on a Pi; FEDBOARD_CLIENT_CONFIG points elsewhere)
        out = run("predict", "i am going to", cwd=base, env={"FEDBOARD_CLIENT_CONFIG": str(home / "client.toml")})
        words = re.search(r"'i am going to' -> (.+)", out).group(1).split(", ")
        assert len(words) == 3 and all(words), out
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(base, ignore_errors=True)
