"""One MQTT connection (3.1.1 or 5.0): an ``asyncio.Protocol`` that parses in ``data_received``.

Like uvicorn's protocol classes: no task, no reader and no coroutine frame per connection, state
in ``__slots__``, deadlines (CONNECT, keep-alive, PUBREL, PUBACK) checked by the server's one
sweep. The connection knows the wire; every decision about who may do what is the server's
(:mod:`henge_mqtt.server.broker`), which it calls synchronously.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Protocol

from .. import codec
from ..ports import PeerCert, Principal, name_of
from .limits import Limits
from .meta import Sent


class Owner(Protocol):
    """What a connection asks of the server that accepted it (the embedded broker): the narrow
    interface it is handed, so this module never imports the broker's."""

    limits: Limits

    def info(self, event: str, fmt: str, *args: object) -> None: ...
    def warn(self, event: str, fmt: str, *args: object) -> None: ...
    def charge(self, conn: Connection) -> bool: ...
    def closing(self, conn: Connection) -> None: ...
    def finish(self, conn: Connection) -> None: ...
    def on_made(self, conn: Connection) -> None: ...
    def on_lost(self, conn: Connection) -> None: ...
    def on_connect(self, conn: Connection, connect: codec.Connect) -> None: ...
    def on_publish(self, conn: Connection, packet: codec.Publish) -> None: ...
    def on_subscribe(self, conn: Connection, packet: codec.Subscribe) -> None: ...
    def on_unsubscribe(self, conn: Connection, packet: codec.Unsubscribe) -> None: ...
    def too_large_for_client(self, conn: Connection, topic: str, size: int) -> None: ...


class Attached(Protocol):
    """What a connection asks of the persistent session it is attached to (``session.py``)."""

    expiry: int

    def resume(self, conn: Connection) -> None: ...

HANDSHAKE, PENDING, OPEN, CLOSED = 0, 1, 2, 3
MAX_PENDING_FRAMES = 32  # packets a client may pipeline behind its CONNECT before the CONNACK
MAX_CONNECT_BYTES = 80 * 1024  # before authentication: a client id, a will (<= 64 KiB), credentials

# Why a connection was closed (its presence reason) -> the 5.0 DISCONNECT reason code it is told.
DISCONNECT_REASONS = {
    "takeover": (codec.SESSION_TAKEN_OVER, "another connection took over this client identifier"),
    "keepalive_timeout": (codec.KEEP_ALIVE_TIMEOUT, "nothing received for 1.5 x keep-alive"),
    "kicked": (codec.ADMINISTRATIVE_ACTION, "disconnected by an operator"),
    "publish_rate_exceeded": (codec.MESSAGE_RATE_TOO_HIGH, "too many packets per second"),
    "packet_too_large": (codec.PACKET_TOO_LARGE, "packet larger than the maximum packet size"),
    "quota_exceeded": (codec.QUOTA_EXCEEDED, "a limit of this server was exceeded"),
    "slow_consumer": (codec.QUOTA_EXCEEDED, "too many messages left unacknowledged or unread"),
    "server_shutdown": (codec.SERVER_SHUTTING_DOWN, "the server is shutting down"),
    "protocol_error": (codec.PROTOCOL_ERROR, "protocol error"),
    "server_error": (codec.UNSPECIFIED_ERROR, "server error"),
}
# Closes for what a client sends: it may still be sending when it is told why (see ``close``).
LINGER_ON = frozenset({"quota_exceeded", "publish_rate_exceeded", "packet_too_large", "protocol_error",
                       "slow_consumer"})
# A reason code given to ``close`` names the problem more exactly than its close reason: its text.
CODE_TEXT = {
    codec.RECEIVE_MAXIMUM_EXCEEDED: "more QoS 2 publishes unacknowledged than the Receive Maximum (§3.3.4)",
}


