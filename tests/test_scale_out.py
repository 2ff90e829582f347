"""Scale-out: two intake workers share the update stream ($share) and the coordinator merges their sums."""
import threading

import numpy as np
import pytest

from aggregator.aggregation import make_aggregator
from aggregator.scale_out import IntakeWorker, merge_states
from aggregator.server import Aggregator, AggregatorConfig
from aggregator_testkit import PLAIN_FEDAVG, ScriptedFleet, dyadic_update, expected_fedavg, fake_bundle, keypair, update_bytes, wait_until
from protocol.transport import MqttSettings


@pytest.mark.parametrize("spec", ["mean", "clip:1|mean"])
def test_merged_partial_states_equal_one_aggregator(spec):
    dim = 300
    updates = [(np.random.default_rng(i).standard_normal(dim).astype(np.float32) * 0.1, float(i + 1)) for i in range(6)]
    whole = make_aggregator(spec)
    whole.reset(dim)
    parts = [make_aggregator(spec), make_aggregator(spec)]
    for p in parts:
        p.reset(dim)
    for i, (vec, w) in enumerate(updates):
        whole.add(vec, w, client_id=f"d{i}")
        parts[i % 2].add(vec, w, client_id=f"d{i}")
    merged = make_aggregator(spec)
    merged.load_state(merge_states([p.state() for p in parts], dim=dim))
    np.testing.assert_allclose(merged.result(), whole.result(), rtol=0, atol=1e-7)
    assert sorted(merged.client_ids) == sorted(whole.client_ids)
    with pytest.raises(ValueError, match="two partial sums"):
        merge_states([parts[0].state(), parts[0].state()], dim=dim)


@pytest.mark.mosquitto
def test_two_workers_share_the_updates_and_the_coordinator_commits_one_round(mosquitto):
    bundle = fake_bundle()
    key, _ = keypair()
    settings = MqttSettings(port=mosquitto.port, mqtt_version=5)
    devices = [f"d{i}" for i in range(8)]
    config = AggregatorConfig(fleet="scale", clients_per_round=8, over_selection=1.0, expected_checkins=8,
                              checkin_window_s=10.0, report_deadline_s=30.0, codec="f32", workers=2, **PLAIN_FEDAVG)
    coordinator = Aggregator(config, bundle, settings, key)
    workers = [IntakeWorker("scale", bundle.param_count, settings, f"w{i}", group=config.share_group) for i in range(2)]
    for w in workers:
        w.start()
    coordinator.start()
    fleet = ScriptedFleet(mosquitto.port, "scale", devices)
    try:
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("r", coordinator.run_round()))
        thread.start()
        wait_until(lambda: len(fleet.selected(1)) == 8, 15, "assignments")
        updates = {d: dyadic_update(i, bundle.param_count) for i, d in enumerate(devices)}
        for i, d in enumerate(devices):
            fleet.send(d, update_bytes("scale", d, 1, 0, updates[d], examples=i + 1))
            if i == 2:  # a redelivery of d0's update, possibly to the other worker: granted once only
                fleet.send("d0", update_bytes("scale", "d0", 1, 0, updates["d0"], examples=1))
        thread.join(40)
        result = out["r"]
        assert result.committed and result.participants == 8 and result.duplicates == 1, result
        assert all(w.accepted_total > 0 for w in workers)  # the broker spread the stream over both
        assert sum(w.accepted_total for w in workers) == 8
        expected = expected_fedavg(bundle.initial_weights, [(updates[d], i + 1) for i, d in enumerate(devices)])
        np.testing.assert_array_equal(coordinator.weights, expected)
        wait_until(lambda: len(fleet.acks_for()) == 9, 10, "acks")
        assert sum(1 for a in fleet.acks_for() if a.accepted and a.reason == "") == 8
    finally:
        fleet.stop()
        coordinator.stop()
        for w in workers:
            w.stop()


def test_scale_out_needs_mean_type_aggregation():
    with pytest.raises(ValueError, match="mean-type"):
        AggregatorConfig(workers=2, aggregation="median")
    AggregatorConfig(workers=2, aggregation="clip:5|mean")
