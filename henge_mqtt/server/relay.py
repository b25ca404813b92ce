"""Listener processes, the core's side: beyond the open-file limit of one process.

One process holds at most its open-file limit of sockets (20,000 here: about 18,000 devices). With
``listener_processes: N`` the device sockets live in N small processes (:mod:`.relay_process`) and
the core holds one link to each: the core binds every device port N times with ``SO_REUSEPORT``
(so the kernel spreads new connections over the processes), hands one socket of each port to each
process, and keeps its own copies, so a listener process that dies is started again on the same
sockets without the port ever closing.

Every device connection is still a :class:`~.connection.Connection` of the core, on a
:class:`RelayedTransport` instead of a socket: parsing, authentication, the session table,
takeovers across processes, keep-alive and every other limit are the core's, unchanged. What a
listener process decides alone is in its module docstring. A process that dies ends its devices'
connections at once (as a reset would; their epochs fence anything late), and is restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import ServiceUnavailable
from .connection import CLOSED, Connection
from .listener import tcp_sockets
from .relay_wire import ABORT, CLOSE, DATA, EOF, HELLO, LOST, OPEN, TRUST, LinkEnd

log = logging.getLogger(__name__)

TLS = tuple[ssl.SSLContext, tuple[str, str]]  # a TLS listener's context and its (certificate, key) files

START_TIMEOUT = 15.0  # a listener process says HELLO within this (an interpreter starting on a busy machine)
STOP_TIMEOUT = 2.0  # a listener process ends this long after its link closed, or is killed
RESTART_AFTER = (0.1, 5.0)  # first and longest wait before starting a listener process again


class Owner(Protocol):
    """The broker's side of a relayed connection: admission and a connection for each new socket."""

    def admit(self, admin_only: bool) -> bool: ...

    def refused(self, admin_only: bool, reason: str) -> None: ...

    def warn(self, event: str, fmt: str, *args: object) -> None: ...

    def new_connection(self, *, tls: bool) -> Connection: ...


class RelayedTransport(asyncio.Transport):
    """A device socket held by a listener process, as the core's connection sees it.

    No ``_extra`` dict and a few slots: this object replaces the socket, selector key and
    asyncio transport the core would otherwise hold per device. Writes are never buffered here
    (``get_write_buffer_size`` is 0): the listener process bounds what a device leaves unread.
    """

    __slots__ = ("cert", "closing", "link", "number", "peer", "protocol")

    def __init__(self, link: RelayLink, number: int, peer: tuple[str, int], protocol: Connection,
                 cert: dict[str, Any] | None = None) -> None:
        self.link = link
        self.number = number
        self.peer = peer
        self.protocol: Connection | None = protocol
        self.closing = False
        self.cert = cert  # the client certificate the listener process's handshake verified

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        return self.cert if name == "peercert" and self.cert is not None else default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.link.send(DATA, self.number, bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.closing:
            self.closing = True
            self.link.send(EOF, self.number)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.link.send(CLOSE, self.number)

    def abort(self) -> None:
        """Gone now for the core (as asyncio's abort: ``connection_lost`` on the next loop turn)."""
        if self.protocol is None or self.link.conns.get(self.number) is not self:
            return
        self.closing = True
        del self.link.conns[self.number]
        self.link.send(ABORT, self.number)
        asyncio.get_running_loop().call_soon(self.lost, "")

    def lost(self, why: str) -> None:
        protocol, self.protocol = self.protocol, None
        self.closing = True
        if protocol is not None:
            if why:
                self.link.relays.owner.warn(f"broker.{why}", "remote=%s:%d: cut off by listener process %d",
                                            self.peer[0], self.peer[1], self.link.index)
                if protocol.state != CLOSED and protocol.close_reason is None:
                    protocol.close_reason = why
            protocol.connection_lost(None)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 0, 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, Connection)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol


