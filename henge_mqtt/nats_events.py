"""NATS's connection events, read as henge's restricted system user: presence for plain clients.

A small client of the NATS protocol (text lines: ``INFO``, ``CONNECT``, ``SUB``, ``PUB``, ``MSG``,
``PING``/``PONG``), enough for one job: subscribe to ``$SYS.ACCOUNT.<acc>.CONNECT`` and
``.DISCONNECT`` and ask every node for its connections (``$SYS.REQ.ACCOUNT.<acc>.CONNZ``, paged), on
every (re)connection and every ``resync`` seconds; and, for the accounts file's reloads, ask every
node when it last loaded its configuration (``$SYS.REQ.SERVER.PING.VARZ``). It hands
:class:`BrokerConnection` values to the :class:`~henge_mqtt.broker_events.ConnectionTracker`
through callbacks; it never logs an event's body (NATS puts the client's credentials in its ``jwt``
field).

Bounds: a line or a message over ``MAX_MESSAGE`` ends the connection (a CONNZ page of 1,000
connections is about 400 KB); every network wait has a timeout; the reader is one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from .backoff import Backoff
from .broker_events import BrokerConnection
from .errors import SettingsError

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
PAGE = 1000  # connections per CONNZ answer (about 400 KB: under NATS's default max_payload of 1 MB)
ANSWER_QUIET = 0.5  # a page's answers are complete once none came for this long (each node answers once),
# or at once when every node of the last snapshot (the first: of its first page) has answered it: a quiet
# wait per page was 5 s of a 10,000-device snapshot, the presence a new active instance has to find
ANSWER_MAX = 5.0
PING_EVERY = 20.0
TIMEOUT = 10.0


def parse_events_url(url: str) -> list[tuple[str, int]]:
    """``nats://host:port[,host:port...]``: the nodes to try, in order."""
    parts = urlsplit(url)
    if parts.scheme != "nats" or not parts.netloc:
        raise SettingsError(f"invalid events URL {url!r}: expected nats://host:port[,host:port...]")
    out = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "4222"
        if not host or not port.isdigit():
            raise SettingsError(f"invalid node {item!r} in {url!r}: expected host:port")
        out.append((host, int(port)))
    return out


def _connection(server: str, info: dict[str, Any]) -> BrokerConnection | None:
    """From a CONNZ entry or an event's ``client``: only MQTT clients count."""
    cid = info.get("cid", info.get("id"))
    client_id = info.get("mqtt_client", info.get("client_id"))
    if not isinstance(cid, int) or not isinstance(client_id, str):
        return None
    user = info.get("authorized_user", info.get("user"))
    host, port = info.get("ip", info.get("host")), info.get("port")
    remote = f"{host}:{port}" if host and port else (str(host) if host else None)
    return BrokerConnection(f"{server}/{cid}", user if isinstance(user, str) else None, client_id, remote,
                            str(info.get("start", "")))


@dataclass(slots=True)
class Snapshot:
    """The answers to one CONNZ round: each node's connections, page by page."""

    connections: list[BrokerConnection] = field(default_factory=list)
    servers: set[str] = field(default_factory=set)
    more: set[str] = field(default_factory=set)  # servers with another page to fetch
    last: float = 0.0
    expected: frozenset[str] = frozenset()  # the nodes that answered the last snapshot
    answered: set[str] = field(default_factory=set)  # the nodes that answered this page
    offset: int = 0  # this page's (answers to another are late: ignored)
    page_done: asyncio.Event = field(default_factory=asyncio.Event)  # every expected node answered it


@dataclass
class LoadTimes:
    """The answers to one VARZ round: each node's configuration load time."""

    got: dict[str, str] = field(default_factory=dict)
    last: float = field(default_factory=time.monotonic)  # the request, then the latest answer
    done: asyncio.Event = field(default_factory=asyncio.Event)  # every node of the last snapshot answered


class Listener(Protocol):
    """Who hears the events (the external broker, which feeds its connection tracker)."""

    def broker_connected(self, conn: BrokerConnection) -> None: ...

    def broker_disconnected(self, key: str, reason: str) -> None: ...

    def snapshot_begins(self) -> None:
        """A snapshot was just requested: events heard from now on are newer than it."""
        ...

    def snapshot(self, connections: list[BrokerConnection], servers: set[str]) -> None:
        """Every MQTT connection of the nodes in ``servers`` (the nodes that answered)."""
        ...


