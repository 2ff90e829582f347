"""How to reach the broker: one settings dataclass both sides share.

`protocol/` does not import paho (it is the numpy-only wire contract); `configure_client`
takes the paho client the caller made, so the device and the aggregator set TLS,
credentials, last will and reconnect backoff the same way.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MqttSettings:
    """Broker address, TLS and credentials; `mqtt_version` 5 where the broker speaks it."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None          # CA file: enables TLS with server verification
    tls_cert: str | None = None        # client certificate (optional mutual TLS)
    tls_key: str | None = None
    tls_insecure: bool = False         # skip hostname check (test brokers only)
    keepalive_s: int = 30
    mqtt_version: int = 5              # 5, or 3 for MQTT 3.1.1 (amqtt speaks only 3.1.1)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("mqtt host is empty")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"mqtt port {self.port} is not in 1..65535")
        if self.mqtt_version not in (3, 5):
            raise ValueError(f"mqtt_version {self.mqtt_version}: use 5 or 3 (3.1.1)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.keepalive_s < 5:
            raise ValueError("keepalive_s below 5 s floods the broker with pings")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")

    def paho_protocol(self) -> int:
        from_mqtt = {3: 4, 5: 5}  # paho's MQTTv311 = 4, MQTTv5 = 5
        return from_mqtt[self.mqtt_version]


def configure_client(client: Any, settings: MqttSettings, *, will_topic: str | None = None,
                     will_payload: bytes | None = None) -> None:
    """Apply TLS, credentials, last will and reconnect backoff to a paho client."""
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.tls_insecure_set(settings.tls_insecure)
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    client.reconnect_delay_set(min_delay=max(1, int(settings.reconnect_min_s)),
                               max_delay=max(1, int(settings.reconnect_max_s)))
