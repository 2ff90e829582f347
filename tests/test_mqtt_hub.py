"""The hub drives many real MQTT connections on one thread and brings them back after a loss."""
import random
import signal
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

from device_sim.mosquitto import MosquittoBroker, free_port
from edge_client.mqtt_hub import MqttHub, raise_fd_limit


def make_client(i: int, subscribed: threading.Semaphore, got: list) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hub-test-{i}", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("hub/all", 1)
    client.on_subscribe = lambda *a: subscribed.release()
    client.on_message = lambda c, u, m: got.append(m.payload)
    return client


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_many_connections_on_one_thread_and_reconnect_after_broker_restart(tmp_path):
    """600 connections: paho's loop_start would need 600 threads and select() past fd 1023."""
    n = 600
    raise_fd_limit(4 * n + 256)
    port = free_port()
    subscribed = threading.Semaphore(0)
    got: list = []
    threads_before = threading.active_count()
    broker = MosquittoBroker(port=port, workdir=tmp_path / "m1")
    broker.start()
    hub = MqttHub("test-hub", rng=random.Random(1)).start()
    try:
        clients = [make_client(i, subscribed, got) for i in range(n)]
        for c in clients:
            hub.add(c, "127.0.0.1", port, keepalive=30, backoff_min_s=0.2, backoff_max_s=1.0)
        assert wait_for(lambda: hub.connected() == n, 60), hub.connected()
        assert threading.active_count() <= threads_before + 1  # the hub is the only new thread
        for _ in range(n):
            assert subscribed.acquire(timeout=30)
        pub = clients[0]
        pub.publish("hub/all", b"one", qos=1)
        assert wait_for(lambda: len(got) == n, 30), len(got)

        broker.kill()  # connections drop without DISCONNECT
        assert wait_for(lambda: hub.connected() == 0, 30)
        broker = MosquittoBroker(port=port, workdir=tmp_path / "m2")
        broker.start()
        assert wait_for(lambda: hub.connected() == n, 90), hub.connected()
        for _ in range(n):  # every client subscribed again in on_connect
            assert subscribed.acquire(timeout=30)
        got.clear()
        pub.publish("hub/all", b"two", qos=1)
        assert wait_for(lambda: len(got) == n, 30), len(got)
    finally:
        hub.stop()
        broker.stop()


def test_backoff_has_jitter_and_grows():
    hub = MqttHub("jitter", rng=random.Random(7))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="j")
    from edge_client.mqtt_hub import _Conn

    conn = _Conn(client, "127.0.0.1", 1, 30, 1.0, 60.0)
    delays = []
    for _ in range(8):
        before = time.monotonic()
        hub._schedule_retry(conn, "test")
        delays.append(conn.next_try - before)
    assert all(0.5 <= d <= 60.0 for d in delays)
    assert len({round(d, 3) for d in delays}) == len(delays)  # jittered, not lock-step
    assert max(delays[4:]) > max(delays[:2])  # the ceiling grows


def test_unreachable_broker_keeps_retrying_without_blocking_others(tmp_path):
    with MosquittoBroker(workdir=tmp_path / "m") as broker, MqttHub("mixed").start() as hub:
        dead = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dead")
        alive = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alive")
        hub.add(dead, "127.0.0.1", free_port(), backoff_min_s=0.1, backoff_max_s=0.2)
        hub.add(alive, "127.0.0.1", broker.port)
        assert wait_for(lambda: alive.is_connected(), 10)
        assert not dead.is_connected()


def test_a_publish_goes_out_in_the_same_turn_and_a_backlog_waits_for_epoll(tmp_path):
    """Small publishes are written straight away (no EVENT_WRITE registration and extra loop
    turn per packet); 16 MB published at once outgrows the socket buffer, so the hub registers
    EVENT_WRITE for the rest, and everything still arrives, in order."""
    with MosquittoBroker(workdir=tmp_path / "m") as broker, MqttHub("flush").start() as hub:
        subscribed = threading.Semaphore(0)
        got: list = []
        sub = make_client(0, subscribed, got)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flush-pub", protocol=mqtt.MQTTv5)
        registered: list[bool] = []
        set_interest = hub._set_write_interest
        hub._set_write_interest = lambda conn, want: (registered.append(want) if conn.client is pub else None,
                                                      set_interest(conn, want))
        hub.add(sub, "127.0.0.1", broker.port)
        hub.add(pub, "127.0.0.1", broker.port)
        assert subscribed.acquire(timeout=10) and wait_for(pub.is_connected, 10)
        for i in range(20):
            pub.publish("hub/all", b"small %d" % i, qos=1)
        assert wait_for(lambda: len(got) == 20, 10), len(got)
        assert True not in registered  # twenty packets, no EVENT_WRITE round trip
        big = [bytes([i]) * (1 << 20) for i in range(16)]
        broker.proc.send_signal(signal.SIGSTOP)  # the broker stops reading: the socket fills for sure
        try:
            for payload in big:
                pub.publish("hub/all", payload, qos=1)
            assert wait_for(lambda: True in registered, 10), registered
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: len(got) == 36, 30), len(got)
        assert got[20:] == big


def test_starting_twice_runs_one_loop():
    hub = MqttHub("twice")
    with hub.start() as same:  # __enter__ starts it again
        assert same is hub
        assert sum(t.name == "twice" for t in threading.enumerate()) == 1
