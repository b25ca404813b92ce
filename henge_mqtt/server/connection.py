"""One MQTT connection: an ``asyncio.Protocol`` that parses in ``data_received``.

Like uvicorn's protocol classes: no task, no reader and no coroutine frame per connection, state
in ``__slots__``, deadlines (CONNECT, keep-alive, PUBREL, PUBACK) checked by the server's one
sweep. The connection knows the wire; every decision about who may do what is the server's
(:mod:`henge_mqtt.server.broker`), which it calls synchronously.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..ports import Principal
from ..sessions import TokenBucket
from . import codec

if TYPE_CHECKING:
    from .broker import EmbeddedBroker

HANDSHAKE, PENDING, OPEN, CLOSED = 0, 1, 2, 3
MAX_PENDING_FRAMES = 32  # packets a client may pipeline behind its CONNECT before the CONNACK


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Connection(asyncio.Protocol):
    __slots__ = (
        "admin_only",
        "broker",
        "bucket",
        "close_reason",
        "deadline",
        "epoch",
        "framer",
        "in_qos2",
        "keepalive",
        "key",
        "last_heard",
        "max_inflight",
        "max_write",
        "next_id",
        "out",
        "paused",
        "pending",
        "principal",
        "remote",
        "state",
        "subs",
        "tls",
        "transport",
        "wild",
        "will",
    )

    def __init__(self, broker: EmbeddedBroker, *, admin_only: bool = False, tls: bool = False) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.framer = codec.Framer(broker.limits.max_packet)
        self.state = HANDSHAKE
        self.principal: Principal | None = None
        self.key = ""
        self.epoch = 0
        self.remote = "unknown"
        self.keepalive = 0.0
        self.last_heard = time.time()
        self.deadline = 0.0  # CONNECT deadline (monotonic) until OPEN
        self.subs: dict[str, int] | None = None
        self.wild = 0
        self.bucket: TokenBucket | None = None
        self.out: dict[int, tuple[float, asyncio.Future[None] | None]] | None = None
        self.next_id = 0
        self.in_qos2: dict[int, float] | None = None
        self.close_reason: str | None = None
        self.will: codec.Will | None = None
        self.admin_only = admin_only
        self.pending: list[tuple[int, bytes]] | None = None
        self.tls = tls
        self.max_inflight = broker.limits.max_inflight
        self.max_write = broker.limits.max_write_buffer
        self.paused = False  # the socket's send buffer is past asyncio's high-water mark

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.remote = f"{peer[0]}:{peer[1]}"
        elif self.admin_only:
            self.remote = "unix"
        self.broker.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_heard = time.time()
        try:
            frames = self.framer.feed(data)
        except codec.PacketTooLarge as exc:
            self.broker.warn("broker.packet_too_large", "key=%s remote=%s size=%d", self.key, self.remote, exc.size)
            self.close("packet_too_large", abort=True)
            return
        except codec.CodecError as exc:
            self.broker.info("broker.malformed", "key=%s remote=%s error=%s", self.key, self.remote, exc)
            self.close("protocol_error", abort=True)
            return
        for first, body in frames:
            if self.state == CLOSED:
                return
            if self.state == OPEN:
                self.dispatch(first, body)
            elif self.state == HANDSHAKE:
                self.handshake(first, body)
            else:  # PENDING: the client pipelined packets behind its CONNECT; keep them for the CONNACK
                if self.pending is None:
                    self.pending = []
                if len(self.pending) >= MAX_PENDING_FRAMES:
                    self.close("protocol_error", abort=True)
                    return
                self.pending.append((first, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSED:
            self.close("connection_lost")
        self.broker.on_lost(self)
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # ---- the first packet ----------------------------------------------------------------------

    def handshake(self, first: int, body: bytes) -> None:
        if first >> 4 != codec.CONNECT:
            self.broker.info("broker.bad_connect", "remote=%s error=first packet is not a CONNECT", self.remote)
            self.close("protocol_error", abort=True)  # [MQTT-3.1.0-1]
            return
        try:
            if first & 0x0F:
                raise codec.CodecError("CONNECT with flags")
            connect = codec.decode_connect(body)
        except codec.CodecError as exc:
            self.broker.info("broker.bad_connect", "remote=%s error=%s", self.remote, exc)
            self.close("protocol_error", abort=True)
            return
        self.broker.on_connect(self, connect)

    def accept(self) -> None:
        """The server accepted the CONNECT and its epoch is durable: CONNACK, then the queued packets."""
        self.state = OPEN
        self.send(codec.connack(codec.ACCEPTED))
        pending, self.pending = self.pending, None
        for first, body in pending or ():
            if self.state != OPEN:
                return
            self.dispatch(first, body)

    def refuse(self, code: int) -> None:
        self.send(codec.connack(code))
        self.close("refused")

    # ---- packets after CONNECT -----------------------------------------------------------------

    def dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        try:
            if kind == codec.PUBLISH:
                self.broker.on_publish(self, codec.decode_publish(first, body))
            elif kind == codec.PUBACK:
                ack = codec.decode(first, body)
                assert isinstance(ack, codec.Puback)
                packet_id = ack.packet_id
                out = self.out
                entry = out.pop(packet_id, None) if out else None
                if entry is not None and entry[1] is not None and not entry[1].done():
                    entry[1].set_result(None)
            elif kind == codec.PINGREQ:
                codec.decode(first, body)
                self.send(codec.PINGRESP_BYTES)
            elif kind == codec.SUBSCRIBE:
                packet = codec.decode(first, body)
                assert isinstance(packet, codec.Subscribe)
                self.broker.on_subscribe(self, packet)
            elif kind == codec.UNSUBSCRIBE:
                packet = codec.decode(first, body)
                assert isinstance(packet, codec.Unsubscribe)
                self.broker.on_unsubscribe(self, packet)
            elif kind == codec.PUBREL:
                rel = codec.decode(first, body)
                assert isinstance(rel, codec.Pubrel)
                packet_id = rel.packet_id
                if self.in_qos2:
                    self.in_qos2.pop(packet_id, None)
                self.send(codec.pubcomp(packet_id))  # also for an unknown id [MQTT-4.3.3-2]
            elif kind == codec.DISCONNECT:
                codec.decode(first, body)
                self.will = None  # [MQTT-3.14.4-3]
                self.close("client_disconnect")
            elif kind in (codec.PUBREC, codec.PUBCOMP):
                codec.decode(first, body)  # we never send QoS 2; tolerated and ignored
            else:
                raise codec.CodecError(f"packet type {kind} is not for a server here")  # CONNECT again [3.1.0-2]
        except codec.CodecError as exc:
            self.broker.info("broker.malformed", "key=%s remote=%s error=%s", self.key, self.remote, exc)
            self.close("protocol_error", abort=True)

    # ---- sending ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if self.paused and transport.get_write_buffer_size() > self.max_write:
            # A peer that does not read cannot make us hold more than max_write bytes for it.
            self.broker.warn("broker.slow_consumer", "key=%s: %d bytes unsent", self.key,
                             transport.get_write_buffer_size())
            self.close("slow_consumer", abort=True)

    def deliver(self, topic: str, data: bytes, qos: int, retain: bool, track: bool) -> asyncio.Future[None] | None:
        """Send one message; with QoS 1 and ``track``, a future done when the client acknowledges it."""
        if self.state != OPEN:
            return None
        if not qos:
            self.send(codec.publish_bytes(topic, data, 0, retain))
            return None
        out = self.out
        if out is None:
            out = self.out = {}
        if len(out) >= self.max_inflight:
            # A client that does not acknowledge cannot make the server hold unbounded messages.
            self.broker.warn("broker.slow_consumer", "key=%s: %d deliveries unacknowledged", self.key, len(out))
            self.close("slow_consumer", abort=True)
            return None
        packet_id = self.next_id
        while True:
            packet_id = packet_id % 65535 + 1
            if packet_id not in out:
                break
        self.next_id = packet_id
        future = None
        if track:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieved)  # a delivery nobody waits for fails silently
        out[packet_id] = (time.monotonic(), future)
        self.send(codec.publish_bytes(topic, data, 1, retain, packet_id))
        return future

    # ---- ending -------------------------------------------------------------------------------

    def close(self, reason: str, *, abort: bool = False) -> None:
        """End the connection now: the server forgets it at once; the socket follows (bounded)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.close_reason is None:
            self.close_reason = reason
        self.pending = None
        out, self.out = self.out, None
        for _, future in (out or {}).values():
            if future is not None and not future.done():
                future.set_exception(ConnectionError(f"connection closed: {self.close_reason}"))
        self.broker.finish(self)
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()
                self.broker.closing(self)

    def expire(self, mono: float, now: float, puback_timeout: float, pubrel_timeout: float) -> None:
        """The sweep's check of this connection's deadlines."""
        if self.state != OPEN:
            if mono >= self.deadline:
                self.broker.info("broker.connect_timeout", "remote=%s", self.remote)
                self.close("connect_timeout", abort=True)
            return
        if now - self.last_heard > self.keepalive * 1.5:  # the spec's 1.5 x keep-alive
            self.close("keepalive_timeout", abort=True)
            return
        out = self.out
        while out:
            packet_id, (sent, future) = next(iter(out.items()))
            if mono - sent < puback_timeout:
                break
            del out[packet_id]
            if future is not None and not future.done():
                future.set_exception(TimeoutError("no PUBACK"))
        in_qos2 = self.in_qos2
        if in_qos2:
            oldest = next(iter(in_qos2.values()))
            if mono - oldest > pubrel_timeout:
                self.broker.warn("broker.pubrel_timeout", "key=%s", self.key)
                self.close("quota_exceeded", abort=True)

    def peer_cert_cn(self) -> str | None:
        transport = self.transport
        if transport is None or not self.tls:
            return None
        cert: Any = transport.get_extra_info("peercert")
        if not cert:
            return None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    def __repr__(self) -> str:
        return f"Connection(key={self.key!r}, epoch={self.epoch}, state={self.state})"
