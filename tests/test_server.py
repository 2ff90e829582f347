"""The aggregator's rounds against a real Mosquitto, driven by a scripted fleet of synthetic devices."""
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from aggregator.server import Aggregator, AggregatorConfig, AggregatorStopped
from aggregator_testkit import (PLAIN_FEDAVG, ScriptedFleet, dyadic_update, expected_fedavg, fake_bundle, keypair, update_bytes,
                                wait_until)
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.transport import MqttSettings

pytestmark = pytest.mark.mosquitto
DEVICES = [f"d{i}" for i in range(6)]


@pytest.fixture(scope="module")
def bundle():
    return fake_bundle()


@pytest.fixture(scope="module")
def broker():
    from device_sim.mosquitto import MosquittoBroker

    with MosquittoBroker() as b:
        yield b


class Running:
    """An aggregator and a scripted fleet of DEVICES on a fresh fleet name."""

    counter = 0

    def __init__(self, broker, bundle, **overrides):
        Running.counter += 1
        self.fleet_name = f"t{Running.counter}"
        key, _ = keypair()
        settings = dict(fleet=self.fleet_name, clients_per_round=3, over_selection=1.0, checkin_window_s=5.0,
                        expected_checkins=len(DEVICES), report_deadline_s=10.0, codec="f32", **PLAIN_FEDAVG)
        settings.update(overrides)
        self.config = AggregatorConfig(**settings)
        self.bundle = bundle
        self.agg = Aggregator(self.config, bundle, MqttSettings(port=broker.port), key)
        self.agg.start()
        self.fleet = ScriptedFleet(broker.port, self.fleet_name, DEVICES, client_id=f"fleet-{self.fleet_name}")
        self.result = None
        self._thread = None

    def begin_round(self):
        self.result = None
        round_id = self.agg.round_id + 1
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        wait_until(lambda: self.fleet.selected(round_id) or (self.result is not None), 10, "assignments")
        # assignments arrive one message per device: give the rest of them a moment to land
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.result is None:
            with self.fleet._lock:
                answered = len(self.fleet.assignments[round_id])
            if answered >= len(self.fleet.devices):
                break
            time.sleep(0.01)
        return round_id, self.fleet.selected(round_id)

    def _run(self):
        try:
            self.result = self.agg.run_round()
        except AggregatorStopped:
            pass

    def end_round(self, timeout=20):
        self._thread.join(timeout)
        assert self.result is not None, "round did not end"
        return self.result

    def send(self, device, vec, round_id, base=None, examples=4, **kw):
        base = self.agg.version if base is None else base
        self.fleet.send(device, update_bytes(self.fleet_name, device, round_id, base, vec, examples, **kw))

    def close(self):
        self.fleet.stop()
        self.agg.stop()


@pytest.fixture
def running(broker, bundle):
    made = []

    def make(**overrides):
        r = Running(broker, bundle, **overrides)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_round_commits_the_weighted_mean_exactly_and_over_selects(running, bundle):
    run = running(over_selection=1.5)
    round_id, selected = run.begin_round()
    assert len(selected) == 5  # ceil(3 * 1.5) of 6 checked-in devices
    updates = []
    for i, device in enumerate(selected):
        vec = dyadic_update(i, bundle.param_count)
        run.send(device, vec, round_id, examples=i + 1)
        if i < 3:
            updates.append((vec, i + 1))
    result = run.end_round()
    assert result.committed and result.version == 1 and result.goal == 3 and result.cohort == 5
    assert result.participants == 3 and result.dropped == 0 and result.checkins == 6
    np.testing.assert_array_equal(run.agg.weights, expected_fedavg(bundle.initial_weights, updates))
    # reports beyond the goal (the over-selected) are refused with a reason
    wait_until(lambda: len(run.fleet.acks_for()) == 5, 5, "five acks")
    late = [a for a in run.fleet.acks_for() if not a.accepted]
    assert {a.reason for a in late} == {"round_closed"} and len(late) == 2
    # the new model is retained and signed: a late subscriber gets version 1
    wait_until(lambda: run.fleet.model_version() == 1, 5, "model v1")


def test_round_is_abandoned_when_too_few_report(running, bundle):
    run = running(clients_per_round=4, min_reports=3, report_deadline_s=1.5)
    round_id, selected = run.begin_round()
    for i, device in enumerate(selected[:2]):
        run.send(device, dyadic_update(i, bundle.param_count), round_id)
    result = run.end_round()
    assert not result.committed and result.participants == 2 and result.version == 0
    assert "2 of 4 reports, 3 needed" in result.abandoned_reason
    np.testing.assert_array_equal(run.agg.weights, bundle.initial_weights)
    assert run.agg.metrics.rounds.labels(run.fleet_name, "abandoned")._value.get() == 1
    # the next round starts from the same version
    round_id, selected = run.begin_round()
    assert run.fleet.plans[round_id].base_version == 0