async def _answered(done: asyncio.Event, last: Callable[[], float], quiet: Callable[[], float]) -> None:
    """Until ``done`` (every node expected has answered), ``quiet()`` seconds without an answer since
    ``last()``, or ``ANSWER_MAX``: each node answers a request to all of them once."""
    deadline = time.monotonic() + ANSWER_MAX
    while not done.is_set() and time.monotonic() < deadline:
        left = quiet() - (time.monotonic() - last())
        if left <= 0:
            return
        with contextlib.suppress(TimeoutError):  # a tick of the quiet clock, not a failure
            await asyncio.wait_for(done.wait(), min(left, 0.05))


class NatsEvents:
    """Connects to the first node that answers, as ``user``; reconnects with backoff."""

    def __init__(self, url: str, *, user: str, password: str, account: str, listener: Listener,
                 resync: float = 15.0) -> None:
        self.nodes = parse_events_url(url)
        self.user, self.password, self.account = user, password, account
        self.listener = listener
        self.resync = resync
        self.backoff = Backoff(base=0.5, cap=10.0)
        self.connected = asyncio.Event()
        self.snapshots = 0  # completed snapshots (tests wait on it)
        self.last_snapshot_s = 0.0  # how long the last one took, from the first request to the last answer
        self._writer: asyncio.StreamWriter | None = None
        self._inbox = f"_INBOX.henge.{secrets.token_hex(8)}"
        self._snapshot: Snapshot | None = None
        self._servers: frozenset[str] = frozenset()  # the nodes that answered the last snapshot
        self._pong: asyncio.Event = asyncio.Event()
        self._varz: dict[str, LoadTimes] = {}  # a VARZ round's token -> its answers
        self._rounds = 0

    async def run(self) -> None:
        turn = 0
        while True:
            host, port = self.nodes[turn % len(self.nodes)]
            turn += 1
            try:
                await self._session(host, port)
            except* (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError) as group:
                exc = group.exceptions[0]
                log.warning("nats_events.disconnected node=%s:%d error=%s", host, port, exc or type(exc).__name__)
            finally:
                self.connected.clear()
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            await asyncio.sleep(self.backoff.next_delay())

    async def _session(self, host: str, port: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE)
            self._writer = writer
            info = await reader.readline()
            if not info.startswith(b"INFO "):
                raise ConnectionError(f"not a NATS server: {info[:40]!r}")
            connect = {"user": self.user, "pass": self.password, "verbose": False, "pedantic": False,
                       "name": "henge-events", "lang": "python", "version": "1", "protocol": 1, "headers": False}
            acc = self.account
            writer.write(f"CONNECT {json.dumps(connect)}\r\n"
                         f"SUB $SYS.ACCOUNT.{acc}.CONNECT 1\r\nSUB $SYS.ACCOUNT.{acc}.DISCONNECT 2\r\n"
                         f"SUB {self._inbox}.* 3\r\nPING\r\n".encode())
            await writer.drain()
            while True:  # the first PONG says CONNECT was accepted (an error comes as -ERR before it)
                line = await reader.readline()
                if line.startswith(b"-ERR"):
                    raise ConnectionError(line.decode(errors="replace").strip())
                if line.startswith(b"PONG"):
                    break
        log.info("nats_events.connected node=%s:%d", host, port)
        self.backoff.reset()
        self.connected.set()
        async with asyncio.TaskGroup() as tasks:  # the reader ends only by raising, which ends the ticker too
            tasks.create_task(self._read(reader))
            tasks.create_task(self._tick(writer))

    async def _tick(self, writer: asyncio.StreamWriter) -> None:
        """A snapshot now, then keep-alive pings and a snapshot every ``resync`` seconds."""
        next_sync = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sync:
                await self._take_snapshot(writer)
                next_sync = time.monotonic() + self.resync
            self._pong.clear()
            writer.write(b"PING\r\n")
            await writer.drain()
            try:
                await asyncio.wait_for(self._pong.wait(), TIMEOUT)
            except TimeoutError:
                writer.close()  # the reader sees the end
                return
            await asyncio.sleep(min(PING_EVERY, max(0.0, next_sync - time.monotonic())))

    async def _take_snapshot(self, writer: asyncio.StreamWriter) -> None:
        snap = Snapshot(expected=self._servers)
        started = time.monotonic()
        self._snapshot = snap
        self.listener.snapshot_begins()
        offset = 0
        while True:
            snap.more.clear()
            snap.answered.clear()
            snap.page_done.clear()
            snap.offset = offset
            snap.last = time.monotonic()
            body = json.dumps({"offset": offset, "limit": PAGE, "auth": True}).encode()  # auth: the user names
            writer.write(b"PUB $SYS.REQ.ACCOUNT.%s.CONNZ %s.%d %d\r\n%s\r\n" % (
                self.account.encode(), self._inbox.encode(), offset, len(body), body))
            await writer.drain()
            await _answered(snap.page_done, lambda: snap.last, lambda: ANSWER_QUIET)
            if not snap.more:
                break
            if not snap.expected:  # the first snapshot: the nodes that answered its first page
                snap.expected = frozenset(snap.answered)
            offset += PAGE
        self._snapshot = None
        self._servers = frozenset(snap.servers)
        self.last_snapshot_s = time.monotonic() - started
        self.snapshots += 1
        log.log(logging.INFO if self.snapshots == 1 else logging.DEBUG,
                "nats_events.snapshot connections=%d nodes=%d took=%.3fs", len(snap.connections), len(snap.servers),
                self.last_snapshot_s)
        self.listener.snapshot(snap.connections, snap.servers)

    async def load_times(self) -> dict[str, str]:
        """Each node's ``config_load_time`` (VARZ, asked of every node through the system account):
        how the accounts' owner learns that a reload hook's signal has been acted on, node by node.
        The round ends when every node of the last snapshot has answered, after ``ANSWER_QUIET`` of
        quiet, or at ``ANSWER_MAX``; not connected: no answers (``{}``)."""
        writer = self._writer
        if writer is None or not self.connected.is_set():
            return {}
        self._rounds += 1
        token = f"varz{self._rounds}"
        round_ = self._varz[token] = LoadTimes()
        try:
            writer.write(b"PUB $SYS.REQ.SERVER.PING.VARZ %s.%s 0\r\n\r\n" % (self._inbox.encode(), token.encode()))
            await writer.drain()
            # (no answer at all waits twice as long: an accounts file from before henge asked VARZ refuses it)
            await _answered(round_.done, lambda: round_.last, lambda: ANSWER_QUIET if round_.got else 2 * ANSWER_QUIET)
        finally:
            del self._varz[token]
        return dict(round_.got)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        writer = self._writer
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the node closed the connection")
            if line.startswith(b"MSG "):
                parts = line.split()
                size = int(parts[-1])
                if size > MAX_MESSAGE:
                    raise ConnectionError(f"a message of {size} bytes")
                data = await reader.readexactly(size + 2)
                self._message(parts[1].decode(), data[:-2])
            elif line.startswith(b"PING"):
                if writer is not None:
                    writer.write(b"PONG\r\n")
            elif line.startswith(b"PONG"):
                self._pong.set()
            elif line.startswith(b"-ERR"):
                log.warning("nats_events.error said=%s", line.decode(errors="replace").strip()[:200])

    def _message(self, subject: str, data: bytes) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            log.info("nats_events.bad_message subject=%s", subject)
            return
        if not isinstance(body, dict):
            return
        if subject.startswith(self._inbox):
            self._answer(subject[len(self._inbox) + 1:], body)
            return
        server = (body.get("server") or {}).get("id")
        client = body.get("client")
        if not isinstance(server, str) or not isinstance(client, dict) or client.get("client_type") != "mqtt":
            return
        conn = _connection(server, client)
        if conn is None:
            return
        if subject.endswith(".CONNECT"):
            self.listener.broker_connected(conn)
        elif subject.endswith(".DISCONNECT"):
            reason = body.get("reason")
            self.listener.broker_disconnected(conn.key, reason if isinstance(reason, str) else "")

    def _answer(self, page: str, body: dict[str, Any]) -> None:
        snap = self._snapshot
        data = body.get("data")
        server = (body.get("server") or {}).get("id")
        if page in self._varz:
            round_ = self._varz[page]
            loaded = data.get("config_load_time") if isinstance(data, dict) else None
            if isinstance(server, str) and isinstance(loaded, str):
                round_.got[server] = loaded
                round_.last = time.monotonic()
                if self._servers and self._servers <= round_.got.keys():
                    round_.done.set()
            return
        if snap is None or not isinstance(data, dict) or not isinstance(server, str) or page != str(snap.offset):
            return
        snap.last = time.monotonic()
        snap.servers.add(server)
        snap.answered.add(server)
        if snap.expected and snap.expected <= snap.answered:
            snap.page_done.set()
        for entry in data.get("connections") or []:
            if isinstance(entry, dict) and entry.get("type") == "mqtt":
                conn = _connection(server, entry)
                if conn is not None:
                    snap.connections.append(conn)
        total, offset, limit = data.get("total", 0), data.get("offset", 0), data.get("limit", PAGE)
        if isinstance(total, int) and isinstance(offset, int) and isinstance(limit, int) and offset + limit < total:
            snap.more.add(server)
