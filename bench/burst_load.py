"""Load: 1,000 devices send their update within the same second; nothing may be dropped.

A real Mosquitto, a real `fedboard aggregator` process (checkpoints on, as deployed) and 1,000
device connections (one MQTT connection each, all driven by one `MqttHub` thread, as the
simulator runs them). Every device subscribes to the round plan, its assignment and its ack,
checks in, and once the whole cohort is assigned ALL of them publish one valid q8 update of
the reference model (781,068 parameters, about 0.8 MB) as fast as one process can: the
publish calls of the 1,000 updates must all fall within one second. The round's goal is
1,000, so every update must be counted.

Reported: publish spread (first to last publish call), accepted + rejected acks received
against updates sent (nothing dropped: they must add up to 1,000), the aggregator's RSS
before the burst, after 100 acks and at its peak (bounded: the peak must stay near the
100-update figure, not grow with the count), Mosquitto's peak RSS (the broker holds the
backlog the aggregator has not read yet: the aggregator reads through a bounded inbox and
acknowledges after its checkpoint), and the time from the first publish to the last ack.

Run: ``python bench/burst_load.py [--devices 1000] [--codec q8] [--no-checkpoint] [--out FILE.json]``
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.aggregator_ingest import POOL, reference_bundle  # noqa: E402
from bench.aggregator_memory_round import aggregator_command, wait  # noqa: E402
from device_sim.mosquitto import MosquittoBroker  # noqa: E402
from edge_client.mqtt_hub import MqttHub, raise_fd_limit  # noqa: E402
from protocol.codec import parse_codec  # noqa: E402
from protocol.envelope import Envelope, Kind, decode_envelope  # noqa: E402
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan  # noqa: E402
from protocol.topics import FleetTopics  # noqa: E402

FLEET = "burst"


@dataclass
class BurstFleet:
    """`n` devices, one MQTT connection each, on one hub thread; counts what comes back."""

    port: int
    devices: list[str]
    hub: MqttHub
    topics: FleetTopics = field(default_factory=lambda: FleetTopics(FLEET))
    plan: RoundPlan | None = None
    subscribed: set[str] = field(default_factory=set)
    selected: set[str] = field(default_factory=set)
    acks: dict[str, Ack] = field(default_factory=dict)
    ack_messages: int = 0
    clients: dict[str, mqtt.Client] = field(default_factory=dict)
    first_ack_at: float = 0.0
    last_ack_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connect_all(self) -> None:
        for device in self.devices:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
            client.user_data_set(device)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.max_inflight_messages_set(20)
            self.clients[device] = client
            self.hub.add(client, "127.0.0.1", self.port, keepalive=120)

    def _on_connect(self, client, device, flags, reason_code, properties=None) -> None:
        client.subscribe([(self.topics.round, 1), (self.topics.assign(device), 1), (self.topics.ack(device), 1)])

    def _on_subscribe(self, client, device, mid, reason_codes, properties=None) -> None:
        with self.lock:
            self.subscribed.add(device)

    def _on_message(self, client, device, msg) -> None:
        if msg.topic == self.topics.round:
            plan = RoundPlan.from_envelope(decode_envelope(msg.payload, expect=Kind.PLAN))
            with self.lock:
                if self.plan is None or plan.round_id > self.plan.round_id:
                    self.plan = plan
            env = CheckIn(plan.round_id, plan.base_version, 50, "burst").to_envelope(FLEET, device)
            client.publish(self.topics.checkin(device), env.encode(), qos=1)
        elif msg.topic == self.topics.assign(device):
            if Assignment.from_envelope(decode_envelope(msg.payload, expect=Kind.ASSIGN)).selected:
                with self.lock:
                    self.selected.add(device)
        elif msg.topic == self.topics.ack(device):
            ack = Ack.from_envelope(decode_envelope(msg.payload, expect=Kind.ACK))
            now = time.monotonic()
            with self.lock:
                self.ack_messages += 1
                self.first_ack_at = self.first_ack_at or now
                self.last_ack_at = now
                if device not in self.acks or not self.acks[device].accepted:
                    self.acks[device] = ack

    def counts(self) -> tuple[int, int]:
        with self.lock:
            accepted = sum(1 for a in self.acks.values() if a.accepted)
            return accepted, len(self.acks) - accepted


def prefault_heap(nbytes: int) -> bool:
    """Keep freed memory in this process's heap and touch `nbytes` of it now.

    The burst copies 1,000 x 0.8 MB (paho builds each PUBLISH packet as a new bytearray). From
    fresh pages that is about 200,000 page faults: 0.9 s on this 2-core machine under load,
    most of the one-second budget, and a cost of the one process playing 1,000 devices, not of
    a device. With glibc told not to return freed memory to the kernel and the pages touched
    once before the burst, the same copies take about 0.07 s. Returns False if not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 256 * 2**20) and libc.mallopt(m_trim_threshold, 2**62)):
        return False
    chunk = 1 << 20
    warm = [bytearray(chunk) for _ in range(nbytes // chunk + 1)]
    del warm
    return True



class RssSampler:
    """Samples the RSS of a few processes every 50 ms, with the ack count at that moment."""

    def __init__(self, procs: dict[str, psutil.Process], fleet: BurstFleet) -> None:
        self.procs, self.fleet = procs, fleet
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = {}
            for name, proc in self.procs.items():
                try:
                    rss[name] = proc.memory_info().rss / 2**20
                except psutil.Error:
                    rss[name] = float("nan")
            self.samples.append((time.monotonic(), sum(self.fleet.counts()), rss))
            time.sleep(0.05)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, name: str, since: float = 0.0) -> float | None:
        values = [rss[name] for t, _, rss in self.samples if t >= since and name in rss and rss[name] == rss[name]]
        return round(max(values), 1) if values else None

    def at_count(self, name: str, count: int) -> float | None:
        for _, acked, rss in self.samples:
            if acked >= count:
                return round(rss[name], 1)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--codec", default="q8")
    parser.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument("--intake-buffer-mb", type=int, default=32, help="the aggregator's inbox bound")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--checkin-window-s", type=float, default=300)
    parser.add_argument("--broker-queue", type=int, default=0,
                        help="Mosquitto max_queued_messages (default: the 10,000 of MosquittoBroker and of "
                             "aggregator/broker_config.py); e.g. 1000 = Mosquitto's own default")
    parser.add_argument("--cold-heap", action="store_true", help="skip prefault_heap (slower publish calls)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    n = args.devices
    raise_fd_limit(4 * n + 256)  # inherited by Mosquitto, which holds one socket per device
    bundle = reference_bundle()
    # the messages (built on this thread); paho's packet copies are made on the hub's thread
    report_heap = prefault_heap(n * (bundle.param_count + 64 * 1024)) if not args.cold_heap else False
    codec = parse_codec(args.codec)
    rng = np.random.default_rng(2)
    payloads = [codec.encode((rng.standard_normal(bundle.param_count) * 0.01).astype(np.float32),
                             rng=np.random.default_rng(i)).payload for i in range(POOL)]
    devices = [f"dev-{i:05d}" for i in range(n)]
    report: dict = {"bench": "burst_load", "devices": n, "codec": codec.spec, "params": bundle.param_count,
                    "update_bytes": len(payloads[0]), "checkpoints": not args.no_checkpoint,
                    "fleet_heap_prefaulted": report_heap}
    extra = f"max_queued_messages {args.broker_queue}" if args.broker_queue else ""
    report["broker_max_queued_messages"] = args.broker_queue or 10000
    with tempfile.TemporaryDirectory(prefix="fedboard-burst-") as tmp, MosquittoBroker(extra) as broker, \
            MqttHub("burst-fleet") as hub:
        cmd = aggregator_command(Path(tmp), broker.port, FLEET, bundle, n, codec.spec,
                                 checkin_window_s=args.checkin_window_s, checkpoint=not args.no_checkpoint,
                                 extra=("--intake-buffer-mb", str(args.intake_buffer_mb)))
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        fleet = BurstFleet(broker.port, devices, hub)
        started = time.monotonic()
        fleet.connect_all()
        wait(lambda: len(fleet.subscribed) == n, 120, f"{n} device connections")
        report["connect_s"] = round(time.monotonic() - started, 1)
        agg = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs = {"aggregator": psutil.Process(agg.pid), "mosquitto": psutil.Process(broker.proc.pid),
                 "fleet": psutil.Process()}
        with RssSampler(procs, fleet) as sampler:
            try:
                wait(lambda: len(fleet.selected) == n or agg.poll() is not None, args.checkin_window_s + 30,
                     "the whole cohort's assignments")
            except TimeoutError:
                # check-ins were lost on the way (e.g. a broker queue shorter than the fleet)
                agg.terminate()
                report.update({"selected": len(fleet.selected), "updates_lost": n,
                               "failure": f"only {len(fleet.selected)} of {n} devices were assigned within the "
                                          f"{args.checkin_window_s:g} s check-in window: check-ins were dropped",
                               "aggregator_output_tail": agg.communicate(timeout=60)[0].strip().splitlines()[-5:]})
                print(json.dumps(report, indent=2))
                if args.out:
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
                return 1
            if agg.poll() is not None:
                raise RuntimeError(f"aggregator exited early: {agg.communicate()[0][-3000:]}")
            round_id = fleet.plan.round_id
            time.sleep(0.5)  # let the samplers see the quiet state
            rss_before = {name: sampler.peak(name, time.monotonic() - 0.4) for name in procs}
            # the burst: every device publishes its update; the calls must all fall within a second
            messages = [Envelope(Kind.UPDATE, FLEET, d, round_id, fleet.plan.base_version, 50, codec.spec,
                                 {"train_loss": 3.0, "steps": 4}, payloads[i % POOL]).encode()
                        for i, d in enumerate(devices)]
            infos: list = []
            published = threading.Event()
            times: list[float] = []

            def publish_all() -> None:
                # on the hub thread, in one go: no socket write interleaves with (and slows) the
                # publish calls; the hub starts writing the 1,000 packets as soon as this returns
                times.append(time.monotonic())
                cpu = time.thread_time()
                for device, data in zip(devices, messages):
                    infos.append(fleet.clients[device].publish(fleet.topics.update(device), data, qos=1))
                times.append(time.monotonic())
                report["publish_calls_cpu_s"] = round(time.thread_time() - cpu, 3)
                published.set()

            if report_heap:  # glibc gives the hub thread its own arena: warm that one too
                warmed = threading.Event()
                hub._call(lambda: (prefault_heap(n * (bundle.param_count + 64 * 1024)), warmed.set()))
                warmed.wait(120)
            hub._call(publish_all)
            if not published.wait(120):
                raise TimeoutError("the publish calls did not finish")
            burst_start, burst_end = times
            del messages
            wait(lambda: all(info.is_published() for info in infos), args.timeout_s, "the broker's PUBACKs")
            report["all_received_by_broker_s"] = round(time.monotonic() - burst_start, 2)
            publish_errors = Counter(info.rc for info in infos if info.rc != mqtt.MQTT_ERR_SUCCESS)
            wait(lambda: len(fleet.acks) >= n or agg.poll() is not None, args.timeout_s, "an ack per update")
            all_acked_at = time.monotonic()
            output = agg.communicate(timeout=300)[0]
        accepted, rejected = fleet.counts()
        reasons = Counter(a.reason for a in fleet.acks.values() if not a.accepted)
        report.update({
            "publish_calls_spread_s": round(burst_end - burst_start, 3),
            "publish_errors": dict(publish_errors),
            "updates_sent": n, "acked_accepted": accepted, "acked_rejected": rejected,
            "rejected_by_reason": dict(reasons), "ack_messages": fleet.ack_messages,
            "updates_lost": n - accepted - rejected,
            "ingest_s_first_publish_to_last_ack": round(fleet.last_ack_at - burst_start, 1),
            "first_ack_after_s": round(fleet.first_ack_at - burst_start, 2),
            "updates_per_s": round(n / max(all_acked_at - burst_start, 1e-9), 1),
            "aggregator_rss_mb": {"before_burst": rss_before["aggregator"],
                                  "after_100_acks": sampler.at_count("aggregator", min(100, n)),
                                  "after_500_acks": sampler.at_count("aggregator", min(500, n)),
                                  "peak_during_burst": sampler.peak("aggregator", burst_start)},
            "mosquitto_rss_mb": {"before_burst": rss_before["mosquitto"],
                                 "peak_during_burst": sampler.peak("mosquitto", burst_start)},
            "fleet_process_rss_mb_peak": sampler.peak("fleet", burst_start),
            "aggregator_exit": agg.returncode,
            "aggregator_output_tail": output.strip().splitlines()[-3:] if output else [],
        })
    a = report["aggregator_rss_mb"]
    if a["after_100_acks"] and a["peak_during_burst"]:
        report["aggregator_peak_minus_rss_at_100_mb"] = round(a["peak_during_burst"] - a["after_100_acks"], 1)
    report.update({"wall_s": round(time.monotonic() - started, 1), "platform": platform.platform(),
                   "cpu_count": os.cpu_count(),
                   "command": "python bench/burst_load.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["updates_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
