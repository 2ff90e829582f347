"""Secure aggregation carried by the MQTT round protocol: the real Aggregator against a real broker.

A scripted fleet plays the devices over one MQTT connection with the device-side module
(`edge_client.secure_update.SecureUpdate`), so a test decides exactly who drops when; the
last test runs real `DeviceClient`s (training included) in a tiny simulation.
"""
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.broker_config import BrokerSetup, device_ids, write_broker_config
from aggregator.secure_round import SecureRound
from aggregator.server import Aggregator, AggregatorConfig
from aggregator_testkit import PLAIN_FEDAVG, dyadic_update, fake_bundle, keypair, wait_until
from edge_client.secure_update import SecureUpdate
from protocol.envelope import Kind, decode_envelope
from protocol.messages import Assignment, CheckIn, RoundPlan
from protocol.secagg import MaskedInput, SecAggServer, quantize, to_ring
from protocol.topics import FleetTopics
from protocol.transport import MqttSettings

DEVICES = [f"d{i}" for i in range(6)]
WEIGHTS = {d: float(i + 1) for i, d in enumerate(DEVICES)}  # example counts (check-ins announce 10)


@pytest.fixture(scope="module")
def bundle():
    return fake_bundle()


@pytest.fixture(scope="module")
def broker():
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    with MosquittoBroker() as b:
        yield b


class SecureFleet:
    """Devices that check in, run the secure protocol, and drop where a test tells them to."""

    def __init__(self, port, fleet, dim, updates, *, weights=None, drop_after_sharing=(), drop_after_masking=()):
        self.fleet, self.dim, self.updates = fleet, dim, updates
        self.weights = weights or {d: 1.0 for d in updates}
        self.drop_after_sharing, self.drop_after_masking = set(drop_after_sharing), set(drop_after_masking)
        self.topics = FleetTopics(fleet)
        self.secure: dict[str, SecureUpdate] = {}
        self.sent: dict[str, dict[str, bytes]] = {d: {} for d in updates}   # device -> what it published, by phase
        self.plans: dict[int, RoundPlan] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{fleet}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        root = self.topics.root
        self.client.subscribe([(self.topics.round, 1), (f"{root}/assign/+", 1), (self.topics.secagg_roster, 1),
                               (self.topics.secagg_unmask, 1), (f"{root}/secagg/down/+", 1)])
        assert ready.wait(10)

    def _publish(self, device, phase, data):
        if data is not None:
            self.sent[device][phase] = data
            self.client.publish(self.topics.secagg_up(device), data, qos=1)

    def _on_message(self, client, userdata, msg):
        try:
            self._handle(msg)
        except Exception as exc:  # surface bugs in the test thread
            self.error = exc
            raise

    def _handle(self, msg):
        if msg.topic == self.topics.round:
            plan = RoundPlan.from_envelope(decode_envelope(msg.payload, expect=Kind.PLAN))
            self.plans[plan.round_id] = plan
            for device in self.updates:
                env = CheckIn(plan.round_id, plan.base_version, 10, "scripted").to_envelope(self.fleet, device)
                self.client.publish(self.topics.checkin(device), env.encode(), qos=1)
        elif "/assign/" in msg.topic:
            a = Assignment.from_envelope(decode_envelope(msg.payload, expect=Kind.ASSIGN))
            device = msg.topic.rsplit("/", 1)[1]
            plan = self.plans[a.round_id]
            if a.selected and plan.secure_aggregation:
                s = SecureUpdate(self.fleet, device, a.round_id, self.dim, update_clip=plan.update_clip,
                                 weighted=plan.secure_weighted)
                with self._lock:
                    self.secure[device] = s
                self._publish(device, "advertise", s.advertise())
                s.set_update(self.updates[device], self.weights[device])  # "trained" at once: masking waits
        elif msg.topic == self.topics.secagg_roster:
            for device, s in list(self.secure.items()):
                self._publish(device, "share", s.on_roster(msg.payload))
        elif "/secagg/down/" in msg.topic:
            device = msg.topic.rsplit("/", 1)[1]
            s = self.secure.get(device)
            if s is not None and s.on_bundle(msg.payload) and device not in self.drop_after_sharing:
                self._publish(device, "mask", s.masked_input())
        elif msg.topic == self.topics.secagg_unmask:
            for device, s in list(self.secure.items()):
                if device not in self.drop_after_masking:
                    self._publish(device, "unmask", s.on_unmask(msg.payload))

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


