"""Listening sockets with our own accept loop, bounded by ``max_connections``.

asyncio's accept loop (CPython 3.11) keeps calling ``accept()`` after "too many open files" within
the same tick, scheduling a retry per failure: at the file limit a server spins at 100 % CPU and
logs a traceback per attempt. This one admits a connection only while the server has room for it
(``Admission``), closes the rest at once, and on a resource error stops reading the listening
socket for a moment instead of spinning. Admitted sockets are handed to asyncio with the public
``loop.connect_accepted_socket`` (TLS handshake bounded by the CONNECT deadline).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

ACCEPT_BATCH = 128  # connections accepted per readiness event: the loop stays responsive in a storm
RETRY_AFTER = 0.5  # seconds without accepting after a resource error
BACKLOG = 4096  # a fleet reconnects all at once after a restart
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Admission(Protocol):
    """The server's side of accepting: room for one more, and what to do when there is none."""

    def admit(self, admin_only: bool) -> bool: ...

    def refused(self, admin_only: bool, reason: str) -> None: ...

    def adopt_failed(self, admin_only: bool, error: BaseException) -> None: ...


def tcp_sockets(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (every address family it resolves to).

    ``reuse_port``: ``SO_REUSEPORT``, for several listener processes on one port (the kernel spreads
    new connections over their sockets).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bind_to: tuple[Any, ...] = tuple(address)
            if port == 0 and len(sockets) > 1:  # every family on the port the first one got
                bind_to = (bind_to[0], sockets[0].getsockname()[1], *bind_to[2:])
            sock.bind(bind_to)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class SocketInUse(OSError):
    """Another process answers on the admin socket: a second service on the same data dir."""


def unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket readable and writable by its owner only.

    A socket file left by a crashed service is replaced; one that another process still answers on
    is not (two services on one data dir would share a store neither owns alone).
    """
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            raise SocketInUse(errno.EADDRINUSE, f"another henge service is running on this data dir (its admin "
                                                f"socket {path} answers)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Acceptor:
    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        admission: Admission,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        admin_only: bool = False,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.admission = admission
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.admin_only = admin_only
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._reading = False

    def start(self) -> None:
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        if self._retry is None:
            self._retry = self._loop.call_later(RETRY_AFTER, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self.start()

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:
                    self.admission.refused(self.admin_only, f"accept failed: {exc.strerror}")
                    self._pause()  # not a busy loop: try again in a moment
                    return
                log.warning("listener.accept_failed error=%s", exc)
                return
            if not self.admission.admit(self.admin_only):
                conn.close()  # at once: nothing is allocated for it
                self.admission.refused(self.admin_only, "max_connections")
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self.factory, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout if self.ssl_context is not None else None,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            conn.close()
            self.admission.adopt_failed(self.admin_only, exc)

    def addresses(self) -> list[tuple[str, int]]:
        name = self.sock.getsockname()
        return [(str(name[0]), int(name[1]))] if isinstance(name, tuple) else []

    async def close(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for task in list(self._adopting):
            task.cancel()
        if self._adopting:
            await asyncio.wait(self._adopting, timeout=1.0)
        self.sock.close()
