"""The embedded broker: amqtt 0.12.1 for the wire protocol, our own connection lifecycle on top.

amqtt's ``Broker`` gets session handling wrong in ways a fleet hits daily (see docs/sessions.md):
takeovers that leave the old socket open, session lookups before authentication, no keep-alive
enforcement, retained messages of other clients' subscriptions sent on connect, and per-message
work proportional to every subscription. This subclass keeps amqtt's listeners, packet codecs and
per-connection QoS machinery and replaces everything above them:

- authentication runs before anything else, and a refused CONNECT touches no existing session;
- the pure :class:`~henge_mqtt.sessions.SessionTable` decides takeovers and fences stale events;
- every connection gets a fresh amqtt ``Session`` (we never resume one), keyed by connection, so
  nothing of an old connection can reach a new one;
- subscriptions live in an index (exact topics in a dict, wildcard filters apart), and retained
  messages are looked up only for the filter just subscribed, for the subscriber only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import websockets.asyncio.server
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import Session

from . import wire
from .connection import (
    CLOSE_TIMEOUT,
    BoundedWriter,
    ConnectRefused,
    HengeHandler,
    TrackedReader,
    read_connect,
)
from .sessions import Action, Close, ConnectResult, PublishWill, SessionSettings, SessionTable, TokenBucket
from .tasks import TaskSet
from .topics import Retained, Topics, filter_matches, keep_retained, valid_filter, valid_topic_name

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80
ADMIN_MAX_PACKET = 64 * 1024 * 1024
SWEEP_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection authenticated as."""

    kind: Literal["device", "admin"]
    name: str


class BrokerHooks(Protocol):
    """What the broker needs from the service; the broker never imports the service."""

    def authenticate(
        self, username: str | None, password: str | None, client_id: str, cert_cn: str | None
    ) -> Principal | None:
        """``cert_cn``: the CN of a verified TLS client certificate, if the connection presented one."""
        ...

    def session_actions(self, actions: Sequence[Action]) -> None: ...

    def message(self, principal: Principal, topic: str, payload: bytes) -> None: ...

    def epochs_durable(self) -> Awaitable[None]:
        """Resolves once every epoch handed out so far is on disk (group commit)."""
        ...


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    max_keepalive: float = 300.0
    connect_timeout: float = 10.0
    max_device_publish: int = 64 * 1024
    max_packet: int = 1024 * 1024  # devices; admins (bulk imports, big configs) get ADMIN_MAX_PACKET
    max_inflight: int = 50
    publish_rate: float = 10.0
    publish_burst: float = 50.0
    tls_client_auth: Literal["off", "optional", "required"] = "off"


def _client_cert_cn(writer: WriterAdapter) -> str | None:
    """The common name of the peer's verified certificate (TLS listeners only)."""
    ssl_object = writer.get_ssl_info() if hasattr(writer, "get_ssl_info") else None
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass(eq=False, slots=True)
class Connection:
    """One accepted MQTT connection and everything that belongs to it alone."""

    broker: HengeBroker
    key: str
    principal: Principal
    epoch: int
    remote: str
    keepalive: float
    handler: HengeHandler
    session: Session
    reader: TrackedReader
    writer: BoundedWriter | WriterAdapter
    subscriptions: dict[str, int] = field(default_factory=dict)
    close_reason: str | None = None
    publishes: TokenBucket = field(default_factory=TokenBucket)
    started: bool = False
    task: asyncio.Task[Any] | None = None  # the task serving it: closing waits for it to finish

    @property
    def device(self) -> str | None:
        return self.principal.name if self.principal.kind == "device" else None

    @property
    def last_heard(self) -> float:
        return self.reader.last_read

    # The connection's PacketSink: packets go to the broker with the connection they came on.
    def on_message(self, topic: str, data: bytes, qos: int, retain: bool) -> bool:
        return self.broker._on_publish(self, topic, data, qos, retain)

    async def on_subscribe(self, packet_id: int, topics: list[tuple[str, int]]) -> None:
        await self.broker._on_subscribe(self, packet_id, topics)

    async def on_unsubscribe(self, packet_id: int, topics: list[str]) -> None:
        await self.broker._on_unsubscribe(self, packet_id, topics)


