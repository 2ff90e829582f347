"""`fedboard broker-config` against a real Mosquitto: passwords, and an ACL that confines each device."""
import os
import time

import paho.mqtt.client as mqtt
import pytest

from aggregator.broker_config import (BrokerSetup, check_password, device_ids, password_line, render_acl,
                                      write_broker_config)

FLEET = "acl"


def test_password_lines_are_mosquitto_pbkdf2_sha512():
    line = password_line("device-0001", "s3cret", salt=b"0123456789ab")
    user, _, rest = line.strip().partition(":")
    assert user == "device-0001" and rest.startswith("$7$101$")
    assert check_password(line, "s3cret") and not check_password(line, "other")


def test_acl_confines_devices_to_their_own_topics():
    acl = render_acl("home")
    assert "user aggregator\ntopic readwrite fedboard/home/#" in acl
    for kind in ("checkin", "update", "status"):
        assert f"pattern write fedboard/home/{kind}/%u" in acl
    for topic in ("assign/%u", "ack/%u", "model/#", "round/#"):
        assert f"pattern read fedboard/home/{topic}" in acl
    assert "readwrite" not in acl.split("user aggregator")[1].split("\n", 2)[2]  # no device gets readwrite


def test_setup_checks_and_refuses_to_replace_passwords(tmp_path):
    assert device_ids(3) == ["device-0001", "device-0002", "device-0003"]
    with pytest.raises(ValueError, match="all three"):
        BrokerSetup(fleet="f", devices=["a"], tls_ca="ca.crt")
    with pytest.raises(ValueError, match="aggregator"):
        BrokerSetup(fleet="f", devices=["aggregator"])
    write_broker_config(tmp_path, BrokerSetup(fleet="f", devices=device_ids(2)))
    with pytest.raises(FileExistsError, match="--force"):
        write_broker_config(tmp_path, BrokerSetup(fleet="f", devices=device_ids(2)))
    assert (tmp_path / "credentials" / "device-0001.password").stat().st_mode & 0o777 == 0o600
    conf = (tmp_path / "mosquitto.conf").read_text()
    assert "listener 1883 0.0.0.0" in conf and "WARNING: no TLS" in conf and "allow_anonymous false" in conf


def test_cli_writes_tls_config(tmp_path):
    from aggregator.commands import main

    assert main(["broker-config", "--out", str(tmp_path), "--devices", "3", "--fleet", "home", "--tls-ca", "ca.crt",
                 "--tls-cert", "server.crt", "--tls-key", "server.key"]) == 0
    conf = (tmp_path / "mosquitto.conf").read_text()
    assert "listener 8883 0.0.0.0" in conf and f"cafile {os.path.abspath('ca.crt')}" in conf
    assert len((tmp_path / "passwd").read_text().splitlines()) == 4