class SecureRun:
    counter = 0

    def __init__(self, broker, bundle, updates, weighted=True, aggregation="mean", **fleet_options):
        SecureRun.counter += 1
        self.fleet_name = f"sa{SecureRun.counter}"
        key, _ = keypair()
        self.config = AggregatorConfig(
            fleet=self.fleet_name, clients_per_round=len(updates), over_selection=1.0, checkin_window_s=5.0,
            expected_checkins=len(updates), report_deadline_s=6.0, codec="f32", secure_aggregation=True,
            secagg_phase_s=2.0, secagg_weighted=weighted, aggregation=aggregation, **PLAIN_FEDAVG)
        self.agg = Aggregator(self.config, bundle, MqttSettings(port=broker.port), key)
        self.agg.start()
        self.fleet = SecureFleet(broker.port, self.fleet_name, bundle.param_count, updates, **fleet_options)
        self.result = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        self.result = self.agg.run_round()

    def finish(self, timeout=30):
        self.thread.join(timeout)
        assert self.result is not None, "round did not end"
        return self.result

    def close(self):
        self.fleet.stop()
        self.agg.stop()


@pytest.fixture
def secure_run(broker, bundle):
    made = []

    def make(updates, **options):
        options.setdefault("weights", WEIGHTS)
        run = SecureRun(broker, bundle, updates, **options)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


def _updates(bundle, devices=DEVICES):
    return {d: dyadic_update(i, bundle.param_count) for i, d in enumerate(devices)}


def _check_plain_mean(agg, bundle, updates, survivors, step, weights=None):
    """The new global model is the plain (example-weighted) mean of the survivors' updates, within the
    grid error: stochastic rounding moves each device's value by < 1 step, in weight x update units."""
    w = np.array([1.0 if weights is None else weights[d] for d in survivors])
    mean = np.sum([wi * updates[d].astype(np.float64) for wi, d in zip(w, survivors)], axis=0) / w.sum()
    expected = bundle.initial_weights.astype(np.float64) + mean
    error = np.abs(agg.weights.astype(np.float64) - expected)
    bound = len(survivors) * step / w.sum() * (1 + np.abs(mean).max()) if weights is not None else step
    assert error.max() <= bound + 1e-6  # + float32 weights
    assert agg.version == 1


def test_secure_round_commits_the_plain_mean_within_the_grid_error(secure_run, bundle):
    updates = _updates(bundle)
    run = secure_run(updates)
    result = run.finish()
    assert result.committed and result.participants == len(DEVICES) and result.abandoned_reason == ""
    sa = result.secagg
    assert sorted(sa["survivors"]) == DEVICES and sa["responders"] == len(DEVICES)
    assert sa["params"]["threshold"] == 4 and sa["params"]["max_clients"] == 6 and sa["params"]["bits"] == 32
    assert sa["weighted"] and sa["params"]["dim"] == bundle.param_count + 1 and sa["total_weight"] == pytest.approx(21)
    assert sa["params"]["value_range"] == 16.0 * 10  # the grid holds examples x update: range x largest check-in
    _check_plain_mean(run.agg, bundle, updates, DEVICES, sa["params"]["step"], WEIGHTS)
    # cost accounting: every phase has a wall time and bytes; the masked input is 4 bytes a value
    plan = run.fleet.plans[1]
    assert set(sa["phase_s"]) == {"advertise", "share", "mask", "unmask"}
    assert all(4 * bundle.param_count < n < 4 * bundle.param_count + 400 for n in sa["up_bytes"]["mask"].values())
    assert plan.secure_weighted
    assert result.uplink_bytes == sa["up_bytes_total"] > len(DEVICES) * 4 * bundle.param_count
    assert set(sa["down_bytes"]["share"]) == set(DEVICES) and sa["down_bytes_total"] > 0
    assert plan.secure_aggregation and plan.update_clip == 0.0


