import pytest

from protocol.transport import MqttSettings, configure_client


def test_defaults_are_valid():
    s = MqttSettings()
    assert s.paho_protocol() == 5
    assert MqttSettings(mqtt_version=3).paho_protocol() == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 0}, "port"), ({"mqtt_version": 4}, "mqtt_version"), ({"tls_cert": "c"}, "go together"),
    ({"keepalive_s": 1}, "keepalive"), ({"host": ""}, "host"),
])
def test_bad_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MqttSettings(**kwargs)


def test_configure_client_sets_credentials_will_and_backoff():
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x")
    configure_client(client, MqttSettings(username="u", password="p", reconnect_max_s=30), will_topic="t/w",
                     will_payload=b"bye")
    assert client.username == "u" and client.password == "p"
    assert client._will_topic == b"t/w" and client._will_payload == b"bye" and client._will_retain
    assert client._reconnect_max_delay == 30
