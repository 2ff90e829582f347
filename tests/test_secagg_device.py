"""edge_client/secure_update.py: the device's secure round, message by message (no broker needed)."""
import numpy as np
import pytest

from edge_client.secure_update import SecureUpdate
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.secagg import SecAggParams, SecAggServer

FLEET, DIM, ROUND = "f", 64, 5
DEVICES = ["a", "b", "c", "d"]


def server_envelope(message: bytes, device: str = "", round_id: int = ROUND) -> bytes:
    return Envelope(Kind.SECAGG, FLEET, device, round=round_id, codec="secagg", payload=message).encode()


def payload(data: bytes) -> bytes:
    env = decode_envelope(data, expect=Kind.SECAGG)
    assert env.fleet == FLEET and env.round == ROUND and env.codec == "secagg" and env.example_count == 0
    return env.payload


def make_round(update_clip=0.0, value_range=1.0):
    params = SecAggParams(ROUND, DIM, threshold=3, max_clients=len(DEVICES), value_range=value_range)
    server = SecAggServer(params, cohort=DEVICES)
    devices = {d: SecureUpdate(FLEET, d, ROUND, DIM, update_clip=update_clip) for d in DEVICES}
    for d, s in devices.items():
        assert server.receive(d, payload(s.advertise()))
    roster = server_envelope(server.close_keys().to_bytes())
    for d, s in devices.items():
        assert server.receive(d, payload(s.on_roster(roster)))
    bundles = {d: server_envelope(b.to_bytes(), d) for d, b in server.close_shares().items()}
    return server, devices, roster, bundles


def test_a_round_through_the_device_module_sums_the_clipped_updates():
    server, devices, roster, bundles = make_round(update_clip=1.0)
    rng = np.random.default_rng(1)
    updates = {d: rng.normal(0, 0.05, DIM).astype(np.float32) for d in DEVICES}
    updates["a"] = np.full(DIM, 1.0, np.float32)  # norm 8: clipped to 1 on the device
    for i, d in enumerate(DEVICES):
        s = devices[d]
        # half the devices finish training first, the others get their bundle first: masking happens once
        if i % 2:
            assert s.set_update(updates[d]) is False and s.on_bundle(bundles[d]) is True
        else:
            assert s.on_bundle(bundles[d]) is False and s.set_update(updates[d]) is True
        assert s.on_bundle(bundles[d]) is False  # QoS 1 redelivery claims nothing more
        assert server.receive(d, payload(s.masked_input()))
    assert devices["a"].clip_norm == pytest.approx(8.0)
    request = server_envelope(server.close_inputs().to_bytes())
    for d, s in devices.items():
        assert server.receive(d, payload(s.on_unmask(request)))
        assert s.done and s.on_unmask(request) is None  # the retained request again: answered once
    result = server.finish()
    clipped = dict(updates, a=np.full(DIM, 1.0 / 8.0, np.float32))
    expected = np.sum([clipped[d].astype(np.float64) for d in DEVICES], axis=0)
    assert np.abs(result.float_sum() - expected).max() <= len(DEVICES) * server.params.step


def test_other_rounds_and_redelivered_rosters_are_ignored_without_aborting():
    server, devices, roster, bundles = make_round()
    s = devices["a"]
    assert s.on_roster(roster) is None and not s.aborted  # the retained roster after a reconnect
    other = server_envelope(b"FSA1 anything", round_id=ROUND + 1)
    assert s.on_roster(other) is None and s.on_unmask(other) is None and s.on_bundle(other) is False
    assert not s.aborted


def test_a_roster_without_this_device_aborts_it_and_it_sends_nothing_more():
    params = SecAggParams(ROUND, DIM, threshold=2, max_clients=3)
    server = SecAggServer(params, cohort=["b", "c", "x"])
    outsider = SecureUpdate(FLEET, "x", ROUND, DIM)
    outsider.advertise()  # never reaches the server
    for d in ("b", "c"):
        server.receive(d, payload(SecureUpdate(FLEET, d, ROUND, DIM).advertise()))
    roster = server_envelope(server.close_keys().to_bytes())
    assert outsider.on_roster(roster) is None
    assert "does not list" in outsider.aborted
    assert outsider.set_update(np.zeros(DIM, np.float32)) is False and outsider.masked_input() is None


def test_an_unmask_request_that_does_not_name_the_device_aborts_it():
    server, devices, roster, bundles = make_round()
    late = devices["d"]
    for d in ("a", "b", "c"):
        devices[d].on_bundle(bundles[d])
        devices[d].set_update(np.zeros(DIM, np.float32))
        server.receive(d, payload(devices[d].masked_input()))
    request = server_envelope(server.close_inputs().to_bytes())
    late.on_bundle(bundles["d"])  # its update was still training when the inputs closed
    assert late.on_unmask(request) is None and "closed the inputs" in late.aborted
    assert late.set_update(np.zeros(DIM, np.float32)) is False and late.masked_input() is None


def test_a_weighted_device_masks_examples_times_update_and_its_example_count():
    params = SecAggParams(ROUND, DIM + 1, threshold=2, max_clients=2, value_range=64.0)
    server = SecAggServer(params, cohort=["a", "b"])
    devices = {d: SecureUpdate(FLEET, d, ROUND, DIM, weighted=True) for d in ("a", "b")}
    for d, s in devices.items():
        server.receive(d, payload(s.advertise()))
    roster = server_envelope(server.close_keys().to_bytes())
    for d, s in devices.items():
        server.receive(d, payload(s.on_roster(roster)))
    bundles = {d: server_envelope(b.to_bytes(), d) for d, b in server.close_shares().items()}
    updates = {"a": np.full(DIM, 0.5, np.float32), "b": np.full(DIM, -0.25, np.float32)}
    for d, weight in (("a", 3.0), ("b", 1.0)):
        devices[d].on_bundle(bundles[d])
        assert devices[d].set_update(updates[d], weight=weight)
        server.receive(d, payload(devices[d].masked_input()))
    request = server_envelope(server.close_inputs().to_bytes())
    for d, s in devices.items():
        server.receive(d, payload(s.on_unmask(request)))
    total = server.finish().float_sum()
    assert total[-1] == pytest.approx(4.0, abs=2 * params.step)  # the example counts, summed in secret
    assert total[:-1] / total[-1] == pytest.approx(np.full(DIM, (3 * 0.5 - 0.25) / 4), abs=1e-6)
    with pytest.raises(ValueError, match="weight"):
        SecureUpdate(FLEET, "c", ROUND, DIM, weighted=True).set_update(updates["a"], weight=0.0)
