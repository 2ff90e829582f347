"""Oversized messages through a real Mosquitto: refused before anyone reads them whole.

Three layers, each tested here end to end:
- the broker's `max_packet_size` (aggregator/broker_config.py renders it): Mosquitto reads the
  MQTT fixed header, sees the remaining length is over the limit and disconnects the sender
  without reading the payload, so the aggregator never sees the message at all;
- the envelope header: a message under the broker limit but over the aggregator's
  `max_payload` is refused from the header's payload length (decode_envelope checks it
  before the CRC or any decoding) and acked `too_large`;
- MQTT 5's Maximum Packet Size in CONNECT: a client that announces one is never sent a
  bigger packet by the broker (it drops it for that client), the way a small device can
  refuse a huge retained model before a byte of it arrives.
"""
from __future__ import annotations

import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.broker_config import MAX_PACKET_BYTES
from aggregator.server import Aggregator, AggregatorConfig
from aggregator_testkit import ScriptedFleet, dyadic_update, fake_bundle, keypair, update_bytes, wait_until
from device_sim.mosquitto import MosquittoBroker
from protocol.envelope import DEFAULT_MAX_PAYLOAD, Envelope, Kind
from protocol.transport import MqttSettings

pytestmark = pytest.mark.mosquitto
BROKER_LIMIT = 256 * 1024
AGGREGATOR_LIMIT = 64 * 1024
DEVICES = [f"d{i}" for i in range(4)]


@pytest.fixture(scope="module")
def broker():
    with MosquittoBroker(extra_config=f"max_packet_size {BROKER_LIMIT}") as b:
        yield b


def _client(port: int, client_id: str, *, max_packet: int | None = None) -> tuple[mqtt.Client, threading.Event]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    props = None
    if max_packet is not None:
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = max_packet
    client.connect("127.0.0.1", port, properties=props)
    client.loop_start()
    assert connected.wait(10), f"{client_id} could not connect"
    return client, connected


def test_the_deployed_broker_limit_matches_the_envelope_limit():
    # a broker that let bigger packets through would make every aggregator read them whole
    assert MAX_PACKET_BYTES <= DEFAULT_MAX_PAYLOAD + 64 * 1024


def test_oversized_updates_are_refused_by_the_broker_and_by_the_envelope_header(broker):
    bundle = fake_bundle()
    key, _ = keypair()
    config = AggregatorConfig(fleet="big", clients_per_round=2, over_selection=1.0, checkin_window_s=5.0,
                              expected_checkins=len(DEVICES), report_deadline_s=20.0, codec="f32",
                              max_payload=AGGREGATOR_LIMIT)
    agg = Aggregator(config, bundle, MqttSettings(port=broker.port), key)
    agg.start()
    fleet = ScriptedFleet(broker.port, "big", DEVICES, client_id="fleet-big")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(agg.run_round()))
    try:
        worker.start()
        wait_until(lambda: len(fleet.selected(1)) == 2, 15, "the cohort")
        first, second = fleet.selected(1)

        # 1 MB: over the broker's limit. The broker drops the sender; the aggregator never sees it.
        attacker, _ = _client(broker.port, "attacker")
        gone = threading.Event()
        attacker.on_disconnect = lambda *args: gone.set()
        huge = Envelope(Kind.UPDATE, "big", first, 1, 0, 4, "f32", {}, bytes(4 * BROKER_LIMIT)).encode()
        attacker.publish(fleet.topics.update(first), huge, qos=1)
        assert gone.wait(10), "the broker kept a client that sent a packet over max_packet_size"
        attacker.loop_stop()

        # 128 KB: through the broker, refused by the aggregator from the envelope header alone
        mid = Envelope(Kind.UPDATE, "big", first, 1, 0, 4, "f32", {}, bytes(2 * AGGREGATOR_LIMIT)).encode()
        fleet.send(first, mid)
        wait_until(lambda: len(fleet.acks_for(first)) == 1, 10, "the too_large ack")
        ack = fleet.acks_for(first)[0]
        assert not ack.accepted and ack.reason == "too_large" and f"limit of {AGGREGATOR_LIMIT}" in ack.detail

        # the round goes on: both devices report properly and it commits
        for i, device in enumerate((first, second)):
            fleet.send(device, update_bytes("big", device, 1, 0, dyadic_update(i, bundle.param_count)))
        worker.join(30)
        assert result and result[0].committed and result[0].participants == 2
        assert dict(agg.rejections) == {"too_large": 1}  # the 1 MB message never reached the aggregator
    finally:
        fleet.stop()
        agg.stop()
        worker.join(5)


def test_a_client_announcing_a_maximum_packet_size_is_never_sent_a_bigger_message(broker):
    small, _ = _client(broker.port, "small-device", max_packet=16 * 1024)
    received: list[int] = []
    subscribed = threading.Event()
    small.on_message = lambda client, userdata, msg: received.append(len(msg.payload))
    small.on_subscribe = lambda *args: subscribed.set()
    small.subscribe("big/model/current", qos=1)
    assert subscribed.wait(10)
    publisher, _ = _client(broker.port, "publisher")
    for size in (100 * 1024, 1024):  # a retained model too big for the device, then a small message
        publisher.publish("big/model/current", np.zeros(size, np.uint8).tobytes(), qos=1).wait_for_publish(10)
    wait_until(lambda: received, 10, "the small message")
    assert received == [1024]
    publisher.loop_stop()
    small.loop_stop()