def test_every_validation_rule_is_acked_with_its_reason_and_counted(running, bundle):
    run = running(clients_per_round=5, max_update_norm=5.0, report_deadline_s=4.0)
    round_id, selected = run.begin_round()
    outsider = sorted(set(DEVICES) - set(selected))[0]
    dim = bundle.param_count
    good = dyadic_update(1, dim)
    fleet = run.fleet_name
    a, b, c, d, e = selected
    cases = {
        "wrong_round": (a, update_bytes(fleet, a, round_id + 5, 0, good)),
        "not_in_cohort": (outsider, update_bytes(fleet, outsider, round_id, 0, good)),
        "stale_base": (a, update_bytes(fleet, a, round_id, 7, good)),
        "bad_codec": (a, update_bytes(fleet, a, round_id, 0, good, codec="q8")),
        "wrong_size": (a, update_bytes(fleet, a, round_id, 0, dyadic_update(1, dim + 3))),
        "norm_too_large": (a, update_bytes(fleet, a, round_id, 0, np.full(dim, 1.0, np.float32))),
        "bad_field": (a, update_bytes(fleet, b, round_id, 0, good)),  # envelope of b on a's topic
        "truncated": (a, update_bytes(fleet, a, round_id, 0, good)[:-10]),
        "too_large": (a, Envelope(Kind.UPDATE, fleet, a, round_id, 0, 4, "f32", {},
                                  bytes(parse_codec("f32").max_payload_body(dim) * 2 + 4096)).encode()),
    }
    # A NaN written into an f32 payload by hand: the codec's own decoder already refuses it
    # (bad_payload); the intake's not_finite rule behind it is tested in test_intake.py.
    payload = bytearray(parse_codec("f32").encode(good).payload)
    payload[-4:] = np.array([np.nan], "<f4").tobytes()
    cases["bad_payload"] = (a, Envelope(Kind.UPDATE, fleet, a, round_id, 0, 4, "f32", {}, bytes(payload)).encode())
    for reason, (device, data) in cases.items():
        run.fleet.send(device, data)
    wait_until(lambda: len(run.fleet.acks_for()) == len(cases), 10, "one ack per bad update")
    reasons = sorted(ack.reason for ack in run.fleet.acks_for() if not ack.accepted)
    assert reasons == sorted(cases)
    for reason in cases:
        assert run.agg.metrics.updates_rejected.labels(fleet, reason)._value.get() == 1, reason
    # the device whose updates were refused can still report properly; duplicates count once
    run.send(a, good, round_id)
    run.send(a, good, round_id)  # QoS 1 redelivery of the same update
    for i, device in enumerate((b, c, d, e)):
        run.send(device, dyadic_update(10 + i, dim), round_id)
    result = run.end_round()
    assert result.committed and result.participants == 5 and result.duplicates == 1
    assert result.rejected.get("not_in_cohort") == 1 and result.rejected.get("wrong_round") == 1
    # the duplicate's ack may still be on its way when the round ends: wait for it, then look
    wait_until(lambda: any(ack.reason == "duplicate" for ack in run.fleet.acks_for(a)), 10, "the duplicate's ack")
    dup_acks = [ack for ack in run.fleet.acks_for(a) if ack.reason == "duplicate"]
    assert len(dup_acks) == 1 and dup_acks[0].accepted  # confirmed again, not counted again
    expected = expected_fedavg(bundle.initial_weights,
                               [(good, 4)] + [(dyadic_update(10 + i, dim), 4) for i in range(4)])
    np.testing.assert_array_equal(run.agg.weights, expected)


def test_pace_steering_spreads_unselected_devices_and_the_window_still_closes_early(running, bundle):
    run = running(clients_per_round=1, over_selection=1.0, pace_checkins_per_slot=1.0, checkin_window_s=8.0)
    for _ in range(2):
        round_id, selected = run.begin_round()
        run.send(selected[0], dyadic_update(round_id, bundle.param_count), round_id)
        assert run.end_round().committed
    # after one round the aggregator knows the period: 6 devices for 1 seat -> spread over rounds
    retries = [a.retry_after_s for a in run.fleet.assignments[round_id].values() if not a.selected]
    # 0 = back for the next round (slot 0); the others are spread over the rounds after it
    assert len(retries) == 5 and sum(r > 0 for r in retries) >= 3 and len(set(retries)) > 1
    # each answer names the round the device is expected back for; the cohort is steered too
    answers = list(run.fleet.assignments[round_id].values())
    assert all(a.back_for_round > round_id for a in answers)
    assert len({a.back_for_round for a in answers}) > 1
    assert run.agg._pace.spread_rounds(1) > 1


