"""The HTTP API's server: uvicorn in the service's own event loop, on a socket we bind.

Binding the socket ourselves gives a clear error before anything is served (a busy port is a
``SettingsError``, not a log line) and the real port when 0 was asked for. uvicorn must not
install signal handlers: ``henge serve`` owns SIGINT/SIGTERM and stops the HTTP server first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import SettingsError
from ..service.api import ServiceAPI
from .app import create_app
from .stream import EventHub

log = logging.getLogger("henge_mqtt.http")


class _BoundedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two bounds it lacks: connections at once (beyond that a new
    one is closed on arrival, before it can hold anything) and the time from accept to a first
    request (a peer that connects and says nothing is closed). Idle keep-alive connections are
    uvicorn's own ``timeout_keep_alive``."""

    max_connections = 256
    first_request_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()
            return
        asyncio.get_running_loop().call_later(self.first_request_timeout, self._first_request_due)

    def _first_request_due(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.abort()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service's own handlers stay in charge


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as given to ``--http``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"--http wants HOST:PORT, like 127.0.0.1:8080, not {text!r}")
    return host, int(port)


class HttpServer:
    """``async with HttpServer(service, "127.0.0.1", 8080):`` serves the API and the console."""

    def __init__(self, service: ServiceAPI, host: str, port: int, *, certfile: Path | None = None,
                 keyfile: Path | None = None, body_limit: int | None = None) -> None:
        self.service = service
        self.host = host
        self.hub = EventHub()
        limit = body_limit if body_limit is not None else service.settings.max_config_bytes + 16 * 1024
        self.app = create_app(service, self.hub, body_limit=limit)
        if (certfile is None) != (keyfile is None):
            raise SettingsError("https needs both http_certfile and http_keyfile")
        self._tls = (certfile, keyfile) if certfile is not None else None
        self._want = (host, port)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._unlisten: object = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        host, port = self._want
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it a keep-alive answer (headers, then body) waited 40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise SettingsError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, ws="none", http=_BoundedH11,
                                server_header=False, timeout_keep_alive=30,
                                ssl_certfile=str(self._tls[0]) if self._tls else None,
                                ssl_keyfile=str(self._tls[1]) if self._tls else None)
        try:
            config.load()  # loads the certificates: a bad file is a clear error now, not a log line later
        except (OSError, ValueError) as exc:
            sock.close()
            raise SettingsError(f"cannot serve https: {exc}") from exc
        self._server = _Server(config)
        self._unlisten = self.service.events.add_listener(self.hub.on_event)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        for _ in range(200):  # started within 2 s, or the task says why not
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("http.started url=%s", self.url)

    async def stop(self, *, exiting: bool = False) -> None:
        """Streams end, the last minute of API use goes to the audit trail (first: the store may
        be stopping too), then uvicorn closes its connections.

        ``exiting`` (``henge serve``, whose process ends next): with no request in flight, uvicorn's
        graceful shutdown (two fixed 100 ms sleeps: 0.2 s of every stop) is skipped, and its idle
        keep-alive connections close with the process; a request in flight is still answered.
        """
        if self._server is None or self._task is None:
            return
        self.hub.close()  # event streams end; uvicorn's graceful shutdown then has nothing to wait for
        self._server.should_exit = True
        if callable(self._unlisten):
            self._unlisten()
        await self.app.state.uses.flush()
        if exiting and not self._server.server_state.tasks:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        else:
            try:
                await asyncio.wait_for(self._task, 5.0)
            except TimeoutError:
                log.warning("http.stop_timeout")
        self._server = self._task = None
