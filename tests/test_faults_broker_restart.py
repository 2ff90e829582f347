"""Fault: the broker restarts mid-round (SIGKILL and SIGTERM), persistence on.

With Mosquitto's default autosave (30 min) a SIGKILL loses every retained message and session
since the last clean shutdown. Regression test first: the aggregator, reconnecting to a broker
that has no session of its, publishes the retained bundle, model and round again (before, a
device installed after the crash found no bundle to bootstrap from until the aggregator was
restarted). Then the soak run: rounds finish, no accepted update lost or doubled.
"""
import pytest

from aggregator_testkit import fake_bundle, keypair, wait_until
from benchkit import load_bench
from device_sim.mosquitto import MosquittoBroker
from protocol.topics import FleetTopics


def _soak():
    return load_bench("soak_faults")


@pytest.mark.mosquitto
def test_aggregator_republishes_retained_state_when_the_broker_lost_it(tmp_path):
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.transport import MqttSettings

    broker = MosquittoBroker(persistence=True, workdir=tmp_path / "broker")  # default autosave: 30 min
    broker.start()
    topics = FleetTopics("lost")
    wanted = [topics.bundle, topics.model]
    config = AggregatorConfig(fleet="lost", checkpoint_dir=str(tmp_path / "state"))
    agg = Aggregator(config, fake_bundle(), MqttSettings(port=broker.port, reconnect_max_s=2.0), keypair()[0])
    try:
        agg.start()
        assert _soak().retained_topics(broker.port, wanted, 10) == set(wanted)
        broker.kill()       # nothing saved yet: retained messages and sessions are gone
        broker.start()      # same port, same (empty) persistence
        # the aggregator reconnects (paho backs off 1-2 s), sees no session, publishes again
        wait_until(lambda: _soak().retained_topics(broker.port, wanted, 2) == set(wanted), 30, "the retained bundle and model")
    finally:
        agg.stop()
        broker.stop()


@pytest.mark.mosquitto
@pytest.mark.slow
def test_broker_sigkill_and_sigterm_mid_round_lose_no_accepted_update(tmp_path, cache_dir):
    soak = _soak()
    settings = soak.SoakSettings(rounds=4, broker_restarts=2, broker_autosave_s=0, workdir=tmp_path, keep=True)
    inv, faults, wall_s, notes = soak.scenario_broker_restart(settings)
    assert inv.ok, (inv.problems, notes)
    assert [f.kind for f in faults] == ["broker-sigkill", "broker-sigterm"]
    assert inv.last_round == 4 and inv.final_version == 4 and inv.committed_rounds == 4
    assert inv.updates_lost == 0 and inv.duplicates == 0 and inv.version_gaps == 0 and inv.conflicting_versions == 0
    # the two device apps restarted after the SIGKILL (no model in memory) bootstrapped from the
    # retained state and checked in again (being selected again is chance)
    assert sum("checked in again in rounds [" in n and "checked in again in rounds []" not in n
               for n in notes) == 2, notes
