"""Issue 14 (items 2, 3, 4, 8): attacks on a live fleet that must fail or be reported.

Each test runs Mosquitto with exactly the `fedboard broker-config` output, real `fedboard
aggregator` processes, and devices that log in with their own passwords (device_sim/adversary.py).
"""
import subprocess
import sys
import time

import numpy as np
import pytest

from aggregator.fleet_lease import FLEET_TAKEN_EXIT
from device_sim.adversary import (ROOT, LiveBroker, ScriptedDevice, start_aggregator, stand_in_bundle,
                                  wait_until)
from protocol.errors import EnvelopeError
from protocol.signing import write_keypair
from protocol.topics import FleetTopics, check_id

pytestmark = pytest.mark.mosquitto

ROUND = ["--clients-per-round", "3", "--over-selection", "1.0", "--expected-checkins", "3", "--checkin-window-s", "60",
         "--report-deadline-s", "60", "--codec", "f32", "--lease-interval-s", "1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    bundle = stand_in_bundle()
    bundle.write(d / "model.fbz")
    key, _ = write_keypair(d / "keys")
    return bundle, d / "model.fbz", key


@pytest.fixture
def live(tmp_path):
    brokers = []

    def make(devices=5, workers=0):
        broker = LiveBroker(tmp_path, f"f{len(brokers)}", devices, workers=workers)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def running(tmp_path):
    """Processes and devices, stopped at the end whatever happened."""
    things = []
    yield things
    for thing in reversed(things):
        (thing.stop if hasattr(thing, "stop") else thing.close)()


def _round(devices, round_id, dim, base=0, seed=0):
    """Every device: wait to be selected, then send its update."""
    for d in devices:
        wait_until(lambda d=d: d.selected(round_id), 60, f"{d.user} to be selected for round {round_id}")
    for i, d in enumerate(devices):
        d.send_update(round_id, base, np.random.default_rng(seed + i).normal(0, 0.01, dim))


def test_a_device_with_the_aggregators_client_id_cannot_take_its_session(live, running, model, tmp_path):
    bundle, bundle_path, key = model
    broker = live()
    agg = start_aggregator(broker, tmp_path, "agg", bundle_path, key, "--checkpoint-dir", str(tmp_path / "state"),
                           "--until-round", "1", *ROUND)
    running.append(agg)
    assert agg.wait_for(f"aggregator of fleet {broker.fleet} running"), agg.text()
    honest = [ScriptedDevice(broker, u) for u in broker.devices[:3]]
    running.extend(honest)
    wait_until(lambda: all(d.selected(1) for d in honest), 60, "the cohort")
    # 8 takeovers, clean start and resume alternating, with the aggregator's predictable client id
    for i in range(8):
        thief = ScriptedDevice(broker, broker.devices[3], client_id=f"aggregator-{broker.fleet}", subscribe=False,
                               clean_start=i % 2 == 0)
        time.sleep(0.1)
        thief.close()
    _round(honest, 1, bundle.param_count)
    assert agg.proc.wait(60) == 0, agg.text()
    log = agg.text()
    assert "round 1: committed v1 3/3 reports" in log, log
    assert "disconnected from the broker" not in log, log  # the aggregator never lost its connection
    assert all(d.acked(1) is not None and d.acked(1).accepted for d in honest)


def test_a_second_aggregator_on_the_fleet_stops_loudly_and_the_first_keeps_serving(live, running, model, tmp_path):
    bundle, bundle_path, key = model
    broker = live()
    first = start_aggregator(broker, tmp_path, "first", bundle_path, key, "--checkpoint-dir", str(tmp_path / "a"),
                             "--until-round", "1", *ROUND)
    running.append(first)
    assert first.wait_for(f"aggregator of fleet {broker.fleet} running"), first.text()
    second = start_aggregator(broker, tmp_path, "second", bundle_path, key, "--checkpoint-dir", str(tmp_path / "b"),
                              "--until-round", "1", *ROUND)
    running.append(second)
    assert second.proc.wait(60) == FLEET_TAKEN_EXIT, second.text()
    assert f"STOPPED: another aggregator serves fleet '{broker.fleet}'" in second.text()
    assert "Run ONE aggregator per fleet" in second.text()
    # the first one goes on serving the fleet: nothing lost, nothing split between two models
    honest = [ScriptedDevice(broker, u) for u in broker.devices[:3]]
    running.extend(honest)
    _round(honest, 1, bundle.param_count)
    assert first.proc.wait(60) == 0, first.text()
    assert "round 1: committed v1 3/3 reports" in first.text()
    assert "another aggregator" not in first.text()


def test_a_lease_claimed_by_another_aggregator_stops_the_running_one(live, running, model, tmp_path):
    """Two started at once (both read no lease): the one that sees the other's lease stops, exit 4."""
    from aggregator.fleet_lease import FleetLease
    import paho.mqtt.client as mqtt

    bundle, bundle_path, key = model
    broker = live(workers=1)
    agg = start_aggregator(broker, tmp_path, "agg", bundle_path, key, "--checkpoint-dir", str(tmp_path / "s"), *ROUND)
    running.append(agg)
    assert agg.wait_for(f"aggregator of fleet {broker.fleet} running"), agg.text()
    other = FleetLease(FleetTopics(broker.fleet), "0123456789abcdef", 1.0)
    # only the aggregator's side may write agg/: here the worker's user, whose ACL has no agg/lease
    # (refused by the broker) ... then the aggregator's own user, as a second aggregator would
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
    c.username_pw_set(broker.workers[0], broker.password(broker.workers[0]))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    info = c.publish(other.topic, other.message(), qos=1, retain=True)
    info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    time.sleep(2.5)  # two heartbeats: a forged lease would have stopped it by now
    assert agg.proc.poll() is None, agg.text()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="y", protocol=mqtt.MQTTv5)
    c.username_pw_set("aggregator", broker.password("aggregator"))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(other.topic, other.message(), qos=1, retain=True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    assert agg.proc.wait(60) == FLEET_TAKEN_EXIT, agg.text()
    assert "another aggregator claimed fleet" in agg.text()


def test_devices_cannot_join_the_workers_group(live, running, model, tmp_path):
    bundle, bundle_path, key = model
    broker = live(workers=1)
    coordinator = start_aggregator(broker, tmp_path, "coord", bundle_path, key, "--checkpoint-dir",
                                   str(tmp_path / "s"), "--until-round", "1", "--workers", "1", *ROUND)
    running.append(coordinator)
    worker = start_aggregator(broker, tmp_path, "worker", bundle_path, None, "--worker", "w1",
                              "--share-group", broker.share_group, user=broker.workers[0])
    running.append(worker)
    assert worker.wait_for("intake worker w1"), worker.text()
    root = FleetTopics(broker.fleet).root
    thieves = [ScriptedDevice(broker, u, checkin=False, subscribe=False) for u in broker.devices[3:5]]
    running.extend(thieves)
    for t in thieves:  # the well-known group name, and the plain topic: neither takes an update away
        t.client.subscribe([(f"$share/fedboard-agg/{root}/update/+", 1), (f"{root}/update/+", 1)])
    honest = [ScriptedDevice(broker, u) for u in broker.devices[:3]]  # no re-sends: every update must arrive once
    running.extend(honest)
    _round(honest, 1, bundle.param_count)
    assert coordinator.proc.wait(60) == 0, coordinator.text()
    assert "round 1: committed v1 3/3 reports" in coordinator.text(), coordinator.text()
    assert all(not t.messages for t in thieves)
    assert all(d.acked(1) is not None and d.acked(1).accepted for d in honest)


def test_a_restart_in_another_role_drops_the_old_subscription(live, running, model, tmp_path):
    bundle, bundle_path, key = model
    broker = live(workers=1)
    state = ["--checkpoint-dir", str(tmp_path / "s")]
    honest = [ScriptedDevice(broker, u) for u in broker.devices[:3]]
    running.extend(honest)
    single = start_aggregator(broker, tmp_path, "single", bundle_path, key, *state, "--until-round", "1", *ROUND)
    running.append(single)
    _round(honest, 1, bundle.param_count)
    assert single.proc.wait(60) == 0 and "round 1: committed v1 3/3" in single.text(), single.text()
    # the same aggregator (same state, same session) restarted as the coordinator of one worker
    coordinator = start_aggregator(broker, tmp_path, "coord", bundle_path, key, *state, "--until-round", "2",
                                   "--workers", "1", *ROUND)
    running.append(coordinator)
    worker = start_aggregator(broker, tmp_path, "worker", bundle_path, None, "--worker", "w1",
                              "--share-group", broker.share_group, user=broker.workers[0])
    running.append(worker)
    assert worker.wait_for("intake worker w1"), worker.text()
    _round(honest, 2, bundle.param_count, base=1, seed=10)
    assert coordinator.proc.wait(60) == 0, coordinator.text()
    log = coordinator.text()
    assert "round 2: committed v2 3/3 reports" in log, log
    assert "the workers take updates" not in log  # update/+ was unsubscribed: the coordinator never saw one


def test_ids_must_match_as_a_whole(tmp_path):
    for kind, bad in (("fleet", "demo\n"), ("device", "device-0001\n"), ("device", "a\nb")):
        with pytest.raises(EnvelopeError, match="is not allowed"):
            check_id(kind, bad)
    out = subprocess.run([sys.executable, "-m", "aggregator.commands", "broker-config", "--out", str(tmp_path / "b"),
                          "--devices", "2", "--fleet", "demo\n"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "fleet id 'demo\\n' is not allowed" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "b" / "acl").exists()


def test_what_a_device_retains_on_its_topics_is_deleted(live, running, model, tmp_path):
    import paho.mqtt.client as mqtt

    bundle, bundle_path, key = model
    broker = live()
    agg = start_aggregator(broker, tmp_path, "agg", bundle_path, key, "--checkpoint-dir", str(tmp_path / "s"), *ROUND)
    running.append(agg)
    assert agg.wait_for(f"aggregator of fleet {broker.fleet} running"), agg.text()
    junk = b"J" * (20 * 2**20)
    thief = ScriptedDevice(broker, broker.devices[3], checkin=False, subscribe=False)
    running.append(thief)
    topics = FleetTopics(broker.fleet)
    me = broker.devices[3]
    for topic in (topics.update(me), topics.checkin(me), topics.status(me)):
        assert thief._publish(topic, junk, retain=True)
    wait_until(lambda: agg.text().count("retained on") >= 3, 60, "the aggregator to delete the junk")
    assert agg.stop() == 0
    # what is retained under the fleet now (the aggregator is stopped, so its user may look)
    seen: dict[str, int] = {}
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    probe.username_pw_set("aggregator", broker.password("aggregator"))
    probe.on_message = lambda c, u, m: seen.__setitem__(m.topic, len(m.payload))
    probe.connect("127.0.0.1", broker.port)
    probe.loop_start()
    try:
        probe.subscribe([(f"{topics.root}/update/+", 1), (f"{topics.root}/checkin/+", 1),
                         (f"{topics.root}/status/+", 1), (f"{topics.root}/marker", 1)])
        time.sleep(0.5)
        probe.publish(f"{topics.root}/marker", b"end", qos=1)
        wait_until(lambda: f"{topics.root}/marker" in seen, 30, "the marker")  # retained ones came before it
    finally:
        probe.disconnect()
        probe.loop_stop()
    assert max((n for t, n in seen.items() if not t.endswith("/marker")), default=0) <= 4096, seen


def test_a_real_device_re_sends_an_update_a_group_member_swallowed(live, running, tmp_path, cache_dir):
    """The workers' group name leaked: a device joined the group and took the first update (the broker
    confirmed it to the device). edge_client's DeviceClient gets no Ack and sends it again."""
    import threading

    import paho.mqtt.client as mqtt

    from aggregator.scale_out import IntakeWorker
    from aggregator.server import Aggregator, AggregatorConfig
    from edge_client.device import DeviceClient, DeviceConfig
    from edge_client.text_windows import StoreWindows
    from edge_client.textstore import TextStore
    from edge_client.trainer import InterpreterPool
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import Vocabulary, build_vocabulary
    from protocol.signing import ModelTrust
    from protocol.transport import MqttSettings
    from aggregator_testkit import keypair

    texts = ["i am going to the park", "see you at the station at six", "we are at home now"] * 10
    vocab = build_vocabulary(texts, size=100)
    bundle = get_or_export_bundle(ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16),
                                  vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")
    broker = live(devices=2, workers=1)
    me, thief_user = broker.devices

    def settings(user):
        return MqttSettings(port=broker.port, username=user, password=broker.password(user), keepalive_s=10,
                            reconnect_min_s=0.2, reconnect_max_s=1.0)

    private_key, public_key = keypair()
    agg = Aggregator(AggregatorConfig(fleet=broker.fleet, clients_per_round=1, expected_checkins=1, workers=1,
                                      checkin_window_s=30.0, report_deadline_s=60.0, codec="q8",
                                      share_group=broker.share_group), bundle, settings("aggregator"), private_key)
    agg.start()
    running.append(agg)
    root = FleetTopics(broker.fleet).root
    thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thief_user, protocol=mqtt.MQTTv5)
    thief.username_pw_set(thief_user, broker.password(thief_user))
    subscribed = threading.Event()
    thief.on_subscribe = lambda *a: subscribed.set()
    thief.connect("127.0.0.1", broker.port)
    thief.loop_start()
    thief.subscribe(f"$share/{broker.share_group}/{root}/update/+", 1)
    assert subscribed.wait(20)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", agg.run_round()), daemon=True)
    runner.start()
    store = TextStore(tmp_path / "texts.db")
    store.add_many(texts)
    device = DeviceClient(DeviceConfig(fleet=broker.fleet, device_id=me, mqtt=settings(me), ack_timeout_s=2.0),
                          InterpreterPool(bundle), StoreWindows(store, Vocabulary.from_json(bundle.vocab_json), 20),
                          ModelTrust(public_key, broker.fleet, bundle.model_id))
    device.start()
    running.append(device)
    # the thief is the group's only member when the update comes: the broker confirms it, then drops it
    wait_until(lambda: device.stats.updates_sent == 1, 60, "the device's update")
    worker = IntakeWorker(broker.fleet, bundle.param_count, settings(broker.workers[0]), "w1",
                          group=broker.share_group)
    worker.start()
    running.append(worker)
    runner.join(90)
    thief.loop_stop()
    thief.disconnect()
    store.close()
    assert result["r"].committed and result["r"].participants == 1, result
    assert device.stats.resends >= 1 and device.stats.updates_accepted == 1
