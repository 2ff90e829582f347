"""Issue 14, findings 1, 7 and 8 (first part): one device must not own the global model or a round.

A real `fedboard aggregator` process against a real Mosquitto started with exactly the
`fedboard broker-config` output; every device connects on its own credentials, so it can only
write its own topics. Weight inflation (an update claiming 10,000,000 examples), rounds below the
report floor, evaluation counts beyond a device's windows, and an aggregator started before its
fleet: each attack fails, or the aggregator waits, and the published model says so.
"""
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.broker_config import BrokerSetup, device_ids, write_broker_config
from aggregator.dp import make_any_aggregator
from aggregator_testkit import PLAIN_FEDAVG, dyadic_update, fake_bundle, update_bytes, wait_until
from protocol.codec import parse_codec
from protocol.envelope import Kind, decode_envelope
from protocol.messages import Ack, Assignment, CheckIn, RoundPlan
from protocol.model_message import ModelMessage
from protocol.signing import write_keypair
from protocol.topics import FleetTopics

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).resolve().parents[1]
FLEET = "integrity"
DEVICES = device_ids(6)
INFLATED = 10_000_000  # the intake's old cap: what the attacker claimed


@pytest.fixture
def generated(tmp_path):
    """Mosquitto with the generated configuration (its own broker: no retained state of another test)."""
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto, free_port

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")

    port = free_port()
    setup = BrokerSetup(fleet=FLEET, devices=DEVICES, port=port, bind="127.0.0.1",
                        run_as_user="root" if os.geteuid() == 0 else None)
    files = write_broker_config(tmp_path / "broker", setup)
    text = files.conf.read_text()

    class Generated(MosquittoBroker):
        def config_text(self):  # exactly the generated file
            return text

    with Generated(port=port) as broker:
        broker.credentials = files.credentials
        yield broker


