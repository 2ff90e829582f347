"""Start a real Mosquitto on 127.0.0.1 and a free port: for tests, benchmarks and local trials.

Mosquitto is the production broker; this only runs the Debian binary with a generated config
and stops it again. As root, Mosquitto would drop to user `mosquitto`, which cannot read a
private temp dir, so the config says `user root` when we are root.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from device_sim.broker import BrokerAddress


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    """`with MosquittoBroker() as b: b.address` — a private Mosquitto process."""

    def __init__(self, extra_config: str = "", *, port: int | None = None, persistence: bool = False,
                 workdir: Path | None = None) -> None:
        self.binary = find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError("mosquitto not found: install it (apt-get install -y mosquitto)")
        self.port = port or free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedboard-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.address = BrokerAddress("127.0.0.1", self.port)

    def config_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true" if "allow_anonymous" not in self.extra_config else "",
                 "max_queued_messages 10000", f"persistence {'true' if self.persistence else 'false'}",
                 f"persistence_location {self.workdir}/", "log_dest stderr", "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")
        return "\n".join(line for line in lines if line) + "\n" + self.extra_config + "\n"

    def start(self, timeout_s: float = 10.0) -> BrokerAddress:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.log_path = self.workdir / "mosquitto.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.address
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if hasattr(self, "_log"):
            self._log.close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, for fault tests (persistence keeps retained messages and sessions)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def __enter__(self) -> "MosquittoBroker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