class V5:
    """What a 5.0 connection adds (made only for 5.0 clients: a 3.1.1 connection carries none of it)."""

    __slots__ = ("keepalive_capped", "max_packet", "problem_info", "queue", "receive_max")

    def __init__(self, props: codec.Props | None) -> None:
        props = props or {}
        self.max_packet = int(props.get(codec.MAXIMUM_PACKET_SIZE, 0)) or None  # type: ignore[call-overload]
        self.receive_max = int(props.get(codec.RECEIVE_MAXIMUM, 65535))  # type: ignore[call-overload]
        self.problem_info = props.get(codec.REQUEST_PROBLEM_INFORMATION, 1) != 0
        self.keepalive_capped = False
        # QoS 1 deliveries waiting for the client's receive maximum to allow them.
        self.queue: deque[tuple[str, bytes, bytes, bool, asyncio.Future[None] | None]] | None = None


def _delivery() -> asyncio.Future[None]:
    """A future done when the client acknowledges (or failed by :func:`_fail`)."""
    return asyncio.get_running_loop().create_future()


def _fail(future: asyncio.Future[None] | None, exc: Exception) -> None:
    """A delivery that will not be acknowledged. Its exception is marked retrieved at once, so one
    nobody waits for fails silently (a waiter still gets it); not a done-callback on every
    delivery, which would cost a callback per acknowledgement in a fleet push."""
    if future is not None and not future.done():
        future.set_exception(exc)
        future.exception()


KEEPALIVE_GRACE = 1.5  # the spec's 1.5 x keep-alive: silent for longer, a connection is dead


