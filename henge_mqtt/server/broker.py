"""The embedded MQTT server (3.1.1 and 5.0): listeners, the connection registry, routing, retained
messages.

It owns what amqtt's ``Broker`` got wrong for this job (docs/sessions.md, tests/test_stock_amqtt.py):

- authentication runs before anything else, and a refused CONNECT touches no existing session;
- the pure :class:`~henge_mqtt.sessions.SessionTable` decides takeovers and fences stale events;
- nothing of an old connection can reach a new one but what MQTT says a session holds (a device
  that asked for a persistent session gets its subscriptions and undelivered messages back,
  :mod:`.session`);
- routing costs the filters that match a topic (:mod:`.router`), never the fleet;
- every limit (:class:`.limits.Limits`) is checked before anything is acknowledged.

Everything here runs on the event loop, synchronously, in the protocol callbacks of
:class:`.connection.Connection`; the one task is the sweep that enforces every deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import codec
from ..errors import ServiceUnavailable
from ..logs import LogLimiter
from ..ports import BrokerHooks, IdentitySync, KickResult, Principal, Refusal
from ..sessions import (
    Action,
    Close,
    Emit,
    EndSession,
    PublishWill,
    SaveSession,
    SessionSettings,
    SessionTable,
    TableViews,
    take_token,
)
from .connection import CLOSED, KEEPALIVE_GRACE, OPEN, PENDING, V5, Connection
from .limits import Limits
from .listener import Acceptor, tcp_sockets, unix_socket
from .meta import Meta, meta_of
from .relay import Relays
from .router import RetainedStore, SubscriptionIndex, is_wildcard, valid_filter, valid_topic_name
from .session import Session, session_of

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25
CLOSE_TIMEOUT = 1.0
NO_LOCAL, RETAIN_AS_PUBLISHED = 0x04, 0x08


REASON_STRINGS = {
    codec.NOT_AUTHORIZED_5: "not authorized for this topic",
    codec.TOPIC_FILTER_INVALID: "invalid topic filter",
    codec.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: "shared subscriptions are not supported",
    codec.QUOTA_EXCEEDED: "payload larger than this server accepts",
    codec.PAYLOAD_FORMAT_INVALID: "the payload is not a valid report",
}


@dataclass(frozen=True, slots=True)
class Listener:
    """One place to accept devices: TCP, optionally with TLS."""

    name: str
    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    # (certificate file, key file) of a TLS listener: what a listener process loads to terminate TLS
    cert_files: tuple[str, str] | None = None


class EmbeddedBroker(TableViews):
    """Implements :class:`~henge_mqtt.ports.BrokerPort` with henge's own MQTT server (3.1.1 and 5.0)."""

    observes_deliveries = True  # every device's PUBACK reaches us

    def __init__(
        self,
        listeners: Iterable[Listener],
        *,
        hooks: BrokerHooks,
        sessions: SessionSettings | None = None,
        limits: Limits | None = None,
        admin_socket: Path | None = None,
        listener_processes: int = 0,
        process_max_connections: int = 0,
    ) -> None:
        self.listeners = list(listeners)
        # listener_processes > 0: device sockets live in that many processes (.relay), each holding at
        # most process_max_connections; the core holds the admin socket and one link per process.
        self.listener_processes = listener_processes
        self.process_max_connections = process_max_connections
        self._relays: Relays | None = None
        self.hooks = hooks
        self.limits = limits or Limits()
        self.table = SessionTable(sessions)
        # A subscriber is a connection, or the persistent session of a device that asked for one.
        self.index: SubscriptionIndex[Connection | Session] = SubscriptionIndex()
        self.sessions: dict[str, Session] = {}  # device -> its persistent session (attached or not)
        # (session present, granted expiry, assigned client id) of each connection until its CONNACK
        self._granted: dict[Connection, tuple[bool, int, str | None]] = {}
        self.retained = RetainedStore()
        self.conns: dict[str, Connection] = {}  # key (device id, or admin:client id) -> current connection
        self._handshakes: set[Connection] = set()  # accepted sockets before their CONNACK
        self._closing: dict[Connection, float] = {}  # closed politely; aborted if not gone in time
        self._sockets = 0  # TCP connections open (the file-descriptor budget)
        self._admin_sockets = 0
        self._acceptors: list[Acceptor] = []
        self._admin_socket_path = admin_socket
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._exiting = False  # stop(exiting=True): sockets are left for the kernel at exit
        self._logs = LogLimiter(log, self.limits.log_lines_per_second)
        self.refused_at_limit = 0
        # 5.0 wills with a Will Delay Interval: device -> (due, principal, will); a reconnect cancels.
        self._delayed_wills: dict[str, tuple[float, Principal, codec.Will]] = {}

    # ---- logging, rate-limited: a peer can cause a line per packet ------------------------------

    def info(self, event: str, fmt: str, *args: object) -> None:
        self._logs.log(logging.INFO, event, fmt, *args)

    def warn(self, event: str, fmt: str, *args: object) -> None:
        self._logs.log(logging.WARNING, event, fmt, *args)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        acceptors: list[Acceptor] = []
        for spec in self.listeners:
            if spec.ssl is not None and self.limits.tls_client_auth == "required":
                spec.ssl.verify_mode = ssl.CERT_REQUIRED
        try:
            for spec in self.listeners if not self.listener_processes else ():
                tls = spec.ssl is not None
                try:
                    sockets = tcp_sockets(spec.host, spec.port)
                except OSError as exc:
                    raise ServiceUnavailable(
                        f"cannot listen on {spec.host or '*'}:{spec.port} (listener {spec.name}): "
                        f"{exc.strerror or exc}") from exc
                for sock in sockets:
                    # A socket that never finishes its TLS handshake is bound by the CONNECT deadline.
                    acceptors.append(Acceptor(sock, functools.partial(Connection, self, tls=tls), self,
                                              ssl_context=spec.ssl, handshake_timeout=self.limits.connect_timeout))
            if self._admin_socket_path is not None:
                try:
                    sock = unix_socket(self._admin_socket_path)
                except OSError as exc:
                    raise ServiceUnavailable(f"cannot open the admin socket: {exc.strerror or exc}") from exc
                acceptors.append(Acceptor(sock, lambda: Connection(self, admin_only=True), self, admin_only=True))
        except BaseException:
            for acceptor in acceptors:
                acceptor.sock.close()
            raise
        if self.listener_processes:
            relays = Relays(self, [(spec.host, spec.port, (spec.ssl, spec.cert_files)
                                    if spec.ssl is not None and spec.cert_files is not None else None)
                                   for spec in self.listeners],
                            self.listener_processes, max_connections=self.process_max_connections,
                            max_write=self.limits.max_write_buffer, handshake_timeout=self.limits.connect_timeout,
                            client_auth=self.limits.tls_client_auth != "off")
            try:
                await relays.start()
            except BaseException:
                for acceptor in acceptors:
                    acceptor.sock.close()
                raise
            self._relays = relays
        self._acceptors = acceptors
        for acceptor in acceptors:
            acceptor.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="henge-sweep")

    def addresses(self) -> list[tuple[str, int]]:
        relayed = self._relays.addresses() if self._relays is not None else []
        return relayed + [address for acceptor in self._acceptors for address in acceptor.addresses()]

    def trust_client_ca(self, pem: str) -> None:
        """A CA (PEM) the listeners' TLS contexts were told to trust (a claim CA): the listener
        processes, which hold contexts of their own, trust it too."""
        if self._relays is not None:
            self._relays.trust(pem)

    def new_connection(self, *, tls: bool) -> Connection:
        """A device connection whose socket a listener process holds."""
        return Connection(self, tls=tls)

    @property
    def admin_socket(self) -> str | None:
        if self._admin_socket_path is None or not any(a.admin_only for a in self._acceptors):
            return None
        return str(self._admin_socket_path)

    async def stop(self, *, exiting: bool = False) -> None:
        """Stop accepting, tell every device why it goes offline, close everyone (bounded).

        ``exiting`` (``henge serve``, whose process ends next): the devices' sockets are left for the
        kernel to close at exit, every one at once, instead of one by one through the loop (at 10,000
        devices that was most of the loop's work in a shutdown); they are closed for
        the server all the same (nothing more is read or sent), and a 5.0 client is still told why.
        """
        self._stopping, self._exiting = True, exiting
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for acceptor in self._acceptors:
            await acceptor.close()
        self._acceptors.clear()
        actions = self.table.shutdown(time.time())
        if exiting:
            # The service hears every device go offline before the connections close (a watcher of
            # presence still hears why), so its group commit of the shutdown runs on the store's
            # thread while this loop closes them, not after. The index keeps the closed connections
            # (delivering to one sends nothing): nothing is taken out of it one filter per
            # connection when the process ends next.
            self._apply([action for action in actions if not isinstance(action, Close)])
            actions = tuple(action for action in actions if isinstance(action, Close))
        self._apply(actions)
        for conn in list(self.conns.values()) + list(self._handshakes) + list(self._closing):
            conn.close("server_shutdown", abort=True, leave=exiting)
        # Sockets closing politely (a 5.0 DISCONNECT just written) go within a few loop turns.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.5
        while self._closing and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._closing):
            if conn.transport is not None:
                conn.transport.abort()
        if self._relays is not None:
            await self._relays.stop()
            self._relays = None
        if self._admin_socket_path is not None:
            with contextlib.suppress(OSError):
                self._admin_socket_path.unlink()
        log.info("broker.stopped")

    # ---- connection lifecycle (called by Connection) ------------------------------------------

    # ---- admission (called by the Acceptors): sockets are counted from accept to connection_lost --

    def admit(self, admin_only: bool) -> bool:
        if self._stopping:
            return False
        if admin_only:
            if self._admin_sockets >= self.limits.max_admin_connections:
                return False
            self._admin_sockets += 1
        else:
            if self._sockets >= self.limits.max_connections:
                return False
            self._sockets += 1
        return True

    def refused(self, admin_only: bool, reason: str) -> None:
        self.refused_at_limit += 1
        limit = self.limits.max_admin_connections if admin_only else self.limits.max_connections
        self.warn("broker.max_connections", "limit=%d open=%d refused=%d (%s): closing new connections at once",
                  limit, self._admin_sockets if admin_only else self._sockets, self.refused_at_limit, reason)

    def adopt_failed(self, admin_only: bool, error: BaseException) -> None:
        """An admitted socket that never became a connection (a TLS handshake that failed or timed out)."""
        self._uncount(admin_only)
        self.info("broker.handshake_failed", "error=%r", error)

    def _uncount(self, admin_only: bool) -> None:
        if admin_only:
            self._admin_sockets -= 1
        else:
            self._sockets -= 1

    def on_made(self, conn: Connection) -> None:
        conn.deadline = time.monotonic() + self.limits.connect_timeout
        self._handshakes.add(conn)
        if self._stopping:
            conn.close("server_shutdown", abort=True)

    def on_lost(self, conn: Connection) -> None:
        self._closing.pop(conn, None)
        self._uncount(conn.admin_only)

    def closing(self, conn: Connection) -> None:
        self._closing[conn] = time.monotonic() + CLOSE_TIMEOUT

    def on_connect(self, conn: Connection, connect: codec.Connect) -> None:
        if connect.protocol != "MQTT" or connect.level not in (4, 5):
            if connect.protocol in ("MQTT", "MQIsdp"):
                # A level we do not speak: answered in 3.1.1 terms, which every client reads [MQTT-3.1.2-2].
                conn.refuse(codec.UNACCEPTABLE_PROTOCOL_VERSION)
            else:
                conn.close("protocol_error", abort=True)
            self.info("broker.bad_connect", "remote=%s error=protocol %s level %d", conn.remote, connect.protocol,
                      connect.level)
            return
        if connect.level == 5:
            conn.v5 = V5(connect.props)
            if connect.props and codec.AUTHENTICATION_METHOD in connect.props:
                conn.refuse(codec.NOT_AUTHORIZED, codec.BAD_AUTHENTICATION_METHOD,
                            "enhanced authentication is not supported: use a user name and password")
                return
        assigned = None
        if not connect.client_id:
            # An identity is its user name: an empty client id becomes it (as Mosquitto's
            # use_username_as_clientid), said in 5.0's Assigned Client Identifier [MQTT-3.2.2-16].
            # 3.1.1 with CleanSession 0 must be refused: no session can be named [MQTT-3.1.3-8].
            if not connect.username or (connect.level == 4 and not connect.clean_session):
                conn.refuse(codec.IDENTIFIER_REJECTED, codec.CLIENT_IDENTIFIER_NOT_VALID,
                            "an empty client identifier needs a user name (and, in 3.1.1, CleanSession 1)")
                return
            assigned = connect.username
            connect = connect._replace(client_id=assigned)
        try:
            password = connect.password.decode("utf-8") if connect.password is not None else None
        except UnicodeDecodeError:
            password = None
        cert = conn.peer_cert() if self.limits.tls_client_auth != "off" else None
        principal = self.hooks.authenticate(connect.username, password, connect.client_id, cert)
        if isinstance(principal, Refusal):
            self.info("broker.auth_failed", "client_id=%s remote=%s why=%s", connect.client_id, conn.remote,
                      principal.why)
            # 3.1.1 as always: 4 when a user name was given, else 5. 5.0 tells the two cases apart.
            code = codec.BAD_USERNAME_PASSWORD if connect.username else codec.NOT_AUTHORIZED
            if principal.why == "bad_credentials":
                conn.refuse(code, codec.BAD_USER_NAME_OR_PASSWORD, principal.text or "bad user name or password")
            elif principal.why == "rate_limited":
                conn.refuse(codec.SERVER_UNAVAILABLE, codec.CONNECTION_RATE_EXCEEDED,
                            principal.text or "connecting too often: retry later")
            else:
                conn.refuse(code, codec.NOT_AUTHORIZED_5, principal.text or
                            "not authorized: an unknown device, or a client id other than the user name")
            return
        if conn.admin_only and principal.kind != "admin":
            self.info("broker.not_admin", "client_id=%s: the admin socket is for admins only", connect.client_id)
            conn.refuse(codec.NOT_AUTHORIZED, codec.NOT_AUTHORIZED_5, "the admin socket is for the admin identity")
            return
        requested = connect.keepalive  # an int: the usual values (30, 60, 120) are objects Python shares
        keepalive: float = self.limits.max_keepalive if requested <= 0 else min(requested, self.limits.max_keepalive)
        conn.principal, conn.keepalive, conn.will = principal, keepalive, connect.will
        conn.limit = self.limits.max_packet
        if conn.v5 is not None:
            conn.v5.keepalive_capped = requested != keepalive  # told in CONNACK (Server Keep Alive)
        if principal.kind == "claim":
            # A new device asking for its identity: no session, no will, no presence; one connection
            # per nonce (a second one is refused, not a takeover: it could read the first one's answer).
            conn.key, conn.epoch, conn.will = f"claim:{connect.client_id}", 0, None
            if conn.key in self.conns:
                conn.refuse(codec.NOT_AUTHORIZED, codec.NOT_AUTHORIZED_5, "this claim nonce is in use")
                return
            self._granted[conn] = (False, 0, assigned)
            self._register(conn)
            self._open(conn)
            return
        if principal.kind == "admin":
            conn.key, conn.epoch = f"admin:{connect.client_id}", 0
            conn.limit = self.limits.admin_max_packet
            conn.max_inflight = 65_000
            conn.max_write = max(self.limits.max_write_buffer, 4 * self.limits.admin_max_packet)
            old = self.conns.get(conn.key)
            if old is not None:
                old.close("takeover")
            # An admin client's session is kept too, in memory only (a restart ends it).
            self._granted[conn] = (*self._take_session(conn.key, connect, principal), assigned)
            self._register(conn)
            self._open(conn)
            return
        device = principal.name
        now = time.time()
        old = self.conns.get(device)
        if old is not None:
            self.table.heard(device, old.epoch, old.last_heard)
        result = self.table.connect(device, now, conn.remote, keepalive)
        self._apply(result.actions)
        if not result.accepted:
            self.info("broker.refused", "device=%s reason=%s remote=%s", device, result.refusal, conn.remote)
            # A throttle is transient (3, server unavailable); a quarantine is a policy refusal (5).
            if result.refusal == "rate_limited":
                conn.refuse(codec.SERVER_UNAVAILABLE, codec.CONNECTION_RATE_EXCEEDED,
                            "connecting too often: retry later")
            else:
                conn.refuse(codec.NOT_AUTHORIZED, codec.NOT_AUTHORIZED_5,
                            "identity conflict: this device id is quarantined for a while")
            return
        present, expiry = self._take_session(device, connect, principal)
        self._granted[conn] = (present, expiry, assigned)
        conn.key, conn.epoch = device, result.epoch
        self._register(conn)
        durable = self.hooks.epochs_durable()  # never acknowledge an epoch that could be handed out again
        future = asyncio.ensure_future(durable)
        if future.done():
            self._epoch_saved(conn, future)
        else:
            future.add_done_callback(lambda f: self._epoch_saved(conn, f))

    def _register(self, conn: Connection) -> None:
        conn.state = PENDING
        self.conns[conn.key] = conn  # before any wait: a racing CONNECT must see this one to replace it

    def _epoch_saved(self, conn: Connection, future: asyncio.Future[None]) -> None:
        if conn.state != PENDING or self.conns.get(conn.key) is not conn:
            return  # replaced or closed while the epoch was being saved
        if future.cancelled() or future.exception() is not None:
            log.error("broker.epoch_not_saved device=%s error=%r", conn.key,
                      None if future.cancelled() else future.exception())
            conn.refuse(codec.SERVER_UNAVAILABLE, codec.SERVER_UNAVAILABLE_5, "server error: retry later")
            return
        self._open(conn)

    def _take_session(self, key: str, connect: codec.Connect, principal: Principal) -> tuple[bool, int]:
        """``(session present, expiry granted)`` for a connection about to be accepted: Clean Start ends
        the old session (and sends a will it held) [MQTT-3.1.2-6]; a non-zero expiry keeps one
        (new, or the one there) [MQTT-3.1.2-4]."""
        expiry = self._expiry(connect)
        session = self.sessions.get(key)
        if session is not None and connect.clean_session:
            self.end_session(key)
            session = None
        # A new connection to the session within its will delay: the will is not sent [MQTT-3.1.3-9].
        self._delayed_wills.pop(key, None)
        present = session is not None
        if session is None and expiry > 0:
            self._new_session(key, expiry, principal.kind, time.monotonic() + expiry)  # unattached until the CONNACK
        elif session is not None:
            session.expiry = expiry  # this connection's Session Expiry Interval from now on
        return present, expiry

    def _expiry(self, connect: codec.Connect) -> int:
        """The session expiry this connection gets: 5.0 asks (0 by default), 3.1.1 CleanSession 0 means
        "keep it", both bounded by ``session_expiry_max``."""
        if connect.level == 5:
            asked = (connect.props or {}).get(codec.SESSION_EXPIRY_INTERVAL, 0)
            return min(int(asked), self.limits.session_expiry_max) if isinstance(asked, int) else 0
        return 0 if connect.clean_session else self.limits.session_expiry_max

    def _open(self, conn: Connection) -> None:
        self._handshakes.discard(conn)
        present, expiry, assigned = self._granted.pop(conn, (False, 0, None))
        if conn.principal is not None and (expiry > 0 or present):
            session = self.sessions.get(conn.key)
            if session is None:  # ended while this connection waited for its epoch (kicked, say)
                present = False
                if expiry > 0:
                    session = self._new_session(conn.key, expiry, conn.principal.kind, time.monotonic() + expiry)
            if session is not None:
                conn.session = session
                # What it re-sends and what waited (each at most max_inflight) fit in flight at once.
                conn.max_inflight = max(conn.max_inflight, 2 * self.limits.max_inflight)
                if session.stored_ended:  # in the store as ended: attached again (a crash must not expire it)
                    self._save(session, None)
        props: codec.Props | None = None
        if conn.v5 is not None:
            limits = self.limits
            props = {
                codec.SESSION_EXPIRY_INTERVAL: expiry,  # as granted: bounded by session_expiry_max
                codec.RECEIVE_MAXIMUM: limits.receive_maximum,
                codec.MAXIMUM_PACKET_SIZE: conn.limit + 5,
                codec.RETAIN_AVAILABLE: 1,
                codec.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
                codec.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 0,
                codec.SHARED_SUBSCRIPTION_AVAILABLE: 0,
                codec.TOPIC_ALIAS_MAXIMUM: 0,
            }
            if conn.v5.keepalive_capped:
                props[codec.SERVER_KEEP_ALIVE] = int(conn.keepalive)
            if assigned is not None:
                props[codec.ASSIGNED_CLIENT_IDENTIFIER] = assigned
        conn.accept(props, session_present=present)

    def finish(self, conn: Connection) -> None:
        """A connection ended (closed by either side): forget it everywhere, exactly once. A
        persistent session keeps its subscriptions and what was not acknowledged, and its clock starts."""
        self._handshakes.discard(conn)
        self._granted.pop(conn, None)
        session = session_of(conn)
        if conn.subs and session is None and not self._exiting:  # (exiting: see stop)
            for topic_filter in conn.subs:
                self.index.remove(conn, topic_filter)
        conn.subs = None
        if conn.principal is None:
            return
        reason = conn.close_reason or "connection_lost"
        if conn.principal.kind == "device" and conn.epoch:
            # While still registered, so a PublishWill action can find the connection's will.
            self._apply(self.table.disconnect(conn.key, conn.epoch, time.time(), reason))
        elif conn.will is not None and reason not in ("takeover", "server_shutdown"):
            self._publish_will(conn)  # an admin client's will: on any end but its own DISCONNECT [MQTT-3.1.2-8]
        if session is not None:
            conn.session = None
            if session.conn is conn:
                session.wild = conn.wild
                session.detach(conn, time.monotonic())
                if session.expiry <= 0:
                    self.end_session(session.device)
                else:
                    self._save(session, time.time())
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        log.debug("broker.disconnected key=%s epoch=%d reason=%s", conn.key, conn.epoch, reason)

    def _apply(self, actions: Iterable[Action]) -> None:
        """Carry out the session table's I/O actions; hand the rest to the service."""
        forward: list[Action] = []
        for action in actions:
            if isinstance(action, Close):
                conn = self.conns.get(action.device)
                if conn is not None and conn.epoch == action.epoch and conn.state != CLOSED:
                    conn.close_reason = action.reason
                    if action.publish_will:
                        self._publish_will(conn)
                    conn.will = None
                    shutdown = action.reason == "server_shutdown"
                    conn.close(action.reason, abort=shutdown, leave=shutdown and self._exiting)
            elif isinstance(action, PublishWill):
                conn = self.conns.get(action.device)
                if conn is not None and conn.epoch == action.epoch:
                    self._publish_will(conn)
            else:
                forward.append(action)
        if forward:
            self.hooks.session_actions(forward)

    def _publish_will(self, conn: Connection) -> None:
        will, conn.will = conn.will, None
        if will is None or conn.principal is None:
            return
        if not valid_topic_name(will.topic) or not self.hooks.may_publish(conn.principal, will.topic):
            self.info("broker.will_denied", "key=%s topic=%s", conn.key, will.topic)
            return
        delay = will.props.get(codec.WILL_DELAY_INTERVAL) if will.props else None
        # The will goes at the earlier of its delay and the session's end [MQTT-3.1.3-9]: at once when
        # the session ends with the connection (Session Expiry 0).
        if isinstance(delay, int):
            delay = min(delay, conn.session.expiry if conn.session is not None else 0)
            if delay > 0:  # published later unless the client connects to its session again first
                self._delayed_wills[conn.key] = (time.monotonic() + delay, conn.principal, will)
                return
        self._send_will(conn.principal, will)

    def _send_will(self, principal: Principal, will: codec.Will) -> None:
        self.hooks.message(principal, will.topic, will.message)
        self.publish(will.topic, will.message, qos=will.qos, retain=will.retain,
                     props={k: v for k, v in will.props.items() if k != codec.WILL_DELAY_INTERVAL}
                     if will.props else None)

    # ---- packets (called by Connection) ----------------------------------------------------------

    def charge(self, conn: Connection) -> bool:
        """One packet against the device's rate (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, and
        acknowledgements of nothing); False, and the connection closed, when over it."""
        if conn.principal is None or conn.principal.kind == "admin":
            return True
        taken, conn.rate_full_at = take_token(conn.rate_full_at, time.monotonic(), self.limits.publish_rate,
                                              self.limits.publish_burst)
        if taken:
            return True
        self.warn("broker.publish_rate_exceeded", "key=%s: closing the connection", conn.key)
        conn.close("publish_rate_exceeded", abort=True)
        return False

    def on_publish(self, conn: Connection, packet: codec.Publish) -> None:
        assert conn.principal is not None
        topic, qos, props = packet.topic, packet.qos, packet.props
        if props:
            if codec.TOPIC_ALIAS in props:  # we announce Topic Alias Maximum 0 [MQTT-3.2.2-17]
                conn.close("protocol_error", abort=True, code=codec.TOPIC_ALIAS_INVALID)
                return
            if codec.SUBSCRIPTION_IDENTIFIER in props:  # only a server sends it [MQTT-3.3.4-6]
                conn.close("protocol_error", abort=True)
                return
            response = props.get(codec.RESPONSE_TOPIC)
            if isinstance(response, str) and not valid_topic_name(response):
                conn.close("protocol_error", abort=True)  # [MQTT-3.3.2-14]
                return
        if not valid_topic_name(topic):  # a wildcard in a topic name breaks the protocol [MQTT-3.3.2-2]
            self.info("broker.bad_topic", "key=%s topic=%r", conn.key, topic)
            conn.close("protocol_error", abort=True, code=codec.TOPIC_NAME_INVALID)
            return
        if not self.charge(conn):
            return
        device = conn.principal.kind != "admin"  # a device's limits: devices and claims
        version = conn.version
        if qos == 2:
            in_qos2 = conn.in_qos2
            if in_qos2 is None:
                in_qos2 = conn.in_qos2 = {}
            assert packet.packet_id is not None
            if packet.packet_id in in_qos2:  # a retransmission: acknowledged, not delivered twice
                conn.send(codec.pubrec(packet.packet_id, version=version))
                return
            if (device or conn.v5 is not None) and len(in_qos2) >= self.limits.receive_maximum:
                self.warn("broker.receive_maximum", "key=%s: %d QoS 2 publishes without PUBREL", conn.key,
                          len(in_qos2))
                # 5.0 names this one exactly: we announced the Receive Maximum [MQTT-3.3.4-8].
                conn.close("quota_exceeded", abort=True, code=codec.RECEIVE_MAXIMUM_EXCEEDED)
                return
        reason = codec.SUCCESS
        if topic.startswith("$"):  # a valid name, but the server's own (§4.7.2): refused, the connection kept
            reason = codec.TOPIC_NAME_INVALID
            self.info("broker.publish_denied", "key=%s topic=%s", conn.key, topic)
        elif not self.hooks.may_publish(conn.principal, topic):
            reason = codec.NOT_AUTHORIZED_5
            self.info("broker.publish_denied", "key=%s topic=%s", conn.key, topic)
        elif device and len(packet.payload) > self.limits.max_device_publish:
            reason = codec.QUOTA_EXCEEDED
            self.warn("broker.publish_too_large", "key=%s topic=%s size=%d", conn.key, topic, len(packet.payload))
        elif self.conns.get(conn.key) is not conn:
            reason = codec.NOT_AUTHORIZED_5
            self.info("broker.stale_publish", "key=%s epoch=%d topic=%s", conn.key, conn.epoch, topic)
        if reason == codec.SUCCESS:
            reason = self.hooks.message(conn.principal, topic, packet.payload)
        if reason == codec.SUCCESS:
            self.publish(topic, packet.payload, qos=min(qos, 1), retain=packet.retain, props=props, origin=conn)
        # Acknowledged after every check; 3.1.1 has no negative acknowledgement, 5.0 says why.
        if qos == 1:
            assert packet.packet_id is not None
            conn.send(codec.puback(packet.packet_id, reason, self._why(conn, reason), version))
        elif qos == 2 and conn.state == OPEN:
            assert packet.packet_id is not None and conn.in_qos2 is not None
            if reason < 0x80 or version == 4:  # a 5.0 refusal in PUBREC ends the flow [MQTT-4.3.3-*]
                conn.in_qos2[packet.packet_id] = time.monotonic()  # delivered now; PUBREL only releases the id
            conn.send(codec.pubrec(packet.packet_id, reason, self._why(conn, reason), version))

    @staticmethod
    def _why(conn: Connection, reason: int, text: str | None = None) -> codec.Props | None:
        """A short Reason String for a 5.0 client that did not ask us to keep problems to ourselves.
        A `$` topic refused says it by its code alone (0x90 is plain; and a bare acknowledgement is
        what clients that read no properties on acks, Eclipse Paho's test client among them, expect)."""
        if reason < 0x80 or conn.v5 is None or not conn.v5.problem_info or reason == codec.TOPIC_NAME_INVALID:
            return None
        return {codec.REASON_STRING: text or REASON_STRINGS.get(reason, "refused")}

    def on_subscribe(self, conn: Connection, packet: codec.Subscribe) -> None:
        assert conn.principal is not None
        device = conn.principal.kind != "admin"  # a device's limits: devices and claims
        if device and len(packet.filters) > self.limits.max_filters_per_subscribe:
            self.warn("broker.too_many_filters", "key=%s filters=%d", conn.key, len(packet.filters))
            conn.close("quota_exceeded", abort=True)
            return
        if packet.props and codec.SUBSCRIPTION_IDENTIFIER in packet.props:
            # We announce Subscription Identifiers Available 0 [MQTT-3.8.2-* / 0xA1].
            conn.close("protocol_error", abort=True, code=0xA1)
            return
        if not self.charge(conn):
            return
        subs = conn.subs
        if subs is None:
            subs = conn.subs = {}
        v5 = conn.v5 is not None
        codes: list[int] = []
        granted: list[tuple[str, int, bool]] = []
        for topic_filter, options in packet.filters:
            wild = is_wildcard(topic_filter)
            code = -1
            if v5 and topic_filter.startswith("$share/"):
                code = codec.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            elif not valid_filter(topic_filter):
                code = codec.TOPIC_FILTER_INVALID
            elif not self.hooks.may_subscribe(conn.principal, topic_filter):
                code = codec.NOT_AUTHORIZED_5
            elif device and topic_filter not in subs:
                if len(subs) >= self.limits.max_subscriptions:
                    code = codec.QUOTA_EXCEEDED
                    self.warn("broker.max_subscriptions", "key=%s limit=%d", conn.key, self.limits.max_subscriptions)
                elif wild and conn.wild >= self.limits.max_wildcard_subscriptions:
                    code = codec.QUOTA_EXCEEDED
                    self.warn("broker.max_wildcard_subscriptions", "key=%s limit=%d", conn.key,
                              self.limits.max_wildcard_subscriptions)
            if code >= 0:
                self.info("broker.subscribe_denied", "key=%s filter=%s", conn.key, topic_filter)
                codes.append(code if v5 else codec.SUBACK_FAILURE)
                continue
            qos = min(options & 3, 1)  # henge delivers at most QoS 1
            is_new = topic_filter not in subs
            if is_new and wild:
                conn.wild += 1
            stored = qos | (options & (NO_LOCAL | RETAIN_AS_PUBLISHED) if v5 else 0)
            subs[topic_filter] = stored
            self.index.add(session_of(conn) or conn, topic_filter, stored)
            codes.append(qos)
            handling = (options >> 4) & 3 if v5 else 0  # Retain Handling: 0 always, 1 if new, 2 never
            if handling == 0 or (handling == 1 and is_new):
                granted.append((topic_filter, qos, True))
        refused = [c for c in codes if c >= 0x80]
        why = None
        if refused and v5:
            why = self._why(conn, refused[0], "subscription limit reached"
                            if refused[0] == codec.QUOTA_EXCEEDED else None)
        conn.send(codec.suback(packet.packet_id, codes, why, version=conn.version))
        session = session_of(conn)
        if session is not None and any(code < 0x80 for code in codes):
            self._save(session, None)  # its subscriptions outlive this connection, and a restart
        now = time.monotonic()
        for topic_filter, qos, _ in granted:  # retained messages of this filter, to this subscriber only
            for topic, data, rqos, extra in list(self.retained.matching(topic_filter)):
                props = extra if isinstance(extra, bytes) else None
                if isinstance(extra, Meta):
                    props = extra.encoded(now)
                    if props is None:  # expired: gone for everyone
                        self.retained.clear(topic)
                        continue
                conn.deliver(topic, data, min(qos, rqos), True, False, props)

    def on_unsubscribe(self, conn: Connection, packet: codec.Unsubscribe) -> None:
        if not self.charge(conn):
            return
        subs = conn.subs
        codes: list[int] = []
        for topic_filter in packet.filters:
            if subs is not None and subs.pop(topic_filter, None) is not None:
                self.index.remove(session_of(conn) or conn, topic_filter)
                if is_wildcard(topic_filter):
                    conn.wild -= 1
                codes.append(codec.SUCCESS)
            else:
                codes.append(codec.NO_SUBSCRIPTION_EXISTED)
        conn.send(codec.unsuback(packet.packet_id, codes, version=conn.version))
        session = session_of(conn)
        if session is not None and codec.SUCCESS in codes:
            self._save(session, None)

    def too_large_for_client(self, conn: Connection, topic: str, size: int) -> None:
        """A message over the client's own Maximum Packet Size was not sent to it: say so."""
        self.warn("broker.too_large_for_client", "key=%s topic=%s size=%d", conn.key, topic, size)
        if conn.principal is not None and conn.principal.kind == "device":
            self.hooks.session_actions([Emit("delivery_too_large", conn.key, (("topic", topic), ("size", size)))])

    # ---- the port: what the service asks --------------------------------------------------------

    def publish(self, topic: str, data: bytes, *, qos: int = 1, retain: bool = False, track: bool = False,
                props: codec.Props | None = None, origin: Connection | None = None,
                for_device: str | None = None) -> list[asyncio.Future[None]]:
        """Route a message to its subscribers (and keep it, if retained). ``props``: its 5.0 properties
        (for 5.0 subscribers only); ``origin``: the connection it came from (for No Local)."""
        meta = meta_of(props, time.monotonic()) if props else None
        if retain:
            self.retained.set(topic, data, qos, meta)
        encoded = meta.encoded(time.monotonic()) if isinstance(meta, Meta) else meta
        futures: list[asyncio.Future[None]] = []
        for sub, options in self.index.match(topic).items():
            if options & NO_LOCAL and (sub.conn if sub.__class__ is Session else sub) is origin:
                continue  # [MQTT-3.8.3-3]
            keep_retain = retain and bool(options & RETAIN_AS_PUBLISHED)
            mine = for_device is None or (sub.key == for_device and sub.principal is not None
                                          and sub.principal.kind == "device")
            if sub.__class__ is Session:
                future = sub.deliver(topic, data, min(qos, options & 3), keep_retain, track and mine, encoded,
                                     retained=retain, meta=meta if isinstance(meta, Meta) else None)
            else:
                future = sub.deliver(topic, data, min(qos, options & 3), keep_retain, track and mine, encoded)
            if future is not None:
                futures.append(future)
        return futures

    def clear_retained(self, topic: str) -> None:
        self.retained.clear(topic)

    def has_subscribers(self, topic: str) -> bool:
        return bool(self.index.match(topic))

    async def kick(self, device: str) -> KickResult:
        actions = self.table.kick(device, time.time())
        self._apply(actions)
        self.end_session(device)  # an operator's kick ends the session too: the device starts afresh
        return KickResult(kicked=any(isinstance(a, Close) for a in actions))

    def forget(self, device: str) -> None:
        self.table.forget(device)
        self.end_session(device)

    # ---- persistent sessions ----------------------------------------------------------------------

    def end_session(self, device: str) -> None:
        """The session ends: its subscriptions, messages and will timer go, now (and from the store)."""
        session = self.sessions.pop(device, None)
        if session is None:
            return
        for topic_filter in session.subs:
            self.index.remove(session, topic_filter)
        conn = session.conn
        if conn is not None:  # ended under an attached connection: it goes on without a session
            conn.session = None
            conn.subs = dict(session.subs)
            for topic_filter, options in conn.subs.items():
                self.index.add(conn, topic_filter, options)
        session.subs, session.queued, session.unacked, session.conn = {}, None, None, None
        delayed = self._delayed_wills.pop(device, None)
        if delayed is not None:  # the will goes when the session ends, if its delay has not run out
            self._send_will(delayed[1], delayed[2])
        if session.kind == "device":
            self.hooks.session_actions([EndSession(device)])

    def _new_session(self, key: str, expiry: int, kind: Literal["device", "admin", "claim"],
                     ends_at: float) -> Session:
        """A session with no connection yet (it ends at ``ends_at``, monotonic, unless one attaches)."""
        session = self.sessions[key] = Session(key, expiry, self.limits.max_inflight, kind)
        session.ends_at = ends_at
        return session

    def _save(self, session: Session, ended_at: float | None) -> None:
        """Keep the session in the store (a new one with no subscription yet need not be: nothing of it
        would survive that a restart could use)."""
        session.stored_ended = ended_at is not None
        if session.kind != "device":
            return  # an admin client's session is in memory only
        self.hooks.session_actions([SaveSession(session.device, session.expiry, tuple(session.subs.items()),
                                                ended_at)])

    def restore_sessions(self, sessions: list[tuple[str, int, list[tuple[str, int]], float | None]]) -> None:
        """The persistent sessions the store kept (a restart ends no session): offline until their
        devices connect, queuing what is published for them meanwhile (the republished configs)."""
        mono, now = time.monotonic(), time.time()
        for device, expiry, subs, ended_at in sessions:
            left = expiry - (now - (ended_at if ended_at is not None else now))
            if left <= 0:
                self.hooks.session_actions([EndSession(device)])
                continue
            session = self._new_session(device, expiry, "device", mono + left)
            session.stored_ended = True
            for topic_filter, options in subs:
                session.subs[topic_filter] = options
                session.wild += is_wildcard(topic_filter)
                self.index.add(session, topic_filter, options)

    def persistent_session(self, device: str, now: float) -> tuple[int, float | None] | None:
        session = self.sessions.get(device)
        if session is None:
            return None
        ends = None if session.ends_at is None else now + (session.ends_at - time.monotonic())
        return session.expiry, ends

    async def sync_identities(self, *, created: dict[str, str] | None = None, changed: dict[str, str] | None = None,
                              removed: list[str] | None = None, claims: dict[str, str] | None = None,
                              claims_removed: list[str] | None = None) -> IdentitySync:
        return IdentitySync(applied=True, how="store")  # CONNECT is checked against the store itself

    def clear_conflict(self, device: str) -> bool:
        actions = self.table.clear_conflict(device)
        self._apply(actions)
        return bool(actions)

    def stats(self) -> dict[str, int]:
        return {
            "sockets": self._sockets,
            "admin_sockets": self._admin_sockets,
            "connections": len(self.conns),
            "handshakes": len(self._handshakes),
            "subscriptions": len(self.index),
            "retained": len(self.retained),
            "refused_at_limit": self.refused_at_limit,
            **(self._relays.stats() if self._relays is not None else {}),
        }

    # ---- deadlines --------------------------------------------------------------------------

    def _full_pass(self, mono: float, now: float) -> list[Connection]:
        """Once a second, every open connection: what is overdue (keep-alive, PUBACK, PUBREL) is
        ended, and those whose keep-alive runs out before the next pass are returned, to be checked
        on every tick until then (keep-alive stays within a tick of 1.5 x; the rest within a second).

        At 50,000 connections a pass over all of them on every tick was half of the event loop's
        time during a fleet push (py-spy): now it is one pass a second, a method call only for a
        connection with something overdue.
        """
        soon: list[Connection] = []
        horizon = now + 1.0 + SWEEP_INTERVAL
        puback, pubrel = self.limits.puback_timeout, self.limits.pubrel_timeout
        for conn in list(self.conns.values()):
            if conn.state != OPEN:
                continue
            out = conn.out
            due = conn.last_heard + conn.keepalive * KEEPALIVE_GRACE
            if due < now or conn.in_qos2 or (out and mono - next(iter(out.values()))[0] >= puback):
                conn.expire(mono, now, puback, pubrel)
                if conn.state != OPEN:
                    continue
            if due < horizon:
                soon.append(conn)
        return soon

    async def _sweep(self) -> None:
        """Every deadline of every connection in one loop: CONNECT, keep-alive, PUBACK, PUBREL, close.

        A tick four times a second costs far less than a timer per connection re-armed on every
        packet: handshakes, closing sockets, wills and the keep-alives about to run out on every
        tick, every open connection once a second (:meth:`_full_pass`).
        """
        ticks = 0
        limits = self.limits
        per_second = int(1 / SWEEP_INTERVAL)
        soon: list[Connection] = []  # keep-alive deadlines before the next full pass
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            mono, now = time.monotonic(), time.time()
            for conn in list(self._handshakes):
                conn.expire(mono, now, limits.puback_timeout, limits.pubrel_timeout)
            if ticks % per_second == 0:
                soon = self._full_pass(mono, now)
            else:
                for conn in soon:
                    if conn.state == OPEN and now - conn.last_heard > conn.keepalive * KEEPALIVE_GRACE:
                        conn.close("keepalive_timeout", abort=True)
            for device, (due, principal, will) in list(self._delayed_wills.items()):
                if due <= mono:
                    del self._delayed_wills[device]
                    self._send_will(principal, will)
            if ticks % per_second == 0:
                for device in [d for d, s in self.sessions.items() if s.ends_at is not None and s.ends_at <= mono]:
                    self.end_session(device)  # expired [MQTT-3.1.2-23]
            for conn, deadline in list(self._closing.items()):
                if deadline <= mono:
                    self._closing.pop(conn, None)
                    if conn.transport is not None:
                        conn.transport.abort()
            ticks += 1
            if ticks % per_second == 0:
                self._apply(self.table.tick(now))
