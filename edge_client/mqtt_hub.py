"""Many paho MQTT connections driven by ONE thread and one epoll selector.

paho's `loop_start()` costs a thread and three file descriptors per connection and uses
`select()`, which stops working past descriptor 1023 (about 250 connections in a process that
also hosts the broker). The hub uses paho's external-loop interface instead (socket callbacks,
`loop_read`/`loop_write`/`loop_misc`): one descriptor per connection, no thread per device, so
a simulator holds thousands of devices and a real device holds one connection the same way.

It also owns reconnection: after a lost connection (or a failed first connect) it retries with
exponential backoff and full jitter, so a fleet that lost its broker does not come back as one
synchronized stampede. A connection counts as good only once it has stayed up for
`STABLE_AFTER_S`: one the broker drops at once (credentials refused after the TCP handshake,
or another client taking the session because it uses the same client id) backs off like a
connection that was refused, instead of reconnecting every second for ever.
"""
from __future__ import annotations

import logging
import queue
import random
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

# A connection that lived this long was a good one: the next loss starts the backoff afresh.
STABLE_AFTER_S = 30.0


@dataclass
class _Conn:
    client: mqtt.Client
    host: str
    port: int
    keepalive: int
    backoff_min: float
    backoff_max: float
    sock: object | None = None
    attempts: int = 0
    next_try: float = 0.0
    opened_at: float | None = None   # monotonic time the socket of the current connection opened
    started: bool = False
    want_write: bool = False     # EVENT_WRITE registered: a write found the socket full
    flush_due: bool = False      # paho queued a packet: write it at the end of this loop turn
    properties: object | None = None
    extra: dict = field(default_factory=dict)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards `wanted` (bounded by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard if hard != resource.RLIM_INFINITY else wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class MqttHub:
    """Drives paho clients on one thread. `add()` connects (and keeps reconnecting) a client."""

    def __init__(self, name: str = "mqtt-hub", *, misc_interval_s: float = 2.0, rng: random.Random | None = None) -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._conns: dict[int, _Conn] = {}          # id(client) -> connection
        self._by_sock: dict[int, _Conn] = {}        # fileno -> connection
        self._flush: list[_Conn] = []               # connections with packets queued this turn
        self._misc_interval = misc_interval_s
        self._rng = rng or random.Random()
        self._running = False
        self._thread: threading.Thread | None = None

    # ---- public API (any thread) --------------------------------------------------------------
    def start(self) -> "MqttHub":
        """Start the hub thread; a second call (e.g. `with MqttHub().start() as hub`) is a no-op:
        two loops on one selector would read one socket in turns and tear its packets apart."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def add(self, client: mqtt.Client, host: str, port: int, *, keepalive: int = 60, backoff_min_s: float = 1.0,
            backoff_max_s: float = 60.0, delay_s: float = 0.0) -> None:
        """Connect `client` from the hub thread (after `delay_s`) and keep it connected."""
        conn = _Conn(client, host, port, keepalive, backoff_min_s, backoff_max_s)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._call(self._op_add, conn, delay_s)

    def remove(self, client: mqtt.Client, *, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (DISCONNECT sent, no last will) and forget the client."""
        done = threading.Event()
        self._call(self._op_remove, client, done)
        if threading.current_thread() is not self._thread:
            done.wait(timeout_s)

    def connected(self) -> int:
        return sum(1 for c in self._conns.values() if c.client.is_connected())

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._running:
            return
        for conn in list(self._conns.values()):
            self.remove(conn.client, timeout_s=timeout_s)
        self._running = False
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "MqttHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- paho socket callbacks (any thread) ------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._call(self._op_register, client, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._call(self._op_unregister, client, sock)

    def _on_register_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._call(self._op_want_write, client, True)

    def _on_unregister_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._call(self._op_want_write, client, False)

    # ---- the hub thread ----------------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        if threading.current_thread() is self._thread:
            fn(*args)
        else:
            self._ops.put((fn, args))
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def _run(self) -> None:
        next_misc = time.monotonic() + self._misc_interval
        while self._running:
            now = time.monotonic()
            timeout = min(next_misc, self._next_timer(now)) - now
            try:
                events = self._sel.select(max(0.0, min(timeout, 1.0)))
            except (OSError, ValueError):
                if not self._running:
                    break
                raise
            self._drain_ops()
            for key, mask in events:
                if key.data is None:
                    continue
                conn: _Conn = key.data
                try:
                    if mask & selectors.EVENT_READ:
                        conn.client.loop_read()
                    if mask & selectors.EVENT_WRITE and conn.sock is not None:
                        conn.client.loop_write()
                except Exception:  # a callback bug must not stop every other device
                    log.exception("%s: error in the network loop of %s", self.name, conn.client._client_id)
            self._drain_ops()
            now = time.monotonic()
            if now >= next_misc:
                for conn in list(self._conns.values()):
                    if conn.sock is not None:
                        conn.client.loop_misc()
                next_misc = now + self._misc_interval
            self._connect_due(now)
            self._flush_writes()

    def _flush_writes(self) -> None:
        """Write what paho queued during this loop turn straight away.

        The socket almost always has room, so asking epoll for EVENT_WRITE first (two
        epoll_ctl calls and one more loop turn per packet) was pure overhead: a fleet's check-in
        is a thousand one-packet publishes. Only a write that leaves data behind waits for
        EVENT_WRITE.
        """
        while self._flush:
            conns, self._flush = self._flush, []
            for conn in conns:
                conn.flush_due = False
                if conn.sock is None:
                    continue
                try:
                    conn.client.loop_write()
                    if conn.sock is not None and conn.client.want_write():
                        self._set_write_interest(conn, True)
                except Exception:  # a callback bug must not stop every other device
                    log.exception("%s: error writing for %s", self.name, conn.client._client_id)

    def _drain_ops(self) -> None:
        # Wake bytes first, then the queue: an op queued after this point writes a new wake
        # byte, so it is never stranded; draining the socket only after an empty queue left
        # it readable for ever and spun the loop at 100 % CPU.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                fn, args = self._ops.get_nowait()
            except queue.Empty:
                return
            try:
                fn(*args)
            except Exception:
                log.exception("%s: hub operation %s failed", self.name, getattr(fn, "__name__", fn))

    def _next_timer(self, now: float) -> float:
        pending = [c.next_try for c in self._conns.values() if c.sock is None and c.next_try]
        return min(pending) if pending else now + 1.0

    def _connect_due(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.sock is None and conn.next_try and now >= conn.next_try:
                self._try_connect(conn)

    def _try_connect(self, conn: _Conn) -> None:
        conn.next_try = 0.0
        try:
            if conn.started:
                conn.client.reconnect()
            else:
                conn.client.connect(conn.host, conn.port, keepalive=conn.keepalive)
                conn.started = True
        except (OSError, mqtt.WebsocketConnectionError, ValueError) as exc:
            conn.started = conn.started or getattr(conn.client, "_host", "") != ""
            self._schedule_retry(conn, f"{type(exc).__name__}: {exc}")

    def _schedule_retry(self, conn: _Conn, why: str) -> None:
        conn.attempts += 1
        ceiling = min(conn.backoff_max, conn.backoff_min * 2 ** min(conn.attempts - 1, 16))
        delay = self._rng.uniform(conn.backoff_min / 2, ceiling)  # full jitter, never zero
        conn.next_try = time.monotonic() + delay
        log.info("%s: %s will reconnect in %.1f s (%s)", self.name, conn.client._client_id.decode(), delay, why)

    # ---- operations run on the hub thread ------------------------------------------------------------
    def _op_add(self, conn: _Conn, delay_s: float) -> None:
        self._conns[id(conn.client)] = conn
        conn.next_try = time.monotonic() + delay_s if delay_s > 0 else 0.0
        if delay_s <= 0:
            self._try_connect(conn)

    def _op_remove(self, client: mqtt.Client, done: threading.Event) -> None:
        conn = self._conns.pop(id(client), None)
        try:
            if conn is not None and conn.sock is not None:
                client.disconnect()
                for _ in range(50):  # flush the DISCONNECT (and anything queued before it)
                    if client.loop_write() != mqtt.MQTT_ERR_SUCCESS or not client.want_write():
                        break
        except Exception as exc:  # closing anyway
            log.debug("%s: disconnect of %s: %s", self.name, client._client_id, exc)
        finally:
            if conn is not None and conn.sock is not None:
                self._forget_sock(conn)
                try:
                    client._sock_close()
                except Exception:
                    pass
            done.set()

    def _op_register(self, client: mqtt.Client, sock: socket.socket) -> None:
        conn = self._conns.get(id(client))
        if conn is None:
            return
        if conn.sock is not None:
            self._forget_sock(conn)
        conn.sock = sock
        conn.opened_at = time.monotonic()
        self._by_sock[sock.fileno()] = conn
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        conn.want_write = bool(events & selectors.EVENT_WRITE)
        self._sel.register(sock, events, conn)

    def _op_unregister(self, client: mqtt.Client, sock: socket.socket) -> None:
        conn = self._conns.get(id(client))
        if conn is None or conn.sock is not sock:
            return
        self._forget_sock(conn)
        lived = time.monotonic() - (conn.opened_at or 0.0)
        if lived >= STABLE_AFTER_S:  # a good connection: back off afresh
            conn.attempts = 0
        self._schedule_retry(conn, "connection lost" if lived >= STABLE_AFTER_S else
                             f"connection lost {lived:.1f} s after it opened")

    def _forget_sock(self, conn: _Conn) -> None:
        sock = conn.sock
        conn.sock = None
        conn.want_write = False
        if sock is None:
            return
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        self._by_sock = {fd: c for fd, c in self._by_sock.items() if c is not conn}

    def _op_want_write(self, client: mqtt.Client, want: bool) -> None:
        conn = self._conns.get(id(client))
        if conn is None or conn.sock is None:
            return
        if want and not conn.want_write:
            if not conn.flush_due:
                conn.flush_due = True
                self._flush.append(conn)
            return
        self._set_write_interest(conn, want)

    def _set_write_interest(self, conn: _Conn, want: bool) -> None:
        if conn.want_write == want or conn.sock is None:
            return
        conn.want_write = want
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        try:
            self._sel.modify(conn.sock, events, conn)
        except (KeyError, ValueError, OSError):
            pass
