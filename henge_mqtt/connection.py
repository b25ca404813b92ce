"""One MQTT connection on the wire: amqtt's packet codecs and QoS flows, our reading and timing.

amqtt's ``ProtocolHandler`` wraps every read in ``asyncio.wait_for`` (a task and a timer per
packet), spawns a task per incoming packet, hands SUBSCRIBE/PUBLISH to the broker through queues,
never enforces keep-alive, and creates its disconnect waiter after the reader starts (an early EOF
is lost). Its ``Session`` builds a ``transitions`` state machine per connection, which dominates
both connect CPU and memory. This module keeps amqtt's codecs and outgoing QoS machinery and
replaces the rest: one reader coroutine that dispatches packets inline, one keep-alive timer that
is re-armed lazily, a light session, and direct callbacks into the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Protocol

from amqtt.adapters import BufferReader, ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from . import wire

CLOSE_TIMEOUT = 1.0
MAX_CONNECT_PACKET = 256 * 1024  # client id, will (<= 64 KiB), username, password
PUBACK_TIMEOUT = 10.0
DEFAULT_MAX_PACKET = 1024 * 1024

class PacketSink(Protocol):
    """Where a connection's application packets go (the broker's view of that connection)."""

    def on_message(self, topic: str, data: bytes, qos: int, retain: bool) -> bool:
        """False means: protocol violation, close the connection."""
        ...

    async def on_subscribe(self, packet_id: int, topics: list[tuple[str, int]]) -> None: ...

    async def on_unsubscribe(self, packet_id: int, topics: list[str]) -> None: ...


class SlowConsumer(Exception):
    """A client left too many deliveries unacknowledged; its connection is being closed."""


class PacketTooLarge(Exception):
    """A packet announced more bytes than ``max_packet``: the connection is closed unread."""


class ConnectRefused(Exception):
    """The CONNECT was malformed or unacceptable; a CONNACK code was already sent if it has one."""


class LightSession(Session):
    """amqtt's Session without its ``transitions`` state machine and its four eager queues.

    We never resume sessions and track connection state in our own session table, so the state
    machine (the largest cost of a connect in CPU) has nothing to do, and the queues (the largest
    cost in memory) are needed only by a QoS 2 publish, so they are made on first use.
    """

    def __init__(self) -> None:  # deliberately not Session.__init__: see the class docstring
        self.client_id: str | None = None
        self.clean_session: bool | None = None
        self.will_flag = False
        self.will_message: bytes | bytearray | None = None
        self.will_qos: int | None = None
        self.will_retain: bool | None = None
        self.will_topic: str | None = None
        self.keep_alive: float = 0
        self.username: str | None = None
        self.password: str | None = None
        self.parent = 0
        self._packet_id = 0
        self.inflight_out: OrderedDict[int, Any] = OrderedDict()
        self.inflight_in: OrderedDict[int, Any] = OrderedDict()
        self._delivered: asyncio.Queue[Any] | None = None

    @property
    def delivered_message_queue(self) -> asyncio.Queue[Any]:
        if self._delivered is None:
            self._delivered = asyncio.Queue()
        return self._delivered

    def __repr__(self) -> str:
        return f"LightSession(client_id={self.client_id!r})"


class TrackedReader(ReaderAdapter):
    """Remembers when the peer last sent anything: the evidence that a connection is alive."""

    def __init__(self, inner: ReaderAdapter) -> None:
        self.inner = inner
        self.last_read = time.time()
        raw = getattr(inner, "_reader", None)
        self.stream: asyncio.StreamReader | None = raw if isinstance(raw, asyncio.StreamReader) else None

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.last_read = time.time()
        return data

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class BoundedWriter(StreamWriterAdapter):
    """A close that cannot hang on a peer that stopped reading."""

    is_closed: bool

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        writer = self._writer
        try:
            await asyncio.wait_for(writer.drain(), CLOSE_TIMEOUT)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, OSError, ConnectionError):
            writer.transport.abort()

    def abort(self) -> None:
        self.is_closed = True
        self._writer.transport.abort()


async def read_packet_from(stream: asyncio.StreamReader, max_packet: int) -> tuple[int, bytes]:
    """``(first byte, body)`` of one whole packet: two reads for almost every packet."""
    head = await stream.readexactly(2)
    encoded = head[1]
    length, multiplier = encoded & 0x7F, 128
    while encoded & 0x80:
        if multiplier > 128**3:
            raise MQTTError("malformed remaining length")
        encoded = (await stream.readexactly(1))[0]
        length += (encoded & 0x7F) * multiplier
        multiplier *= 128
    if length > max_packet:
        raise PacketTooLarge(length)
    return head[0], (await stream.readexactly(length) if length else b"")


async def read_connect(reader: ReaderAdapter, writer: WriterAdapter) -> LightSession:
    """Read and check the first packet; the session it describes is not trusted yet."""
    stream = reader.stream if isinstance(reader, TrackedReader) else None
    if stream is not None:
        return await _read_connect_fast(stream, writer)
    connect = await ConnectPacket.from_stream(reader)
    if connect.variable_header is None or connect.payload is None:
        raise ConnectRefused("CONNECT without header or payload")
    code: int | None = None
    if connect.proto_name != "MQTT" or connect.variable_header.reserved_flag:
        raise ConnectRefused("not an MQTT 3.1.1 CONNECT")
    if connect.proto_level != 4:
        code = UNACCEPTABLE_PROTOCOL_VERSION
    elif (connect.password_flag and not connect.username_flag) or (
        connect.username_flag and connect.username is None
    ) or (connect.password_flag and connect.password is None):
        code = BAD_USERNAME_PASSWORD
    elif not connect.client_id or connect.payload.client_id_is_random:
        code = IDENTIFIER_REJECTED  # every henge identity names itself
    elif connect.will_flag and (connect.will_topic is None or connect.will_message is None):
        raise ConnectRefused("will flag set without will topic/message")
    if code is not None:
        await ConnackPacket.build(0, code).to_stream(writer)
        raise ConnectRefused(f"CONNACK {code}")
    session = LightSession()
    session.client_id = connect.client_id
    session.clean_session = connect.clean_session_flag
    session.will_flag = bool(connect.will_flag)
    session.will_retain = connect.will_retain_flag
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password
    session.keep_alive = max(connect.keep_alive, 0)
    return session


async def _read_connect_fast(stream: asyncio.StreamReader, writer: WriterAdapter) -> LightSession:
    try:
        first, body = await read_packet_from(stream, MAX_CONNECT_PACKET)
        if first != 0x10:
            raise ConnectRefused(f"first packet is not a CONNECT (0x{first:02x})")  # [MQTT-3.1.0-1]
        connect = wire.parse_connect(body)
    except (wire.Malformed, PacketTooLarge, MQTTError) as exc:
        raise ConnectRefused(f"malformed CONNECT: {exc}") from exc
    if connect.protocol != "MQTT" or connect.reserved_flag:
        raise ConnectRefused("not an MQTT 3.1.1 CONNECT")
    code: int | None = None
    if connect.level != 4:
        code = UNACCEPTABLE_PROTOCOL_VERSION
    elif connect.password_without_username:
        code = BAD_USERNAME_PASSWORD
    elif not connect.client_id:
        code = IDENTIFIER_REJECTED  # every henge identity names itself
    if code is not None:
        writer.write(wire.connack(code))
        await writer.drain()
        raise ConnectRefused(f"CONNACK {code}")
    session = LightSession()
    session.client_id = connect.client_id
    session.clean_session = connect.clean_session
    session.will_flag = connect.will_topic is not None
    session.will_retain = connect.will_retain
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password
    session.keep_alive = connect.keepalive
    return session


class HengeHandler(BrokerProtocolHandler):
    def __init__(
        self,
        plugins_manager: Any,
        *,
        sink: PacketSink,
        max_packet: int = DEFAULT_MAX_PACKET,
        max_inflight: int = 50,
    ) -> None:
        # Not BrokerProtocolHandler.__init__: its two subscription queues are replaced by callbacks.
        ProtocolHandler.__init__(self, plugins_manager)
        # Used only by ProtocolHandler methods we replace; a fleet of idle connections need not carry them.
        del self._reader_stopped, self._write_lock
        self._loop = asyncio.get_running_loop()
        self._disconnect_waiter = self._loop.create_future()
        self.sink = sink  # one reference, not three closures: this object exists per device
        self.max_packet = max_packet
        self.max_inflight = max_inflight
        self.slow_consumer = False
        self.timed_out = False
        self.protocol_error = False
        self.read_timeout: float | None = None
        self.oversized = False
        self._qos2: set[asyncio.Task[None]] | None = None  # made on the first QoS 2 publish

    def _init_session(self, session: Session) -> None:
        # Upstream wraps the module logger in a LoggerAdapter per connection; the shared logger will do.
        self.session = session
        self.keepalive_timeout = None

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        super().attach(session, reader, writer)
        self.read_timeout = float(session.keep_alive) or None
        self.keepalive_timeout = None  # no write-side timer per packet sent; the broker never pings

    def disconnect_packet(self) -> DisconnectPacket | None:
        waiter = self._disconnect_waiter
        return waiter.result() if waiter is not None and waiter.done() else None

    def _resolve(self, result: DisconnectPacket | None) -> None:
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def idle_too_long(self, now: float) -> bool:
        """Keep-alive check, called by the broker's periodic sweep (one sweep, not a timer each)."""
        if self.read_timeout is None or not isinstance(self.reader, TrackedReader):
            return False
        if now - self.reader.last_read < self.read_timeout:
            return False
        self.timed_out = True
        self._resolve(None)
        if isinstance(self.writer, BoundedWriter):
            self.writer.abort()  # ends the read the connection's task is blocked in
        return True

    # ---- reading ----------------------------------------------------------------------------

    async def _read_packet(self) -> tuple[MQTTFixedHeader, bytes]:
        """One whole packet through amqtt's byte-wise reader (non-TCP transports such as websockets)."""
        assert self.reader is not None
        header = await MQTTFixedHeader.from_stream(self.reader)
        if header is None:
            raise NoDataError("connection closed")
        if header.remaining_length > self.max_packet:
            raise PacketTooLarge(header.remaining_length)
        body = await self.reader.read(header.remaining_length) if header.remaining_length else b""
        return header, body

    async def read_until_closed(self) -> None:
        """Read and dispatch packets in the calling task until the connection ends.

        Upstream runs a separate reader task per connection; reading in the connection's own task
        saves that task and its frames for every idle device. Whoever ends the connection from
        outside closes the socket, which ends the read.
        """
        assert isinstance(self.reader, TrackedReader)
        tracked, stream = self.reader, self.reader.stream
        try:
            while not self._disconnect_waiter.done():
                if stream is None:
                    header, body = await self._read_packet()
                else:  # read_packet_from, inline: one coroutine frame less under every idle connection
                    head = await stream.readexactly(2)
                    encoded = head[1]
                    length, multiplier = encoded & 0x7F, 128
                    while encoded & 0x80:
                        if multiplier > 128**3:
                            raise MQTTError("malformed remaining length")
                        encoded = (await stream.readexactly(1))[0]
                        length += (encoded & 0x7F) * multiplier
                        multiplier *= 128
                    if length > self.max_packet:
                        raise PacketTooLarge(length)
                    body = await stream.readexactly(length) if length else b""
                    tracked.last_read = time.time()
                    header = MQTTFixedHeader(head[0] >> 4, head[0] & 0x0F, length)
                kind, flags = header.packet_type, header.flags
                if kind == PUBLISH:  # the hot packets are parsed here, synchronously (see wire.py)
                    topic, packet_id, data, qos, retain = wire.parse_publish(flags, body)
                    await self._on_publish(topic, packet_id, data, qos, retain, header, body)
                elif kind == PUBACK:
                    waiter = self._puback_waiters.get(wire.parse_packet_id(body))
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif kind == PINGREQ:
                    await self.send_raw(wire.PINGRESP)
                elif kind in (SUBSCRIBE, UNSUBSCRIBE):
                    if flags != 0x02:
                        self.protocol_error = True  # [MQTT-3.8.1-1] and its UNSUBSCRIBE twin
                        break
                    if kind == SUBSCRIBE:
                        packet_id, filters = wire.parse_subscribe(body)
                        if not filters:
                            self.protocol_error = True  # [MQTT-3.8.3-3]
                            break
                        await self.sink.on_subscribe(packet_id, filters)
                    else:
                        packet_id, names = wire.parse_unsubscribe(body)
                        if not names:
                            self.protocol_error = True  # [MQTT-3.10.3-2]
                            break
                        await self.sink.on_unsubscribe(packet_id, names)
                elif kind == DISCONNECT:
                    self._resolve(DisconnectPacket())
                elif kind in (PUBREC, PUBREL, PUBCOMP):  # QoS 2, rare: amqtt's codecs and flows
                    packet = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
                    handle = {PUBREC: self.handle_pubrec, PUBREL: self.handle_pubrel, PUBCOMP: self.handle_pubcomp}
                    await handle[kind](packet)
                else:
                    self.protocol_error = True  # CONNECT again [MQTT-3.1.0-2], reserved, or broker-only
                    break
                # This frame lives as long as the connection; do not let it pin the last packet.
                packet = header = None
                body = head = b""
        except (asyncio.IncompleteReadError, ConnectionError, OSError, NoDataError):
            pass
        except PacketTooLarge:
            self.oversized = True
            self.protocol_error = True
        except (wire.Malformed, MQTTError, AMQTTError, ValueError, IndexError, UnicodeDecodeError, AttributeError,
                TypeError):
            self.protocol_error = True  # a malformed packet from a broken or hostile client
        finally:
            self._resolve(None)

    # ---- writing ----------------------------------------------------------------------------

    async def _send_packet(self, packet: Any) -> None:
        """One ``write`` per packet keeps packets whole without amqtt's lock, timer and plugin event."""
        await self.send_raw(packet.to_bytes())

    async def send_raw(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or getattr(writer, "is_closed", False):
            return
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError):
            self._resolve(None)

    async def mqtt_publish(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool, ack_timeout: int | None = None
    ) -> OutgoingApplicationMessage:
        if qos != 1:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        # QoS 1 without amqtt's wait_for (a task per delivery): one future, one deadline.
        assert self.session is not None
        if len(self.session.inflight_out) >= self.max_inflight:
            # A client that does not acknowledge cannot make the broker hold unbounded messages.
            self.slow_consumer = True
            self._resolve(None)
            if isinstance(self.writer, BoundedWriter):
                self.writer.abort()
            raise SlowConsumer(f"{self.session.client_id}: {self.max_inflight} messages unacknowledged")
        packet_id = self.session.next_packet_id
        message = OutgoingApplicationMessage(packet_id, topic, 1, data, retain)
        waiter: asyncio.Future[PubackPacket] = self._loop.create_future()
        self.session.inflight_out[packet_id] = message
        self._puback_waiters[packet_id] = waiter
        try:
            message.publish_packet = message.build_publish_packet()
            await self._send_packet(message.publish_packet)
            async with asyncio.timeout(ack_timeout or PUBACK_TIMEOUT):
                message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
            self.session.inflight_out.pop(packet_id, None)
        return message

    async def _on_publish(
        self, topic: str, packet_id: int | None, data: bytes, qos: int, retain: bool, header: MQTTFixedHeader,
        body: bytes,
    ) -> None:
        if qos == 2:
            # QoS 2 waits for the client's PUBREL: run amqtt's flow aside so reading continues.
            packet = await PublishPacket.from_stream(BufferReader(body), fixed_header=header)
            task = asyncio.ensure_future(self._qos2_flow(packet))
            if self._qos2 is None:
                self._qos2 = set()
            self._qos2.add(task)
            task.add_done_callback(self._qos2.discard)
            return
        if not self.sink.on_message(topic, data, qos, retain):
            self.protocol_error = True
            self._resolve(None)
            return
        if qos == 1 and packet_id is not None:
            await self.send_raw(wire.puback(packet_id))

    async def _qos2_flow(self, packet: PublishPacket) -> None:
        assert self.session is not None
        message = IncomingApplicationMessage(packet.packet_id, packet.topic_name, 2, packet.data, packet.retain_flag)
        message.publish_packet = packet
        await self._handle_message_flow(message)
        delivered = self.session.delivered_message_queue.get_nowait()
        if not self.sink.on_message(delivered.topic, bytes(delivered.data), 2, bool(packet.retain_flag)):
            self.protocol_error = True
            self._resolve(None)