def test_federated_evaluation_jsonl_and_prometheus(running, bundle, tmp_path):
    from device_sim.mosquitto import free_port

    port = free_port()
    run = running(metrics_port=port, metrics_host="127.0.0.1", metrics_jsonl=str(tmp_path / "rounds.jsonl"))
    round_id, selected = run.begin_round()
    for i, device in enumerate(selected):
        meta = {"train_loss": 2.0, "extra": {"eval": {"correct1": i, "correct3": 2 * i, "scored": 10}}}
        run.send(device, dyadic_update(i, bundle.param_count), round_id, meta=meta)
    result = run.end_round()
    assert result.fed_eval == {"top1": 3 / 30, "top3": 6 / 30, "scored": 30.0, "devices": 3.0}
    line = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert line["round"] == round_id and line["committed"] and line["fed_eval"]["top3"] == pytest.approx(0.2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'fedboard_updates_accepted_total{{fleet="{run.fleet_name}"}} 3.0' in text
    assert f'fedboard_model_version{{fleet="{run.fleet_name}"}} 1.0' in text
    assert 'source="fed_eval"' in text


def test_server_side_evaluation_hook_runs_every_n_rounds(broker, bundle):
    calls = []

    def hook(weights):
        calls.append(weights.copy())
        return {"top3": 0.5}

    key, _ = keypair()
    config = AggregatorConfig(fleet="evalhook", clients_per_round=1, over_selection=1.0, checkin_window_s=3.0,
                              expected_checkins=1, report_deadline_s=5.0, codec="f32", eval_every=2)
    agg = Aggregator(config, bundle, MqttSettings(port=broker.port), key, eval_hook=hook)
    agg.start()
    fleet = ScriptedFleet(broker.port, "evalhook", ["only"], client_id="fleet-evalhook")
    try:
        results = []
        for round_id in (1, 2):
            out = {}
            thread = threading.Thread(target=lambda: out.setdefault("r", agg.run_round()))
            thread.start()
            wait_until(lambda: fleet.selected(round_id), 5, "assignment")
            fleet.send("only", update_bytes("evalhook", "only", round_id, agg.version, dyadic_update(round_id, bundle.param_count)))
            thread.join(10)
            results.append(out["r"])
        assert results[0].eval == {} and results[1].eval == {"top3": 0.5}
        assert len(calls) == 1 and np.array_equal(calls[0], agg.weights)
    finally:
        fleet.stop()
        agg.stop()


def test_a_full_disk_stops_the_round_unacknowledged_and_a_restart_recovers_it(broker, bundle, tmp_path):
    import resource
    import signal

    from aggregator.checkpoint import CheckpointError

    key, _ = keypair()
    config = AggregatorConfig(fleet="fulldisk", clients_per_round=2, over_selection=1.0, checkin_window_s=5.0,
                              expected_checkins=2, report_deadline_s=20.0, codec="f32",
                              checkpoint_dir=str(tmp_path / "state"), **PLAIN_FEDAVG)
    agg = Aggregator(config, bundle, MqttSettings(port=broker.port), key)
    agg.start()
    fleet = ScriptedFleet(broker.port, "fulldisk", ["a", "b"], client_id="fleet-fulldisk")
    errors = []

    def run():
        try:
            agg.run_round()
        except CheckpointError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    updates = {d: dyadic_update(i, bundle.param_count) for i, d in enumerate("ab")}
    try:
        wait_until(lambda: len(fleet.selected(1)) == 2, 10, "the cohort")
        fleet.send("a", update_bytes("fulldisk", "a", 1, 0, updates["a"]))
        wait_until(lambda: fleet.acks_for("a"), 5, "a's ack")
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # the disk is full from now on
        try:
            fleet.send("b", update_bytes("fulldisk", "b", 1, 0, updates["b"]))
            thread.join(10)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        assert errors and "last good checkpoint" in str(errors[0]) and "restart" in str(errors[0])
        assert fleet.acks_for("b") == []  # never acknowledged: the broker keeps it for the restart
    finally:
        agg.stop()
    again = Aggregator(config, bundle, MqttSettings(port=broker.port), key)
    again.start()
    try:
        result = again.run_round()  # resumes round 1 with a; b is delivered again
        assert result.committed and result.resumed and result.participants == 2
        np.testing.assert_array_equal(again.weights, expected_fedavg(bundle.initial_weights,
                                                                     [(updates["a"], 4), (updates["b"], 4)]))
    finally:
        fleet.stop()
        again.stop()


def test_dp_fedavg_round_clips_adds_noise_and_reports_epsilon(running, bundle):
    """`aggregation = "dp:..."` runs DP-FedAvg in the live round and accounts for it."""
    run = running(over_selection=1.0, aggregation="dp:clip=0.5,noise=1.0,expected=3,seed=7")
    round_id, selected = run.begin_round()
    for i, device in enumerate(selected):
        run.send(device, dyadic_update(i, bundle.param_count), round_id)
    result = run.end_round()
    assert result.committed and result.participants == 3
    privacy = result.privacy
    assert privacy["epsilon"] > 0 and privacy["delta"] == 1e-5 and privacy["rounds"] == 1
    assert privacy["sampling_probability"] == pytest.approx(3 / 6)
    moved = run.agg.weights - bundle.initial_weights
    # the released step is (sum of clipped updates + N(0, (z C)^2)) / expected: far from the plain mean
    plain = expected_fedavg(bundle.initial_weights, [(dyadic_update(i, bundle.param_count), 4) for i in range(3)])
    assert not np.allclose(run.agg.weights, plain)
    noise_std = np.std(moved)
    assert 0.5 * (1.0 * 0.5 / 3) < noise_std < 2.0 * (1.0 * 0.5 / 3)
