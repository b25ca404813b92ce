"""henge's own MQTT 3.1.1 client, for its one connection to an external broker.

A fleet push in external mode is 10,000 retained QoS 1 publishes on one connection, and a service
restart reads 10,000 retained announcements back: per-message cost is the whole story. This is an
``asyncio.Protocol`` over henge's codec (the one the embedded server uses): publishes are encoded
straight into the transport with up to ``max_inflight`` unacknowledged (the rest wait in order),
PUBACKs resolve futures from a dict, incoming messages are handed to a callback from
``data_received``, and the keep-alive is one timer. It does what the service needs and no more:
QoS 0 and 1, subscribe, clean or persistent session, TLS, and a clear error for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from . import codec


class MqttClientError(ConnectionError):
    """The broker refused us (``code``: the CONNACK return code), or the connection broke."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MqttClient(asyncio.Protocol):
    def __init__(self, on_message: Callable[[str, bytes], None], *, keepalive: int, max_inflight: int = 2000,
                 max_packet: int = 64 * 1024 * 1024) -> None:
        loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.framer = codec.Framer(max_packet)
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[codec.Connack] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._waiting: deque[tuple[bytes, int, asyncio.Future[None]]] = deque()  # over the in-flight window
        self._ids = 0
        self._out: list[bytes] = []  # packets written this loop turn, sent together at its end
        self._pinger: asyncio.TimerHandle | None = None
        self._heard = loop.time()

    # ---- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, *, client_id: str, username: str | None, password: str | None,
                      on_message: Callable[[str, bytes], None], keepalive: int = 30, clean_session: bool = True,
                      tls: ssl.SSLContext | None = None, timeout: float = 10.0,
                      max_inflight: int = 2000, unix: str | None = None) -> MqttClient:
        """Connected (CONNACK 0) over TCP to ``host:port``, or over the Unix socket ``unix``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            def factory() -> MqttClient:
                return cls(on_message, keepalive=keepalive, max_inflight=max_inflight)

            if unix is not None:
                _, protocol = await loop.create_unix_connection(factory, unix)
            else:
                _, protocol = await loop.create_connection(factory, host, port, ssl=tls,
                                                           server_hostname=host if tls is not None else None)
            client: MqttClient = protocol
            client._send(codec.encode(codec.Connect(
                client_id=client_id, keepalive=keepalive, clean_session=clean_session, username=username,
                password=password.encode() if password is not None else None)))
            ack = await asyncio.shield(client.connack)
        if ack.code != 0:
            client.close()
            raise MqttClientError(f"the broker refused the connection: {codec.CONNACK_REASONS.get(ack.code, ack.code)}",
                                  ack.code)
        client._schedule_ping()
        return client

    # ---- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        try:
            frames = self.framer.feed(data)
            for first, body in frames:
                self._handle(codec.decode(first, body, 4))
        except codec.CodecError as exc:
            self._fail(MqttClientError(f"the broker sent a malformed packet: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(MqttClientError(f"the connection to the broker was lost: {exc or 'closed'}"))

    def _handle(self, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Publish):
            if packet.qos == 1 and packet.packet_id is not None:
                self._send(codec.puback(packet.packet_id))
            elif packet.qos == 2:  # never asked for (we subscribe at QoS 1 at most): refuse, do not guess
                self._fail(MqttClientError("the broker sent QoS 2, which henge never subscribes with"))
                return
            self.on_message(packet.topic, packet.payload)
        elif isinstance(packet, codec.Puback):
            future = self._acks.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(None)
            self._release()
        elif isinstance(packet, codec.Suback):
            waiter = self._subacks.pop(packet.packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(packet.codes)
        elif isinstance(packet, codec.Connack) and not self.connack.done():
            self.connack.set_result(packet)
        # PINGRESP: _heard is enough; anything else a broker does not send to a 3.1.1 client

    # ---- operations ------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.closed.done()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                urgent: bool = False) -> asyncio.Future[None]:
        """Done when the broker acknowledged it (at once for QoS 0); failed if the connection goes.
        ``urgent``: when the in-flight window is full, it goes out before those waiting (an answer to
        a person must not queue behind a republish of 10,000 retained messages)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.is_open:
            future.set_exception(MqttClientError("not connected to the broker"))
            return future
        if qos == 0:
            self._send(codec.publish_bytes(topic, payload, 0, retain))
            future.set_result(None)
            return future
        packet_id = self._next_id()
        data = codec.publish_bytes(topic, payload, 1, retain, packet_id)
        self._acks[packet_id] = future
        if len(self._acks) - len(self._waiting) > self.max_inflight:
            if urgent:
                self._waiting.appendleft((data, packet_id, future))
            else:
                self._waiting.append((data, packet_id, future))
        else:
            self._send(data)
        return future

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0) -> tuple[int, ...]:
        packet_id = self._next_id()
        waiter: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = waiter
        self._send(codec.encode(codec.Subscribe(packet_id, tuple(filters))))
        async with asyncio.timeout(timeout):
            codes = await waiter
        if any(code == 0x80 for code in codes):
            refused = [f for (f, _), code in zip(filters, codes, strict=False) if code == 0x80]
            raise MqttClientError(f"the broker refused the subscriptions {refused}")
        return codes

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                self._send(codec.disconnect())
            self._flush()
            self.transport.close()
        self._fail(MqttClientError("closed"))

    # ---- internals -------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Packets written in one loop turn go out in one ``write``: a publish each was a ``send``
        syscall each (10,000 presence records after a snapshot: 0.7 s of syscalls)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def _next_id(self) -> int:
        for _ in range(65535):
            self._ids = self._ids % 65535 + 1
            if self._ids not in self._acks and self._ids not in self._subacks:
                return self._ids
        raise MqttClientError("65,535 messages unacknowledged: the broker stopped answering")

    def _release(self) -> None:
        while self._waiting and len(self._acks) - len(self._waiting) <= self.max_inflight:
            data, packet_id, future = self._waiting.popleft()
            if future.done():  # cancelled while it waited: never sent, its id is free again
                self._acks.pop(packet_id, None)
            else:
                self._send(data)

    def _schedule_ping(self) -> None:
        if self.keepalive <= 0:
            return
        self._pinger = asyncio.get_running_loop().call_later(self.keepalive / 2, self._ping)

    def _ping(self) -> None:
        if not self.is_open:
            return
        if asyncio.get_running_loop().time() - self._heard > self.keepalive * 1.5:
            self._fail(MqttClientError("the broker stopped answering (keep-alive)"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._send(b"\xc0\x00")
        self._schedule_ping()

    def _fail(self, exc: MqttClientError) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        pending: list[asyncio.Future[Any]] = [*self._acks.values(), *self._subacks.values()]
        self._acks.clear()
        self._subacks.clear()
        self._waiting.clear()
        for future in pending:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a publish nobody awaits must not warn at exit
        if not self.connack.done():
            self.connack.set_exception(exc)
            self.connack.exception()
        if not self.closed.done():
            self.closed.set_result(None)