# -- against a real Mosquitto started with the generated files ------------------------------------------------
class Client:
    def __init__(self, port, user, password, client_id=None):
        self.messages, self.puback, self.suback, self.connected = [], {}, [], []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connected.append(rc)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_publish = lambda c, u, mid, rc, p=None: self.puback.__setitem__(mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.suback.append(list(rcs))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait(lambda: self.connected)

    def publish(self, topic, payload=b"x", retain=False):
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        wait(lambda: info.mid in self.puback)
        return self.puback[info.mid]

    def subscribe(self, topic):
        n = len(self.suback)
        self.c.subscribe(topic, 1)
        wait(lambda: len(self.suback) > n)
        return self.suback[-1][0]

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def generated_broker(tmp_path_factory):
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto, free_port

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    out = tmp_path_factory.mktemp("broker")
    port = free_port()
    setup = BrokerSetup(fleet=FLEET, devices=device_ids(2), port=port, bind="127.0.0.1",
                        run_as_user="root" if os.geteuid() == 0 else None)
    files = write_broker_config(out, setup)
    text = files.conf.read_text()

    class Generated(MosquittoBroker):
        def config_text(self):  # exactly the generated file
            return text

    with Generated(port=port) as broker:
        broker.password = {u: p.read_text().strip() for u, p in files.credentials.items()}
        yield broker


@pytest.mark.mosquitto
def test_generated_acl_denies_a_device_that_publishes_as_another(generated_broker):
    pw = generated_broker.password
    port = generated_broker.port
    root = f"fedboard/{FLEET}"
    agg = Client(port, "aggregator", pw["aggregator"], "aggregator-acl")
    dev1 = Client(port, "device-0001", pw["device-0001"])
    try:
        assert agg.subscribe(f"{root}/update/+") < 128
        assert agg.subscribe(f"$share/agg/{root}/checkin/+") < 128  # scale-out workers' shared subscription
        assert dev1.publish(f"{root}/update/device-0001", b"mine") == 0
        assert dev1.publish(f"{root}/checkin/device-0001", b"here") == 0
        # as device-0002: refused by the broker (MQTT 5 PUBACK 135, not authorized) ...
        assert dev1.publish(f"{root}/update/device-0002", b"forged") == 135
        assert dev1.publish(f"{root}/model/current", b"forged model", retain=True) == 135
        # ... and another device's acks never reach it (Mosquitto 2 grants the subscription but filters
        # delivery by the read ACL); its own acks and the fleet's model do
        for topic in ("ack/device-0002", "ack/device-0001", "model/current"):
            dev1.subscribe(f"{root}/{topic}")
        assert agg.publish(f"{root}/ack/device-0002", b"not yours") == 0
        assert agg.publish(f"{root}/ack/device-0001", b"ack") == 0
        wait(lambda: (f"{root}/ack/device-0001", b"ack") in dev1.messages)
        assert all(payload != b"not yours" for _, payload in dev1.messages)
        time.sleep(0.3)
        assert (f"{root}/update/device-0001", b"mine") in agg.messages
        assert (f"{root}/checkin/device-0001", b"here") in agg.messages
        assert all(payload != b"forged" for _, payload in agg.messages)  # the aggregator never received it
    finally:
        agg.close()
        dev1.close()


@pytest.mark.mosquitto
def test_generated_passwords_are_required(generated_broker):
    port = generated_broker.port
    for user, password in (("device-0001", "wrong"), ("nobody", "x")):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, password)
        codes = []
        c.on_connect = lambda cl, u, f, rc, p=None: codes.append(rc)
        c.connect("127.0.0.1", port)
        c.loop_start()
        wait(lambda: codes)
        c.loop_stop()
        assert codes[0].is_failure


def test_as_root_the_printed_start_command_works_and_an_unreachable_directory_is_named(tmp_path):
    """Started as root, Mosquitto drops to user `mosquitto` before reading passwd/acl ("Unable to open
    pwfile"): broker-config hands those files to that user, and names a parent it cannot enter."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from device_sim.mosquitto import find_mosquitto, free_port

    if os.geteuid() != 0:
        pytest.skip("what Mosquitto does when started as root needs root (CI runs as root)")
    binary = find_mosquitto()
    assert binary is not None, "mosquitto is not installed: run bash .ci/run"
    base = Path(tempfile.mkdtemp(prefix="fedboard-broker-"))
    try:
        base.chmod(0o755)  # like /etc/mosquitto: the broker's user may enter
        port = free_port()
        files = write_broker_config(base / "broker", BrokerSetup(fleet=FLEET, devices=device_ids(1), port=port,
                                                                 bind="127.0.0.1"))
        assert files.notes == []
        proc = subprocess.Popen([binary, "-c", str(files.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait(lambda: proc.poll() is not None or _listening(port), timeout=20)
            assert proc.poll() is None, proc.communicate()[0].decode()
            device = "device-0001"
            client = Client(port, device, files.credentials[device].read_text().strip())  # passwd was readable
            assert not client.publish(f"fedboard/{FLEET}/status/{device}").is_failure  # authenticated, allowed
            client.close()
        finally:
            proc.terminate()
            out = proc.communicate(timeout=10)[0].decode()
        assert "Unable to open pwfile" not in out
        hidden = tmp_path / "private"
        hidden.mkdir(mode=0o700)
        notes = write_broker_config(hidden / "broker", BrokerSetup(fleet=FLEET, devices=device_ids(1))).notes
        assert len(notes) == 1 and str(hidden) in notes[0] and "/etc/mosquitto" in notes[0]
    finally:
        shutil.rmtree(base)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