class SubscriptionIndex:
    """Exact filters in a dict (O(1) per publish); wildcard filters, which only admins use, apart."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[Connection, int]] = {}
        self._wild: dict[str, dict[Connection, int]] = {}

    def add(self, conn: Connection, topic_filter: str, qos: int) -> None:
        table = self._wild if ("+" in topic_filter or "#" in topic_filter) else self._exact
        table.setdefault(topic_filter, {})[conn] = qos
        conn.subscriptions[topic_filter] = qos

    def remove(self, conn: Connection, topic_filter: str) -> None:
        conn.subscriptions.pop(topic_filter, None)
        for table in (self._exact, self._wild):
            subs = table.get(topic_filter)
            if subs is not None:
                subs.pop(conn, None)
                if not subs:
                    del table[topic_filter]

    def remove_all(self, conn: Connection) -> None:
        for topic_filter in list(conn.subscriptions):
            self.remove(conn, topic_filter)

    def match(self, topic: str) -> Iterator[tuple[Connection, int]]:
        """Each subscriber of ``topic`` once, with its highest granted QoS."""
        exact = self._exact.get(topic)
        wild = [subs for topic_filter, subs in self._wild.items() if filter_matches(topic_filter, topic)]
        if not wild:
            return iter(list(exact.items()) if exact else ())
        best: dict[Connection, int] = dict(exact or {})
        for subs in wild:
            for conn, qos in subs.items():
                best[conn] = max(qos, best.get(conn, 0))
        return iter(best.items())

    def __len__(self) -> int:
        return sum(len(s) for s in self._exact.values()) + sum(len(s) for s in self._wild.values())


class HengeBroker(Broker):
    def __init__(
        self,
        config: dict[str, Any],
        *,
        hooks: BrokerHooks,
        topics: Topics,
        sessions: SessionSettings | None = None,
        limits: BrokerLimits | None = None,
    ) -> None:
        config = dict(config)
        config["plugins"] = {}  # we authenticate and authorize ourselves; see module docstring
        super().__init__(config)
        self.hooks = hooks
        self.topics = topics
        self.limits = limits or BrokerLimits()
        self.table = SessionTable(sessions)
        self.index = SubscriptionIndex()
        self.retained: Retained = {}
        self._conns: dict[str, Connection] = {}
        self._tasks = TaskSet(log, "broker.delivery_failed")
        self._handshakes: dict[WriterAdapter, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    # ---- listeners -----------------------------------------------------------------------------

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> asyncio.Server | websockets.asyncio.server.Server:
        if listener_type == ListenerType.TCP:
            if ssl_context is not None and self.limits.tls_client_auth == "required":
                ssl_context.verify_mode = ssl.CERT_REQUIRED
            # A larger backlog than asyncio's 100: a fleet reconnects all at once after a restart.
            return await asyncio.start_server(
                functools.partial(self._on_stream, tls=ssl_context is not None),
                address,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=4096,
            )
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool = False) -> None:
        # The same as _client_connected, one coroutine frame shallower: every idle device keeps
        # this chain of frames alive, so its depth is memory times the fleet size.
        adapter = BoundedWriter(writer)
        if self._closing:
            adapter.abort()
            return
        try:
            await self._serve(TrackedReader(StreamReaderAdapter(reader)), adapter)
        except (AMQTTError, MQTTError, NoDataError, ConnectionError, OSError) as exc:
            log.debug("broker.connection_error error=%r", exc)
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each TCP listener is bound to, with port 0 resolved."""
        found: list[tuple[str, int]] = []
        for server in self._servers.values():
            instance = server.instance
            if isinstance(instance, asyncio.Server):
                for sock in instance.sockets:
                    host, port = sock.getsockname()[:2]
                    found.append((host, port))
        return found

    # ---- connection lifecycle --------------------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        if self._closing:
            await writer.close()
            return
        tracked = TrackedReader(reader)
        try:
            await self._serve(tracked, writer)
        except (AMQTTError, MQTTError, NoDataError, ConnectionError, OSError) as exc:
            log.debug("broker.connection_error error=%r", exc)
        finally:
            with contextlib.suppress(Exception):
                await writer.close()

    async def _serve(self, reader: TrackedReader, writer: WriterAdapter) -> None:
        peer = writer.get_peer_info()
        remote = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        # The CONNECT deadline is enforced by the sweep (no timer or task per connection).
        self._handshakes[writer] = time.monotonic() + self.limits.connect_timeout
        try:
            session = await read_connect(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("broker.no_connect remote=%s error=%r", remote, exc)
            return
        except (ConnectRefused, AMQTTError, MQTTError, NoDataError, ValueError, IndexError, UnicodeDecodeError) as exc:
            log.info("broker.bad_connect remote=%s error=%s", remote, exc)
            return
        finally:
            self._handshakes.pop(writer, None)
        client_id = session.client_id or ""

        cert_cn = _client_cert_cn(writer) if self.limits.tls_client_auth != "off" else None
        principal = self.hooks.authenticate(session.username, session.password, client_id, cert_cn)
        if principal is None:
            log.info("broker.auth_failed client_id=%s remote=%s", client_id, remote)
            await self._refuse(writer, BAD_USERNAME_PASSWORD if session.username else NOT_AUTHORIZED)
            return

        requested = float(session.keep_alive or 0)
        keepalive = self.limits.max_keepalive if requested <= 0 else min(requested, self.limits.max_keepalive)
        now = time.time()

        result: ConnectResult | None = None
        if principal.kind == "device":
            device = principal.name
            old = self._conns.get(device)
            if old is not None:
                self.table.heard(device, old.epoch, old.last_heard)
            result = self.table.connect(device, now, remote, keepalive)
            closes = self._apply(result.actions)
            if not result.accepted:
                log.info("broker.refused device=%s reason=%s remote=%s", device, result.refusal, remote)
                await self._refuse(writer, NOT_AUTHORIZED)
                await self._await_closes(closes)
                return
            key, epoch = device, result.epoch
        else:
            key, epoch = f"admin:{client_id}", 0
            old = self._conns.get(key)
            closes = [old] if old is not None else []
            for conn in closes:
                conn.close_reason = "takeover"

        # The spec's 1.5 x keep-alive; upstream amqtt enforces none.
        session.keep_alive = math.ceil(keepalive * 1.5 * 1000) / 1000
        session.parent = 0  # never resume: a device gets its state from retained messages
        conn = Connection(self, key, principal, epoch, remote, keepalive, None, session, reader, writer)  # type: ignore[arg-type]
        handler = HengeHandler(
            self.plugins_manager,
            sink=conn,
            max_packet=self.limits.max_packet if principal.kind == "device" else ADMIN_MAX_PACKET,
            max_inflight=self.limits.max_inflight if principal.kind == "device" else 65_000,
        )
        handler.attach(session, reader, writer)
        conn.handler = handler
        conn.task = asyncio.current_task()
        self._conns[key] = conn  # before any await: a racing CONNECT must see this one to replace it

        await self._await_closes(closes)
        if principal.kind == "device":
            try:  # never acknowledge a connection whose epoch could be handed out again
                await self.hooks.epochs_durable()
            except Exception as exc:
                log.error("broker.epoch_not_saved device=%s error=%s", key, exc)
                conn.close_reason = "server_error"
        if conn.close_reason is not None:  # replaced while we waited
            await self._finish(conn)
            return
        await handler.send_raw(wire.connack(0))
        conn.started = True
        # This frame lives as long as the connection: drop what only the handshake needed
        # (the displaced connections, the table's actions).
        closes, old, result = [], None, None
        try:
            await handler.read_until_closed()
            packet = handler.disconnect_packet()
            if conn.close_reason is None:
                if isinstance(packet, DisconnectPacket):
                    conn.close_reason = "client_disconnect"
                elif handler.timed_out:
                    conn.close_reason = "keepalive_timeout"
                elif handler.slow_consumer:
                    conn.close_reason = "slow_consumer"
                    log.warning("broker.slow_consumer key=%s: too many unacknowledged deliveries", key)
                elif handler.oversized:
                    conn.close_reason = "packet_too_large"
                    log.warning("broker.packet_too_large key=%s", key)
                elif handler.protocol_error:
                    conn.close_reason = "protocol_error"
                else:
                    conn.close_reason = "connection_lost"
        finally:
            if conn.close_reason is None:
                conn.close_reason = "connection_lost"
            await self._finish(conn)

    async def _refuse(self, writer: WriterAdapter, code: int) -> None:
        with contextlib.suppress(Exception):
            await ConnackPacket.build(0, code).to_stream(writer)
        with contextlib.suppress(Exception):
            await writer.close()

    def _apply(self, actions: Iterable[Action]) -> list[Connection]:
        """Carry out the table's I/O actions; hand the rest to the service. Returns connections to await."""
        to_close: list[Connection] = []
        forward: list[Action] = []
        for action in actions:
            if isinstance(action, Close):
                conn = self._conns.get(action.device)
                if conn is not None and conn.epoch == action.epoch:
                    conn.close_reason = action.reason
                    if action.publish_will:
                        self._publish_will(conn)
                    to_close.append(conn)
            elif isinstance(action, PublishWill):
                conn = self._conns.get(action.device)
                if conn is not None and conn.epoch == action.epoch:
                    self._publish_will(conn)
            else:
                forward.append(action)
        if forward:
            self.hooks.session_actions(forward)
        return to_close

    async def _await_closes(self, conns: list[Connection]) -> None:
        if conns:
            await asyncio.gather(*(self._close(conn) for conn in conns))

    async def _close(self, conn: Connection) -> None:
        """Close a connection and wait (bounded) until its own task has cleaned up."""
        if conn.started:
            conn.handler._resolve(None)
        writer = conn.writer
        if isinstance(writer, BoundedWriter):
            writer.abort() if conn.close_reason in ("server_shutdown",) else await writer.close()
        else:
            with contextlib.suppress(Exception):
                await writer.close()
        task = conn.task
        if conn.started and task is not None and task is not asyncio.current_task() and not task.done():
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)

    def _publish_will(self, conn: Connection) -> None:
        session = conn.session
        if not session.will_flag or not session.will_topic:
            return
        topic = session.will_topic
        if not self._may_publish(conn, topic):
            log.info("broker.will_denied key=%s topic=%s", conn.key, topic)
            return
        data = bytes(session.will_message or b"")
        qos = session.will_qos or 0
        log.debug("broker.will key=%s topic=%s", conn.key, topic)
        self._route(conn, topic, data, qos, bool(session.will_retain))

    async def _finish(self, conn: Connection) -> None:
        self.index.remove_all(conn)
        reason = conn.close_reason or "connection_lost"
        if conn.device is not None:  # while still registered, so its will can be found
            self._apply(self.table.disconnect(conn.device, conn.epoch, time.time(), reason))
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        with contextlib.suppress(Exception):
            await conn.handler.stop()  # bounded inside
        log.debug("broker.disconnected key=%s epoch=%d reason=%s", conn.key, conn.epoch, reason)

    # ---- subscribe / publish -------------------------------------------------------------------

    def _is_current(self, conn: Connection) -> bool:
        return self._conns.get(conn.key) is conn and conn.close_reason is None

    def _may_subscribe(self, conn: Connection, topic_filter: str) -> bool:
        if conn.principal.kind == "admin":
            return True
        return self.topics.device_may_subscribe(conn.principal.name, topic_filter)

    def _may_publish(self, conn: Connection, topic: str) -> bool:
        if conn.principal.kind == "admin":
            return True
        return self.topics.device_may_publish(conn.principal.name, topic)

    async def _on_subscribe(self, conn: Connection, packet_id: int, topics: list[tuple[str, int]]) -> None:
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        for topic_filter, qos in topics:
            allowed = valid_filter(topic_filter) and self._may_subscribe(conn, topic_filter)
            if not allowed or not self._is_current(conn):
                log.info("broker.subscribe_denied key=%s filter=%s", conn.key, topic_filter)
                codes.append(SUBACK_FAILURE)
                continue
            qos = min(int(qos), 2)
            self.index.add(conn, topic_filter, qos)
            codes.append(qos)
            granted.append((topic_filter, qos))
        await conn.handler.send_raw(wire.suback(packet_id, codes))
        for topic_filter, qos in granted:
            for topic, (data, rqos) in self._retained_for(topic_filter):
                self._tasks.spawn(conn.handler.mqtt_publish(topic, data, min(qos, rqos), retain=True))

    def _retained_for(self, topic_filter: str) -> list[tuple[str, tuple[bytes, int]]]:
        if "+" not in topic_filter and "#" not in topic_filter:
            found = self.retained.get(topic_filter)
            return [(topic_filter, found)] if found else []
        return [(t, m) for t, m in self.retained.items() if filter_matches(topic_filter, t)]

    async def _on_unsubscribe(self, conn: Connection, packet_id: int, topics: list[str]) -> None:
        for topic_filter in topics:
            self.index.remove(conn, topic_filter)
        await conn.handler.send_raw(wire.unsuback(packet_id))

    def _on_publish(self, conn: Connection, topic: str, data: bytes, qos: int, retain: bool) -> bool:
        """Route one PUBLISH from a client. False means: protocol violation, close the connection."""
        if not valid_topic_name(topic) or topic.startswith("$"):
            log.info("broker.bad_topic key=%s topic=%r", conn.key, topic)
            return False
        if not self._is_current(conn):
            log.info("broker.stale_publish key=%s epoch=%d topic=%s", conn.key, conn.epoch, topic)
            return True
        if not self._may_publish(conn, topic):
            log.info("broker.publish_denied key=%s topic=%s", conn.key, topic)
            return True
        if conn.principal.kind == "device":
            if len(data) > self.limits.max_device_publish:
                log.warning("broker.publish_too_large key=%s topic=%s size=%d", conn.key, topic, len(data))
                return True
            if not conn.publishes.take(time.monotonic(), self.limits.publish_rate, self.limits.publish_burst):
                log.warning("broker.publish_rate_exceeded key=%s: closing the connection", conn.key)
                conn.close_reason = "publish_rate_exceeded"
                return False
        self._route(conn, topic, data, qos, retain)
        return True

    def _route(self, conn: Connection | None, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if conn is not None:
            self.hooks.message(conn.principal, topic, data)
        self.publish(topic, data, qos=qos, retain=retain)

    def publish(self, topic: str, data: bytes, *, qos: int = 1, retain: bool = False) -> list[asyncio.Task[Any]]:
        """Publish as the broker itself; returns one delivery task per subscriber (done when acked)."""
        if retain:
            keep_retained(self.retained, topic, data, qos)
        deliveries = []
        for conn, sub_qos in self.index.match(topic):
            if conn.started and conn.close_reason is None:
                delivery = conn.handler.mqtt_publish(topic, data, min(qos, sub_qos), retain=False)
                deliveries.append(self._tasks.spawn(delivery))
        return deliveries

    def has_subscribers(self, topic: str) -> bool:
        return next(self.index.match(topic), None) is not None

    # ---- operator actions ------------------------------------------------------------------------

    async def kick(self, device: str) -> bool:
        closes = self._apply(self.table.kick(device, time.time()))
        await self._await_closes(closes)
        return bool(closes)

    def connections(self) -> list[Connection]:
        return list(self._conns.values())

    async def start(self) -> None:
        await super().start()
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self, interval: float = SWEEP_INTERVAL) -> None:
        """Deadlines for every connection in one loop: CONNECT timeouts, keep-alive, conflict expiry.

        One periodic pass over 10,000 connections costs far less than 10,000 timers re-armed on
        every packet, and bounds the error of each deadline by ``interval``.
        """
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            mono, now = time.monotonic(), time.time()
            for writer, deadline in list(self._handshakes.items()):
                if deadline <= mono:
                    log.info("broker.connect_timeout")
                    self._handshakes.pop(writer, None)
                    if isinstance(writer, BoundedWriter):
                        writer.abort()
            for conn in list(self._conns.values()):
                if conn.started and conn.close_reason is None:
                    conn.handler.idle_too_long(now)
            ticks += 1
            if ticks % int(1 / interval) == 0:
                self._apply(self.table.tick(now))

    async def shutdown(self) -> None:
        """Stop accepting, tell every device why it goes offline, close everyone (bounded)."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        # Every device goes offline with one reason; then every socket is aborted at once and the
        # connection tasks, which have nothing left to wait for, finish together.
        self._apply(self.table.shutdown(time.time()))
        conns = list(self._conns.values())
        for conn in conns:
            conn.close_reason = conn.close_reason or "server_shutdown"
            writer = conn.writer
            if isinstance(writer, BoundedWriter):
                writer.abort()
            conn.handler._resolve(None)
        for writer in list(self._handshakes):
            if isinstance(writer, BoundedWriter):
                writer.abort()
        tasks = {c.task for c in conns if c.task is not None and not c.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        await self._tasks.cancel_all(CLOSE_TIMEOUT)
        for server in self._servers.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.close_instance(), CLOSE_TIMEOUT)
        self.transitions.shutdown()
        await self._shutdown_broadcast_loop()
        if self._session_monitor_task:
            self._session_monitor_task.cancel()
            await asyncio.gather(self._session_monitor_task, return_exceptions=True)
        await self.plugins_manager.close()
        self.transitions.stopping_success()
        log.info("broker.stopped")

