"""The embedded MQTT broker: amqtt in-process on 127.0.0.1 and a free port.

It lets `fedboard simulate` run on a machine where nothing else is installed. It runs its own
asyncio loop in a daemon thread so the rest of the simulator can stay synchronous. amqtt is
2-7x slower than Mosquitto and speaks MQTT 3.1.1 only: real fleets use `--broker HOST:PORT`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker(text: str) -> BrokerAddress:
    """`HOST:PORT` (or `HOST`, port 1883) from the command line, with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "1883"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return BrokerAddress(host, int(port))


def _patched_broker_class() -> type:
    """amqtt 0.12 with one bug fixed.

    On every new connection amqtt sends the new client the retained messages of EVERY topic
    filter ANY client subscribed to (and iterates that dict across awaits, which fails with
    "dictionary changed size during iteration" when clients connect concurrently). A device
    would receive the 3 MB model and bundle it never asked for. Here retained messages go only
    to a session that really holds the subscription, as MQTT specifies.
    """
    from amqtt.broker import Broker

    class FixedBroker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if not any(s is session or s.client_id == session.client_id for s, _ in holders):
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)

    return FixedBroker


class EmbeddedBroker:
    """amqtt broker on 127.0.0.1; use as a context manager; `address` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._bind = f"{host}:{port}"
        self._host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self.address: BrokerAddress | None = None

    def start(self, timeout_s: float = 15.0) -> BrokerAddress:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_broker())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        # amqtt logs every connection at INFO: keep the simulator's output readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"embedded amqtt broker did not start within {timeout_s} s")
        if failure:
            raise RuntimeError(f"embedded amqtt broker failed to start: {failure[0]}") from failure[0]
        assert self.address is not None
        log.info("embedded amqtt broker listening on %s", self.address)
        return self.address

    async def _start_broker(self) -> None:
        Broker = _patched_broker_class()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": self._bind, "max_connections": -1}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await self._broker.start()
        server = self._broker._servers["default"].instance  # amqtt exposes no public getter
        port = server.sockets[0].getsockname()[1]
        self.address = BrokerAddress(self._host, port)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        loop, broker = self._loop, self._broker
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout_s)
        except Exception as exc:  # shutting down anyway
            log.warning("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._loop = self._broker = None

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
