"""Aggregator memory over one round of 1,000 updates of the reference model, over real MQTT.

A real Mosquitto, a real `fedboard aggregator` process (with checkpoints, as deployed) and a
scripted fleet of 1,000 devices that check in and each send one q8 update of 781,068
parameters (about 0.8 MB; 0.8 GB for the round). The aggregator's RSS is sampled while the
updates arrive and reported against the number of updates it has accepted so far: for the
streaming mean it must stay flat, whatever the count.

Run: ``python bench/aggregator_memory_round.py [--updates 1000] [--no-checkpoint] [--out FILE.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.aggregator_ingest import POOL, reference_bundle  # noqa: E402
from device_sim.mosquitto import MosquittoBroker  # noqa: E402
from protocol.codec import parse_codec  # noqa: E402
from protocol.envelope import Envelope, Kind, decode_envelope  # noqa: E402
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan  # noqa: E402
from protocol.signing import write_keypair  # noqa: E402
from protocol.topics import FleetTopics  # noqa: E402

FLEET = "mem"


class Fleet:
    """Many devices over one connection: check in on the plan, count assignments and acks."""

    def __init__(self, port: int, devices: list[str]) -> None:
        self.devices, self.topics = devices, FleetTopics(FLEET)
        self.selected: set[str] = set()
        self.accepted = 0
        self.rejected: list[str] = []
        self.plan: RoundPlan | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fleet", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        root = self.topics.root
        self.client.subscribe([(self.topics.round, 1), (f"{root}/assign/+", 1), (f"{root}/ack/+", 1)])

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.topics.round:
            plan = RoundPlan.from_envelope(decode_envelope(msg.payload))
            if self.plan is None:
                self.plan = plan
                for d in self.devices:
                    env = CheckIn(plan.round_id, 0, 50, "bench").to_envelope(FLEET, d)
                    client.publish(self.topics.checkin(d), env.encode(), qos=1)
        elif "/assign/" in msg.topic:
            if Assignment.from_envelope(decode_envelope(msg.payload)).selected:
                self.selected.add(msg.topic.rsplit("/", 1)[1])
        elif "/ack/" in msg.topic:
            ack = Ack.from_envelope(decode_envelope(msg.payload))
            if ack.accepted:
                self.accepted += 1
            else:
                self.rejected.append(ack.reason)


def aggregator_command(tmp_path: Path, port: int, fleet: str, bundle, n: int, codec_spec: str, *,
                       checkin_window_s: float, checkpoint: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """A `fedboard aggregator` process for one round of `n` devices: the bundle and a fresh
    signing key are written to `tmp_path`; its checkpoints go there too when `checkpoint`."""
    bundle.write(tmp_path / "model.fbz")
    key, _ = write_keypair(tmp_path / "keys")
    cmd = [sys.executable, "-m", "aggregator.commands", "--log-level", "WARNING", "aggregator",
           "--broker", f"127.0.0.1:{port}", "--bundle", str(tmp_path / "model.fbz"), "--key", str(key),
           "--fleet", fleet, "--rounds", "1", "--clients-per-round", str(n), "--over-selection", "1.0",
           "--expected-checkins", str(n), "--checkin-window-s", str(checkin_window_s), "--report-deadline-s", "900",
           "--codec", codec_spec, *extra]
    return cmd + (["--checkpoint-dir", str(tmp_path / "state")] if checkpoint else [])


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--codec", default="q8")
    parser.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n = args.updates
    bundle = reference_bundle()
    codec = parse_codec(args.codec)
    rng = np.random.default_rng(2)
    payloads = [codec.encode((rng.standard_normal(bundle.param_count) * 0.01).astype(np.float32),
                             rng=np.random.default_rng(i)).payload for i in range(POOL)]
    devices = [f"dev-{i:05d}" for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="fedboard-mem-") as tmp, MosquittoBroker() as broker:
        cmd = aggregator_command(Path(tmp), broker.port, FLEET, bundle, n, codec.spec, checkin_window_s=120,
                                 checkpoint=not args.no_checkpoint)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        fleet = Fleet(broker.port, devices)
        agg = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc = psutil.Process(agg.pid)
        samples: list[tuple[float, int, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and agg.poll() is None:
                try:
                    samples.append((time.monotonic(), fleet.accepted, proc.memory_info().rss / 2**20))
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        wait(lambda: len(fleet.selected) == n, 180, "the cohort")
        rss_before = proc.memory_info().rss / 2**20
        send_start = time.monotonic()
        for i, d in enumerate(devices):
            data = Envelope(Kind.UPDATE, FLEET, d, 1, 0, 50, codec.spec, {"train_loss": 3.0}, payloads[i % POOL]).encode()
            info = fleet.client.publish(fleet.topics.update(d), data, qos=1)
            if i % 32 == 31:
                info.wait_for_publish(60)
        wait(lambda: fleet.accepted + len(fleet.rejected) >= n, 900, "the acks")
        ingest_s = time.monotonic() - send_start
        output = agg.communicate(timeout=120)[0]
        stop.set()
        sampler.join(5)
        fleet.client.loop_stop()

    def rss_at(count: int) -> float:
        after = [rss for _, accepted, rss in samples if accepted >= count]
        return round(after[0], 1) if after else None

    during = [rss for _, accepted, rss in samples if accepted >= 1]
    report = {
        "bench": "aggregator_memory_round", "params": bundle.param_count, "codec": codec.spec, "updates": n,
        "checkpoints": not args.no_checkpoint, "update_bytes": len(payloads[0]),
        "accepted": fleet.accepted, "rejected": len(fleet.rejected),
        "rss_mb_before_updates": round(rss_before, 1),
        "rss_mb_after": {str(k): rss_at(k) for k in (1, 100, 250, 500, 750, n)},
        "rss_mb_peak_during_round": round(max(during), 1) if during else None,
        "rss_growth_mb_100_to_all": (round(rss_at(n) - rss_at(min(100, n)), 1)
                                     if rss_at(n) is not None and rss_at(min(100, n)) is not None else None),
        "ingest_wall_s": round(ingest_s, 1), "updates_per_s_end_to_end": round(n / ingest_s, 1),
        "round_wall_s": round(time.monotonic() - started, 1),
        "aggregator_output": output.strip().splitlines()[-1:] if output else [],
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