class Device:
    """One device on its own broker account: hears plans, checks in declaring `windows`, reports."""

    def __init__(self, broker, name: str, windows: int = 10) -> None:
        self.name, self.windows = name, windows
        self.topics = FleetTopics(FLEET)
        self.plans: dict[int, RoundPlan] = {}
        self.assignments: dict[int, Assignment] = {}
        self.acks: list[Ack] = []
        self.model: bytes | None = None
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(name, broker.credentials[name].read_text().strip())
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([(self.topics.round, 1), (self.topics.assign(name), 1), (self.topics.ack(name), 1),
                               (self.topics.model, 1)])
        assert subscribed.wait(10), f"{name} could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        env = decode_envelope(msg.payload) if msg.payload else None
        with self._lock:
            if env is None:
                return
            if msg.topic == self.topics.round:
                plan = RoundPlan.from_envelope(env)
                self.plans[plan.round_id] = plan
            elif msg.topic == self.topics.assign(self.name):
                a = Assignment.from_envelope(env)
                self.assignments[a.round_id] = a
            elif msg.topic == self.topics.ack(self.name):
                self.acks.append(Ack.from_envelope(env))
            elif msg.topic == self.topics.model:
                self.model = msg.payload

    def plan(self, round_id: int) -> RoundPlan | None:
        with self._lock:
            return self.plans.get(round_id)

    def check_in(self, round_id: int) -> None:
        env = CheckIn(round_id, 0, self.windows, "test").to_envelope(FLEET, self.name)
        self.client.publish(self.topics.checkin(self.name), env.encode(), qos=1).wait_for_publish(10)

    def selected(self, round_id: int) -> bool:
        with self._lock:
            a = self.assignments.get(round_id)
        return a is not None and a.selected

    def send(self, data: bytes) -> None:
        self.client.publish(self.topics.update(self.name), data, qos=1).wait_for_publish(10)

    def accepted(self) -> bool:
        with self._lock:
            return any(a.accepted for a in self.acks)

    def model_version(self) -> int:
        with self._lock:
            data = self.model
        return -1 if data is None else ModelMessage.from_envelope(decode_envelope(data)).version

    def weights(self, dim: int) -> np.ndarray:
        with self._lock:
            message = ModelMessage.from_envelope(decode_envelope(self.model))
        return parse_codec(message.codec).decode(message.weights_payload, dim)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AggregatorProcess:
    """`fedboard aggregator` as a process on the generated broker's aggregator account."""

    def __init__(self, tmp_path: Path, broker, *flags: str) -> None:
        self.bundle = fake_bundle()
        self.bundle.write(tmp_path / "model.fbz")
        key_path, _ = write_keypair(tmp_path / "keys")
        self.jsonl = tmp_path / "rounds.jsonl"
        self.log_path = tmp_path / "aggregator.log"
        cmd = [sys.executable, "-m", "aggregator.commands", "--log-level", "DEBUG", "aggregator",
               "--broker", f"127.0.0.1:{broker.port}", "--mqtt-version", "5", "--username", "aggregator",
               "--password-file", str(broker.credentials["aggregator"]), "--bundle", str(tmp_path / "model.fbz"),
               "--key", str(key_path), "--fleet", FLEET, "--codec", "f32", "--metrics-jsonl", str(self.jsonl),
               "--server-optimizer", "fedavg", "--server-lr", "1.0", *flags]  # the move is the mean itself
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rounds(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the aggregator did not exit in {timeout_s} s:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _run_one_round(tmp_path, broker, devices, updates, *flags):
    """One committed round: every device checks in, every selected one reports its (update, examples).
    Returns (initial weights, published weights, the round's metrics line)."""
    agg = AggregatorProcess(tmp_path, broker, "--rounds", "1", "--clients-per-round", str(len(devices)),
                            "--over-selection", "1.0", "--expected-checkins", str(len(devices)),
                            "--checkin-window-s", "30", "--report-deadline-s", "60", *flags)
    try:
        wait_until(lambda: all(d.plan(1) is not None for d in devices), 60, "the round plan")
        for d in devices:
            d.check_in(1)
        wait_until(lambda: all(d.selected(1) for d in devices), 60, "every device selected")
        for d in devices:
            vec, examples, meta = updates[d.name]
            d.send(update_bytes(FLEET, d.name, 1, 0, vec, examples, meta=meta))
        assert agg.wait(60) == 0, agg.log()
        wait_until(lambda: devices[0].model_version() == 1, 20, "the retained v1")
        return agg.bundle.initial_weights, devices[0].weights(agg.bundle.param_count), agg.rounds()[-1]
    finally:
        agg.stop()


def _reference(spec: str, updates: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """The aggregation `spec` of (update, weight) pairs, computed outside the aggregator process."""
    aggregate = make_any_aggregator(spec)
    aggregate.reset(updates[0][0].size)
    for i, (vec, weight) in enumerate(updates):
        aggregate.add(vec, weight, client_id=f"c{i}")
    return aggregate.result()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("spec", ["mean", "clip:1|mean", "normclip:median*2|mean"])
@pytest.mark.parametrize("declared", [INFLATED, 10], ids=["declared-inflated", "declared-honest"])
def test_an_inflating_device_weighs_no_more_than_an_honest_one_of_the_caps_size(tmp_path, generated, spec, declared):
    # four honest devices (10 windows each, one epoch: 10 examples) push along `honest`; the attacker
    # pushes the other way and claims 10,000,000 examples, after declaring either as much or 10 at check-in
    bundle = fake_bundle()
    honest = dyadic_update(1, bundle.param_count)
    attack = -1.5 * honest  # within normclip's bound (2 x the median norm): only the weight decides
    names = DEVICES[:5]
    devices = [Device(generated, n, windows=declared if n == names[0] else 10) for n in names]
    updates = {n: (honest, 10, {"train_loss": 1.0}) for n in names[1:]}
    updates[names[0]] = (attack, INFLATED, {"train_loss": 1.0})
    try:
        initial, published, line = _run_one_round(tmp_path, generated, devices, updates,
                                                  "--aggregation", spec, "--weight-cap", "2")
    finally:
        for d in devices:
            d.stop()
    moved = published - initial
    # the cap: 2 x the median allowance (10) = 20 when the attacker declared 10,000,000; its own
    # declaration (10) when it declared 10. Either way it weighs like an honest device of that size.
    weight = 20.0 if declared == INFLATED else 10.0
    expected = _reference(spec, [(attack, weight)] + [(honest, 10.0)] * 4)
    np.testing.assert_allclose(moved, expected, rtol=1e-5, atol=1e-7)
    assert _cosine(moved, honest) > 0.99  # the honest majority sets the direction (it was -1.0)
    assert line["committed"] and line["participants"] == 5 and line["weight_capped"] == 1


def test_eval_counts_beyond_a_devices_windows_do_not_count(tmp_path, generated):
    # a device of 10 windows can score at most 10 x seq_len positions: 2^39 "correct guesses" are ignored
    bundle = fake_bundle()
    names = DEVICES[:2]
    devices = [Device(generated, n, windows=10) for n in names]
    lie = {"train_loss": 1.0, "eval": {"correct1": 2**39, "correct3": 2**39, "scored": 2**39}}
    truth = {"train_loss": 1.0, "eval": {"correct1": 3, "correct3": 7, "scored": 20}}
    updates = {names[0]: (dyadic_update(0, bundle.param_count), 10, lie),
               names[1]: (dyadic_update(1, bundle.param_count), 10, truth)}
    try:
        _, _, line = _run_one_round(tmp_path, generated, devices, updates)
    finally:
        for d in devices:
            d.stop()
    assert line["committed"]
    assert line["fed_eval"] == {"top1": 3 / 20, "top3": 7 / 20, "scored": 20.0, "devices": 1.0}


def test_a_waiting_aggregator_never_commits_below_the_floor_and_runs_once_devices_come(tmp_path, generated):
    # started before any device: it must neither burn rounds ("ABANDONED: 0 of 0") nor exit; one
    # device is not a round (floor 2 for a goal of 3); the round runs once a second one checks in
    bundle = fake_bundle()
    agg = AggregatorProcess(tmp_path, generated, "--rounds", "1", "--clients-per-round", "3",
                            "--over-selection", "1.0", "--checkin-window-s", "1", "--report-deadline-s", "60")
    devices: list[Device] = []
    try:
        def extensions() -> int:
            return agg.log().count("window extended")

        wait_until(lambda: extensions() >= 3, 60, "three window extensions with no device")
        assert agg.proc.poll() is None and agg.rounds() == [], agg.log()
        assert "waiting for devices" in agg.log() and "ABANDONED" not in agg.log()
        first = Device(generated, DEVICES[0])
        devices.append(first)
        wait_until(lambda: first.plan(1) is not None, 20, "the retained plan of round 1")
        first.check_in(1)
        seen = extensions()
        wait_until(lambda: extensions() >= seen + 3, 60, "three more extensions with one check-in")
        assert agg.proc.poll() is None and agg.rounds() == [] and not first.selected(1), agg.log()
        second = Device(generated, DEVICES[1])
        devices.append(second)
        wait_until(lambda: second.plan(1) is not None, 20, "the retained plan of round 1")
        second.check_in(1)
        wait_until(lambda: first.selected(1) and second.selected(1), 60, "both selected")
        for i, d in enumerate(devices):
            d.send(update_bytes(FLEET, d.name, 1, 0, dyadic_update(i, bundle.param_count), 10))
        assert agg.wait(60) == 0, agg.log()
        (line,) = agg.rounds()
        assert line["committed"] and line["participants"] == 2 and line["checkins"] == 2
        assert line["checkin_wait_s"] > 0
        # logged once a minute at most, not at every extension
        assert agg.log().count("waiting for devices") <= 1 + math.ceil(line["checkin_wait_s"] / 60), agg.log()
    finally:
        agg.stop()
        for d in devices:
            d.stop()


def test_a_round_below_the_floor_is_abandoned_not_committed_without_patience(tmp_path, generated):
    # checkin_patience_s 0: the window is not extended, and a lone device is not a round (it used to
    # commit 1 of 1, publishing that device's update to everyone)
    agg = AggregatorProcess(tmp_path, generated, "--rounds", "1", "--clients-per-round", "4",
                            "--checkin-window-s", "3", "--checkin-patience-s", "0", "--report-deadline-s", "30")
    lone = Device(generated, DEVICES[0])
    try:
        wait_until(lambda: lone.plan(1) is not None, 60, "the round plan")
        lone.check_in(1)
        assert agg.wait(60) == 0, agg.log()
        (line,) = agg.rounds()
        assert not line["committed"] and line["cohort"] == 0 and line["version"] == 0
        assert "1 check-in(s), fewer than the min_reports floor 2" in line["abandoned_reason"]
        assert not lone.selected(1) and lone.model_version() == 0
    finally:
        agg.stop()
        lone.stop()


def test_scale_out_workers_add_an_inflated_update_with_the_coordinators_bound(mosquitto):
    # the worker decodes the update, the coordinator grants it: the grant carries the bounded
    # weight (the check-in declared 10 windows), and the worker's partial sum uses it
    from aggregator.scale_out import IntakeWorker
    from aggregator.server import Aggregator, AggregatorConfig
    from aggregator_testkit import ScriptedFleet, expected_fedavg, keypair
    from protocol.transport import MqttSettings

    bundle = fake_bundle()
    key, _ = keypair()
    settings = MqttSettings(port=mosquitto.port, mqtt_version=5)
    names = [f"s{i}" for i in range(4)]
    config = AggregatorConfig(fleet="scaleinfl", clients_per_round=4, over_selection=1.0, expected_checkins=4,
                              checkin_window_s=10.0, report_deadline_s=30.0, codec="f32", workers=2, **PLAIN_FEDAVG)
    coordinator = Aggregator(config, bundle, settings, key)
    workers = [IntakeWorker("scaleinfl", bundle.param_count, settings, f"w{i}", group=config.share_group)
               for i in range(2)]
    for w in workers:
        w.start()
    coordinator.start()
    fleet = ScriptedFleet(mosquitto.port, "scaleinfl", names, client_id="fleet-scaleinfl")  # declares 10 windows
    try:
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("r", coordinator.run_round()))
        thread.start()
        wait_until(lambda: len(fleet.selected(1)) == 4, 30, "assignments")
        updates = {d: dyadic_update(i, bundle.param_count) for i, d in enumerate(names)}
        for d in names:
            fleet.send(d, update_bytes("scaleinfl", d, 1, 0, updates[d], examples=INFLATED if d == "s0" else 10))
        thread.join(60)
        result = out["r"]
        assert result.committed and result.participants == 4 and result.weight_capped == 1, result
        expected = expected_fedavg(bundle.initial_weights, [(updates[d], 10) for d in names])
        np.testing.assert_allclose(coordinator.weights, expected, rtol=1e-6, atol=1e-7)
    finally:
        fleet.stop()
        coordinator.stop()
        for w in workers:
            w.stop()