def test_a_third_dropping_after_masking_still_commits_and_the_server_holds_only_masked_bytes(secure_run, bundle):
    updates = _updates(bundle)
    dropping = {"d1", "d4"}
    run = secure_run(updates, drop_after_masking=dropping)
    agg = run.agg
    # the unmask phase waits secagg_phase_s for d1 and d4: look at everything the server holds meanwhile
    wait_until(lambda: agg._secure.current is not None and agg._secure.current.phase == "unmask", 15, "unmask phase")
    with agg._cv:
        sr = agg._secure.current
        arrays = _arrays_in(sr)
        assert agg._aggregate.count == 0  # nothing individual (nor the sum) reached the aggregator yet
    big = [a for a in arrays if a.size >= bundle.param_count]
    assert len(big) == 1  # one running sum of the masked inputs, whatever the cohort
    running_sum = big[0]
    for device, blob in sr.digests.items():
        assert isinstance(blob, bytes) and len(blob) == 32  # per device: a digest of the envelope, no vector
    # what crossed the broker and what the server sums are masked: uniform-looking, far from the updates
    for device in DEVICES:
        masked = MaskedInput.from_bytes(decode_envelope(run.fleet.sent[device]["mask"]).payload).values
        clear = np.concatenate([WEIGHTS[device] * updates[device].astype(np.float64), [WEIGHTS[device]]])
        plain = to_ring(quantize(clear, sr.server.params, np.random.default_rng(0)), sr.server.params)
        # uniform on [0, 2^32): the mean is within 5 standard errors of the middle
        assert np.mean(masked == plain) < 0.01
        assert abs(float(masked.mean()) / 2**32 - 0.5) < 5 * 0.2887 / np.sqrt(masked.size)
        assert not np.array_equal(running_sum, plain)
    result = run.finish()
    assert result.committed and result.participants == 6
    assert result.secagg["dropped_after_masking"] == sorted(dropping) and result.secagg["responders"] == 4
    _check_plain_mean(agg, bundle, updates, DEVICES, result.secagg["params"]["step"], WEIGHTS)  # their inputs count


def test_a_device_dropping_after_sharing_keys_still_commits_without_it(secure_run, bundle):
    updates = _updates(bundle)
    run = secure_run(updates, drop_after_sharing={"d3"})
    result = run.finish()
    survivors = [d for d in DEVICES if d != "d3"]
    assert result.committed and result.participants == 5 and result.dropped == 1
    assert result.secagg["dropped_after_sharing"] == ["d3"] and result.secagg["survivors"] == survivors
    _check_plain_mean(run.agg, bundle, updates, survivors, result.secagg["params"]["step"], WEIGHTS)


def test_unweighted_rounds_give_every_device_the_same_weight(secure_run, bundle):
    updates = _updates(bundle)
    run = secure_run(updates, weighted=False)
    result = run.finish()
    assert result.committed and not result.secagg["weighted"] and not run.fleet.plans[1].secure_weighted
    assert result.secagg["params"]["dim"] == bundle.param_count and result.secagg["params"]["value_range"] == 16.0
    _check_plain_mean(run.agg, bundle, updates, DEVICES, result.secagg["params"]["step"])


def test_dp_fedavg_composes_devices_clip_and_the_noise_goes_on_the_unmasked_sum(secure_run, bundle):
    from aggregator.dp import make_dp_aggregator
    from edge_client.local_dp import clip_to_norm

    spec = "dp:clip=0.5,noise=1.0,expected=6,seed=11|mean"
    updates = _updates(bundle)
    run = secure_run(updates, aggregation=spec)
    result = run.finish()
    plan = run.fleet.plans[1]
    assert result.committed and plan.update_clip == 0.5 and not plan.secure_weighted  # DP: devices weigh 1
    assert result.privacy["epsilon"] > 0 and result.secagg["params"]["value_range"] == 0.5
    # the same DP release computed from the clipped updates in the clear, with the same noise seed
    reference = make_dp_aggregator(spec)
    reference.reset(bundle.param_count)
    clipped = sum(clip_to_norm(v, 0.5)[0].astype(np.float64) for v in updates.values())
    reference.add_aggregate(clipped, len(updates))
    expected = bundle.initial_weights + reference.result()
    grid = len(updates) * result.secagg["params"]["step"] / 6
    assert np.abs(run.agg.weights - expected).max() <= grid + 1e-6


def test_too_few_devices_abandon_the_round_with_the_reason(secure_run, bundle):
    updates = _updates(bundle)
    run = secure_run(updates, drop_after_sharing={"d0", "d1", "d2"})  # 3 inputs < threshold 4
    result = run.finish()
    assert not result.committed and "threshold" in result.abandoned_reason
    assert run.agg.version == 0 and np.array_equal(run.agg.weights, bundle.initial_weights)