class Connection(asyncio.Protocol):
    __slots__ = (
        "admin_only",
        "broker",
        "close_reason",
        "deadline",
        "epoch",
        "held",
        "in_qos2",
        "keepalive",
        "key",
        "last_heard",
        "limit",
        "max_inflight",
        "max_write",
        "next_id",
        "out",
        "paused",
        "pending",
        "principal",
        "rate_full_at",
        "remote",
        "sent",
        "session",
        "state",
        "subs",
        "tls",
        "transport",
        "v5",
        "wild",
        "will",
    )

    def __init__(self, broker: Owner, *, admin_only: bool = False, tls: bool = False) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        # Before authentication a peer may make us buffer little; raised to max_packet once authenticated.
        self.limit = min(MAX_CONNECT_BYTES, broker.limits.max_packet)  # the largest packet it may send us
        self.held = b""  # the start of a packet not yet whole
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
        self.rate_full_at = 0.0  # its packet rate's bucket (``sessions.take_token``)
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
        self.v5: V5 | None = None  # set by the CONNECT of a 5.0 client
        self.session: Attached | None = None  # the persistent session this connection is attached to
        # With a session: what each unacknowledged QoS 1 delivery was, to re-send it on a reconnect.
        self.sent: dict[int, Sent] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not an asyncio.Transport subclass)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.remote = f"{peer[0]}:{peer[1]}"
        elif self.admin_only:
            self.remote = "unix"
        # asyncio keeps both addresses of every socket as tuples, never read again here (``remote``
        # holds the peer's): about 290 bytes a connection, an eighth of what one costs.
        extra = getattr(transport, "_extra", None)
        if type(extra) is dict:
            extra.pop("peername", None)
            extra.pop("sockname", None)
        self.broker.on_made(self)

    @property
    def version(self) -> int:
        return 4 if self.v5 is None else 5

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_heard = time.time()
        try:
            frames, self.held = codec.cut_frames(self.held, data, self.limit)
        except codec.PacketTooLarge as exc:
            self.broker.warn("broker.packet_too_large", "key=%s remote=%s size=%d", self.key, self.remote, exc.size)
            if self.state == HANDSHAKE and _announces_v5(data):
                self.send(codec.connack(codec.PACKET_TOO_LARGE, props={codec.REASON_STRING: "CONNECT too large"},
                                        version=5))
            self.close("packet_too_large", abort=self.state != HANDSHAKE, code=exc.reason)
            return
        except codec.CodecError as exc:
            self.broker.info("broker.malformed", "key=%s remote=%s error=%s", self.key, self.remote, exc)
            self.close("protocol_error", abort=True, code=exc.reason)
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

    def accept(self, props: codec.Props | None = None, session_present: bool = False) -> None:
        """The server accepted the CONNECT and its epoch is durable: CONNACK, then (a resumed
        session's messages, then) the packets the client sent behind its CONNECT."""
        self.state = OPEN
        self.deadline = 0.0  # the CONNECT deadline is met (a shared constant: a float less per connection)
        self.send(codec.connack(codec.ACCEPTED, session_present, props=props, version=self.version))
        if self.session is not None:
            self.session.resume(self)
        pending, self.pending = self.pending, None
        for first, body in pending or ():
            if self.state != OPEN:
                return
            self.dispatch(first, body)

    def refuse(self, code: int, code5: int | None = None, why: str | None = None) -> None:
        """CONNACK with a refusal (``code5`` and a reason string for a 5.0 client), then close."""
        if self.v5 is not None and code5 is not None:
            self.send(codec.connack(code5, props={codec.REASON_STRING: why} if why else None, version=5))
        else:
            self.send(codec.connack(code))
        self.close("refused")

    # ---- packets after CONNECT -----------------------------------------------------------------

    def dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        version = self.version
        try:
            if kind == codec.PUBLISH:
                self.broker.on_publish(self, codec.decode_publish(first, body, version))
            elif kind == codec.PUBACK:
                if first == 0x40 and len(body) == 2:  # the common one (either version): its packet id only
                    packet_id = (body[0] << 8) | body[1]
                    if not packet_id:
                        raise codec.CodecError("packet id 0")
                else:
                    ack = codec.decode(first, body, version)
                    assert isinstance(ack, codec.Puback)
                    packet_id = ack.packet_id
                out = self.out
                entry = out.pop(packet_id, None) if out else None
                if self.sent is not None:
                    self.sent.pop(packet_id, None)
                if entry is None and not self.broker.charge(self):  # unsolicited: charged
                    return
                if entry is not None and entry[1] is not None and not entry[1].done():
                    entry[1].set_result(None)
                if self.v5 is not None and self.v5.queue:
                    self._release_queued()
            elif kind == codec.PINGREQ:
                codec.decode(first, body)
                if self.broker.charge(self):  # a flood of pings is a flood like any other
                    self.send(codec.PINGRESP_BYTES)
            elif kind == codec.SUBSCRIBE:
                packet = codec.decode(first, body, version)
                assert isinstance(packet, codec.Subscribe)
                self.broker.on_subscribe(self, packet)
            elif kind == codec.UNSUBSCRIBE:
                packet = codec.decode(first, body, version)
                assert isinstance(packet, codec.Unsubscribe)
                self.broker.on_unsubscribe(self, packet)
            elif kind == codec.PUBREL:
                rel = codec.decode(first, body, version)
                assert isinstance(rel, codec.Pubrel)
                known = self.in_qos2 is not None and self.in_qos2.pop(rel.packet_id, None) is not None
                if not known and not self.broker.charge(self):
                    return
                # Also for an unknown id [MQTT-4.3.3-2]; 5.0 says which (0x92 packet identifier not found).
                self.send(codec.pubcomp(rel.packet_id, 0 if known else 0x92, version=version))
            elif kind == codec.DISCONNECT:
                packet = codec.decode(first, body, version)
                assert isinstance(packet, codec.Disconnect)
                expiry = (packet.props or {}).get(codec.SESSION_EXPIRY_INTERVAL)
                if isinstance(expiry, int):  # 5.0: the client may change its session's expiry on leaving
                    if self.session is None and expiry > 0:
                        raise codec.ProtocolViolation("Session Expiry Interval set at DISCONNECT after 0 at "
                                                      "CONNECT")  # [MQTT-3.14.2-2]
                    if self.session is not None:
                        self.session.expiry = min(expiry, self.broker.limits.session_expiry_max)
                if packet.reason == 0:
                    self.will = None  # [MQTT-3.14.4-3]
                    self.close("client_disconnect")
                else:  # 5.0: 0x04 asks for the will; any error reason publishes it too [MQTT-3.1.2-10]
                    self.close("disconnect_with_will")
            elif kind in (codec.PUBREC, codec.PUBCOMP):
                codec.decode(first, body, version)  # we never send QoS 2; tolerated and ignored
            elif kind == codec.AUTH and version == 5:
                raise codec.ProtocolViolation("AUTH without an authentication method")
            else:
                raise codec.ProtocolViolation(f"packet type {kind} is not for a server here")  # [MQTT-3.1.0-2]
        except codec.CodecError as exc:
            self.broker.info("broker.malformed", "key=%s remote=%s error=%s", self.key, self.remote, exc)
            self.close("protocol_error", abort=True, code=exc.reason)

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

    def deliver(self, topic: str, data: bytes, qos: int, retain: bool, track: bool,
                props: bytes | None = None) -> asyncio.Future[None] | None:
        """Send one message; with QoS 1 and ``track``, a future done when the client acknowledges it.

        ``props``: the message's encoded 5.0 properties (ignored for a 3.1.1 client).
        """
        if self.state != OPEN:
            return None
        v5 = self.v5
        if v5 is not None:
            if props is None:
                props = b"\x00"
            if v5.max_packet is not None and 7 + len(topic) + len(props) + len(data) > v5.max_packet:
                # Too large for this client (its Maximum Packet Size): not sent [MQTT-3.1.2-24].
                self.broker.too_large_for_client(self, topic, len(data))
                return None
        else:
            props = None
        if not qos:
            self.send(codec.publish_bytes(topic, data, 0, retain, props=props))
            return None
        out = self.out
        if out is None:
            out = self.out = {}
        if v5 is not None and (len(out) >= v5.receive_max or v5.queue):
            return self._enqueue(topic, data, retain, track, props or b"\x00")
        if len(out) >= self.max_inflight:
            # A client that does not acknowledge cannot make the server hold unbounded messages.
            self.broker.warn("broker.slow_consumer", "key=%s: %d deliveries unacknowledged", self.key, len(out))
            self.close("slow_consumer", abort=True)
            return None
        future = _delivery() if track else None
        self._send_qos1(topic, data, retain, props, future)
        return future

    def _enqueue(self, topic: str, data: bytes, retain: bool, track: bool,
                 props: bytes) -> asyncio.Future[None] | None:
        """The client's Receive Maximum is reached: hold the delivery (bounded by ``max_inflight``)."""
        assert self.v5 is not None and self.out is not None
        queue = self.v5.queue
        if queue is None:
            queue = self.v5.queue = deque()
        if len(self.out) + len(queue) >= self.max_inflight:
            self.broker.warn("broker.slow_consumer", "key=%s: %d deliveries unacknowledged", self.key,
                             len(self.out) + len(queue))
            self.close("slow_consumer", abort=True)
            return None
        future = _delivery() if track else None
        queue.append((topic, data, props, retain, future))
        return future

    def _release_queued(self) -> None:
        assert self.v5 is not None and self.v5.queue is not None
        queue, out = self.v5.queue, self.out
        while queue and (out is None or len(out) < self.v5.receive_max) and self.state == OPEN:
            topic, data, props, retain, future = queue.popleft()
            sent = self._send_qos1(topic, data, retain, props, future)
            out = self.out
            if not sent:
                return

    def _send_qos1(self, topic: str, data: bytes, retain: bool, props: bytes | None,
                   future: asyncio.Future[None] | None) -> bool:
        out = self.out
        if out is None:
            out = self.out = {}
        packet_id = self.next_id
        while True:
            packet_id = packet_id % 65535 + 1
            if packet_id not in out:
                break
        self.next_id = packet_id
        out[packet_id] = (time.monotonic(), future)
        if self.session is not None:
            if self.sent is None:
                self.sent = {}
            self.sent[packet_id] = (topic, data, retain, props)
        self.send(codec.publish_bytes(topic, data, 1, retain, packet_id, props=props))
        return self.state == OPEN

    def resend(self, packet_id: int, message: Sent) -> None:
        """A session's unacknowledged delivery on a new connection: its packet id, DUP set [MQTT-4.4.0-1]."""
        topic, data, retain, props = message
        if self.out is None:
            self.out = {}
        if self.sent is None:
            self.sent = {}
        self.out[packet_id] = (time.monotonic(), None)
        self.sent[packet_id] = message
        self.next_id = max(self.next_id, packet_id)
        self.send(codec.publish_bytes(topic, data, 1, retain, packet_id, dup=True,
                                      props=(props or b"\x00") if self.v5 is not None else None))

    # ---- ending -------------------------------------------------------------------------------

    def close(self, reason: str, *, abort: bool = False, code: int | None = None, leave: bool = False) -> None:
        """End the connection now: the server forgets it at once; the socket follows (bounded).

        A 5.0 client that got its CONNACK is told why first (a DISCONNECT with a reason code and a
        reason string); ``code`` overrides the reason code the close reason maps to. ``leave``: the
        process is about to exit, and the kernel closes the socket then.
        """
        if self.state == CLOSED:
            return
        if leave and self.v5 is None and not self.out and self.session is None:
            # The process ends next: a 3.1.1 client is told nothing, nothing waits on it, no session
            # keeps it, and the server is forgotten whole; the kernel closes the socket at exit.
            self.state = CLOSED
            self.close_reason = self.close_reason or reason
            return
        told = self.state == OPEN and self.v5 is not None
        self.state = CLOSED
        if self.close_reason is None:
            self.close_reason = reason
        self.pending = None
        if told:
            known = DISCONNECT_REASONS.get(self.close_reason)
            if known is not None or code is not None:
                reason_code, why = known or (code or codec.UNSPECIFIED_ERROR, "protocol error")
                if code is not None:  # the exact code the caller named (e.g. 0x93, not quota's 0x97)
                    reason_code, why = code, CODE_TEXT.get(code, why)
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.write(codec.disconnect(reason_code, {codec.REASON_STRING: why}, version=5))
                    if transport.get_write_buffer_size() == 0:
                        abort = False  # it left at once: a FIN after it, so the client reads it first
        out = self.out
        queued = self.v5.queue if self.v5 is not None else None
        failed = [f for _, f in (out or {}).values()] + [item[4] for item in queued or ()]
        self.broker.finish(self)  # (a persistent session keeps what was not acknowledged)
        self.out = None
        for future in failed:
            _fail(future, ConnectionError(f"connection closed: {self.close_reason}"))
        transport = self.transport
        if transport is not None and not leave:
            if abort:
                transport.abort()
            else:
                if told and self.close_reason in LINGER_ON and transport.can_write_eof():
                    # A client cut off for what it sends is likely still sending: the DISCONNECT, then
                    # FIN, and the socket stays until the client closes it (or the closing deadline).
                    # Closed at once with its packets unread, the kernel would answer with a reset that
                    # can reach the client before the reason does. (Not on a takeover: the displaced
                    # client is idle, and some clients act on a late DISCONNECT against their new socket.)
                    transport.write_eof()
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
        if now - self.last_heard > self.keepalive * KEEPALIVE_GRACE:
            self.close("keepalive_timeout", abort=True)
            return
        out = self.out
        if out and self.session is not None:
            # A session's deliveries wait for their PUBACK (or a reconnect re-sends them): only the
            # waiters give up; max_inflight still bounds them.
            for sent, future in out.values():
                if mono - sent < puback_timeout:
                    break
                _fail(future, TimeoutError("no PUBACK"))
            out = None
        while out:
            packet_id, (sent, future) = next(iter(out.items()))
            if mono - sent < puback_timeout:
                break
            del out[packet_id]
            _fail(future, TimeoutError("no PUBACK"))
        in_qos2 = self.in_qos2
        if in_qos2:
            oldest = next(iter(in_qos2.values()))
            if mono - oldest > pubrel_timeout:
                self.broker.warn("broker.pubrel_timeout", "key=%s", self.key)
                self.close("quota_exceeded", abort=True)

    def peer_cert(self) -> PeerCert | None:
        """The client certificate the TLS handshake verified, if any."""
        transport = self.transport
        if transport is None or not self.tls:
            return None
        cert: Any = transport.get_extra_info("peercert")
        if not cert:
            return None
        cn = next((str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"), None)
        return PeerCert(cn, name_of(cert.get("issuer", ())))

    def __repr__(self) -> str:
        return f"Connection(key={self.key!r}, epoch={self.epoch}, state={self.state})"


def _announces_v5(data: bytes) -> bool:
    """Whether the first bytes of a connection are a 5.0 CONNECT (to refuse an oversize one in 5.0 terms)."""
    if not data or data[0] != 0x10:
        return False
    i = 1
    while i < len(data) and i < 5 and data[i] & 0x80:
        i += 1
    i += 1
    return data[i:i + 7] == b"\x00\x04MQTT\x05"