class RelayLink(LinkEnd):
    """The core's end of one listener process's link."""

    def __init__(self, relays: Relays, index: int) -> None:
        super().__init__(log, f"broker.listener_process_{index}")
        self.relays = relays
        self.index = index
        self.conns: dict[int, RelayedTransport] = {}
        self.hello: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        conns = self.conns
        for kind, number, payload in self.frames(data):
            if kind == DATA:
                conn = conns.get(number)
                if conn is not None and conn.protocol is not None:
                    conn.protocol.data_received(payload)
            elif kind == OPEN:
                self._open(number, payload)
            elif kind == LOST:
                conn = conns.pop(number, None)
                if conn is not None:
                    conn.lost(payload.decode("ascii", "replace"))
            elif kind == HELLO and not self.hello.done():
                self.hello.set_result(int(payload or b"0"))

    def _open(self, number: int, payload: bytes) -> None:
        owner = self.relays.owner
        if not owner.admit(False):  # the core's own bound over every listener process
            self.send(ABORT, number)
            owner.refused(False, "max_connections")
            return
        # "host port", " tls" when the listener process ended TLS, and a verified certificate's names
        opened, _, cert = payload.partition(b"\n")
        tls = opened.endswith(b" tls")
        host, _, port = opened[:-4 if tls else None].decode("utf-8", "replace").rpartition(" ")
        protocol = owner.new_connection(tls=tls)
        transport = self.conns[number] = RelayedTransport(self, number, (host, int(port or 0)), protocol,
                                                          json.loads(cert) if cert else None)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """The process ended (or the link broke, which ends it): all its devices are gone."""
        self.transport = None
        self.out.clear()
        conns, self.conns = self.conns, {}
        for conn in conns.values():
            conn.lost("")
        if not self.closed.done():
            self.closed.set_result(None)