def test_config_refuses_aggregations_that_need_individual_updates():
    with pytest.raises(ValueError, match="'mean' or a DP-FedAvg"):
        AggregatorConfig(secure_aggregation=True, aggregation="median")
    with pytest.raises(ValueError, match="adaptive"):
        AggregatorConfig(secure_aggregation=True, aggregation="dp:clip=1,noise=1,expected=20,adaptive|mean")
    dp = AggregatorConfig(secure_aggregation=True, aggregation="dp:clip=0.5,noise=1,expected=20|mean")
    assert dp.secure_clip() == 0.5 and dp.secure_value_range() == 0.5
    assert AggregatorConfig(secure_aggregation=True, update_clip=2.0).secure_value_range() == 2.0
    assert AggregatorConfig(secure_aggregation=True).secure_value_range() == 16.0  # no clip: a wide grid


def _arrays_in(obj, seen=None):
    """Every numpy array reachable from obj's attributes, dicts, lists and tuples."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for k, v in obj.items() for a in _arrays_in(k, seen) + _arrays_in(v, seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [a for v in obj for a in _arrays_in(v, seen)]
    if isinstance(obj, (SecureRound, SecAggServer)) or hasattr(obj, "__dataclass_fields__"):
        return [a for v in vars(obj).values() for a in _arrays_in(v, seen)]
    return []


# -- the broker's ACL on the new topics ---------------------------------------------------------------------
def test_generated_acl_confines_devices_on_the_secagg_topics(tmp_path):
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto, free_port
    from test_broker_config import Client, wait

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    import os

    port = free_port()
    files = write_broker_config(tmp_path, BrokerSetup(fleet="acl", devices=device_ids(2), port=port, bind="127.0.0.1",
                                                     run_as_user="root" if os.geteuid() == 0 else None))
    text = files.conf.read_text()

    class Generated(MosquittoBroker):
        def config_text(self):
            return text

    root = "fedboard/acl/secagg"
    pw = {u: p.read_text().strip() for u, p in files.credentials.items()}
    with Generated(port=port):
        agg = Client(port, "aggregator", pw["aggregator"], "aggregator-sa")
        dev1 = Client(port, "device-0001", pw["device-0001"])
        try:
            assert agg.subscribe(f"{root}/up/+") < 128
            assert dev1.publish(f"{root}/up/device-0001", b"mine") == 0
            assert dev1.publish(f"{root}/up/device-0002", b"forged") == 135        # as another device
            assert dev1.publish(f"{root}/roster", b"forged roster", retain=True) == 135
            assert dev1.publish(f"{root}/unmask", b"forged request", retain=True) == 135
            assert dev1.publish(f"{root}/down/device-0002", b"forged bundle") == 135
            for topic in ("roster", "unmask", "down/device-0001", "down/device-0002"):
                dev1.subscribe(f"{root}/{topic}")
            assert agg.publish(f"{root}/roster", b"roster", retain=True) == 0
            assert agg.publish(f"{root}/unmask", b"request", retain=True) == 0
            assert agg.publish(f"{root}/down/device-0002", b"not yours") == 0
            assert agg.publish(f"{root}/down/device-0001", b"bundle") == 0
            wait(lambda: {p for _, p in dev1.messages} >= {b"roster", b"request", b"bundle"})
            time.sleep(0.3)
            assert all(p != b"not yours" for _, p in dev1.messages)  # another device's shares never reach it
            assert (f"{root}/up/device-0001", b"mine") in agg.messages
            assert all(p != b"forged" for _, p in agg.messages)
        finally:
            agg.close()
            dev1.close()


# -- real devices: DeviceClient + TFLite training + secure aggregation through embedded amqtt -----------------
def test_simulated_fleet_with_secure_aggregation(tmp_path, cache_dir):
    from device_sim.simulate import SimConfig, run_simulation

    report = run_simulation(SimConfig(out=str(tmp_path), devices=6, rounds=2, clients_per_round=3, vocab_size=300,
                                      embed_dim=16, units=32, seed=3, progress=False, report_deadline_s=120.0,
                                      secure_aggregation=True, update_clip=1.0))
    assert report["config"]["secure_aggregation"]
    for row in report["per_round"]:
        sa = row["secagg"]
        assert row["committed"] and row["participants"] == 3 and len(sa["survivors"]) == 3
        # example-weighted: the grid holds (examples x clipped update, examples), its range scaled to match
        assert sa["weighted"] and sa["params"]["dim"] == report["params"] + 1 and sa["total_weight"] > 0
        assert sa["params"]["value_range"] >= 1.0 and float(sa["params"]["value_range"]).is_integer()
        assert all(n > 4 * report["params"] for n in sa["up_bytes"]["mask"].values())
        assert row["uplink_bytes"] == sa["up_bytes_total"]