class Relays:
    """The listener processes: started, watched, started again, stopped."""

    def __init__(self, owner: Owner, binds: Sequence[tuple[str, int, TLS | None]], count: int, *,
                 max_connections: int, max_write: int, handshake_timeout: float, client_auth: bool = False) -> None:
        self.owner = owner
        self.binds = list(binds)  # host, port, and for TLS the core's context and its (certificate, key) files
        self.client_auth = client_auth  # the TLS listeners ask for client certificates: claim CAs join them
        self.trusted: list[str] = []  # claim CAs trusted since start (PEM), in order
        self.handshake_timeout = handshake_timeout
        self.count = count
        self.max_connections = max_connections  # per process: its own file limit minus a reserve
        self.max_write = max_write
        self.sockets: list[list[socket.socket]] = []  # per process: one reuse-port socket per address
        self.tls: list[TLS | None] = []  # per socket of a process: its listener's TLS
        self.links: list[RelayLink | None] = [None] * count
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.restarts = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    def addresses(self) -> list[tuple[str, int]]:
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self.sockets[0]] if self.sockets else []

    async def start(self) -> None:
        try:
            ports = [port for _, port, _ in self.binds]
            for _ in range(self.count):
                group: list[socket.socket] = []
                first = not self.sockets
                self.sockets.append(group)
                for b, (host, _, tls) in enumerate(self.binds):
                    try:
                        made = tcp_sockets(host, ports[b], reuse_port=True)
                    except OSError as exc:
                        raise ServiceUnavailable(f"cannot listen on {host or '*'}:{ports[b]} (listener processes): "
                                                 f"{exc.strerror or exc}") from exc
                    ports[b] = made[0].getsockname()[1]  # a port asked as 0: the first process's, for all
                    group.extend(made)
                    if first:  # every process has the same sockets, in the same order
                        self.tls.extend([tls] * len(made))
            await asyncio.gather(*(self._spawn(index) for index in range(self.count)))
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.create_task(self._watch(index), name=f"henge-listener-process-{index}")
                          for index in range(self.count)]

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        fds = [s.fileno() for s in self.sockets[index]]
        # What the core's contexts trust now; a claim CA trusted from here on follows as a TRUST frame.
        trusted = len(self.trusted)
        listen = [{"fd": fd, "tls": self._tls_spec(tls)} for fd, tls in zip(fds, self.tls, strict=True)]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "henge_mqtt.server.relay_process", "--index", str(index),
                "--link", str(theirs.fileno()),
                "--max-connections", str(self.max_connections), "--max-write", str(self.max_write),
                "--handshake-timeout", str(self.handshake_timeout),
                pass_fds=(theirs.fileno(), *fds), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, start_new_session=True,  # a terminal's ^C is the core's
            )
        finally:
            theirs.close()
        self.procs[index] = proc
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(listen).encode())  # read at once, before it listens
        proc.stdin.close()
        link = RelayLink(self, index)
        ours.setblocking(False)
        await loop.connect_accepted_socket(lambda: link, ours)
        self.links[index] = link
        for pem in self.trusted[trusted:]:
            link.send(TRUST, 0, pem.encode())
        # HELLO, or the process's end (its link closes): one that cannot start is not waited for.
        await asyncio.wait((link.hello, link.closed), timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not link.hello.done():
            if link.closed.done():
                raise ServiceUnavailable(f"listener process {index} ended as it started (its log says why)")
            raise ServiceUnavailable(f"listener process {index} did not start within {START_TIMEOUT:.0f} s")
        log.info("broker.listener_process index=%d pid=%d", index, proc.pid)

    def _tls_spec(self, tls: TLS | None) -> dict[str, Any] | None:
        """A TLS listener's context as a listener process builds it again (:func:`.relay_process.tls_context`)."""
        if tls is None:
            return None
        context, files = tls
        cas = "".join(ssl.DER_cert_to_PEM_cert(der) for der in context.get_ca_certs(binary_form=True))
        return {"cert": files, "cas": cas, "verify": int(context.verify_mode), "asks": self.client_auth}

    def trust(self, pem: str) -> None:
        """A claim CA (PEM) the core's contexts trust from now on: every listener process's too."""
        if not self.client_auth:
            return
        self.trusted.append(pem)
        for link in self.links:
            if link is not None and link.transport is not None:
                link.send(TRUST, 0, pem.encode())

    async def _watch(self, index: int) -> None:
        """Start a listener process again when it ends on its own (its devices reconnect to any)."""
        wait = 0.0
        while True:
            proc, link = self.procs[index], self.links[index]
            assert proc is not None and link is not None
            started = time.monotonic()
            code = await proc.wait()
            if link.transport is not None:
                link.transport.abort()  # its devices are gone with it
            await link.closed
            if self._stopping:
                return
            # After 0.1 s; a process that keeps dying young (within 50 s) waits twice as long each time, up
            # to 5 s.
            quick = time.monotonic() - started < 10 * RESTART_AFTER[1]
            wait = min(max(wait * 2, RESTART_AFTER[0]), RESTART_AFTER[1]) if quick else RESTART_AFTER[0]
            self.restarts += 1
            log.error("broker.listener_process_exited index=%d pid=%d code=%s: starting it again in %.1f s",
                      index, proc.pid, code, wait)
            await asyncio.sleep(wait)
            while True:
                try:
                    await self._spawn(index)
                    break
                except (OSError, ServiceUnavailable) as exc:
                    log.error("broker.listener_process_start_failed index=%d error=%s", index, exc)
                    await asyncio.sleep(RESTART_AFTER[1])

    async def stop(self) -> None:
        """Close every link: each process ends, and the kernel closes its devices' sockets."""
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers = []
        for link in self.links:
            if link is not None and link.transport is not None:
                link.flush()  # the last words (a 5.0 DISCONNECT) go first
                link.transport.close()
        for index, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("broker.listener_process_killed index=%d pid=%d: it did not end", index, proc.pid)
                proc.kill()
                await proc.wait()
        for group in self.sockets:
            for sock in group:
                sock.close()
        self.sockets = []

    def stats(self) -> dict[str, int]:
        return {"listener_processes": sum(1 for p in self.procs if p is not None and p.returncode is None),
                "listener_process_restarts": self.restarts}

