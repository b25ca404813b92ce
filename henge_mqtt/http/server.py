"""The HTTP API's server: uvicorn in the service's own event loop, on a socket we bind.

Binding the socket ourselves gives a clear error before anything is served (a busy port, or
certificate files that do not load, are a ``SettingsError``, not a log line) and the real port when
0 was asked for. uvicorn, FastAPI and the app are loaded when the first client connects (``engine``:
about 15 MB a service whose console nobody opens never holds); until then the socket is watched,
not accepted from, and the first client waits in its backlog while they load (about a second on a small gateway, once).
The event hub listens from the start, so streams and presence changes miss nothing before then.
uvicorn must not install signal handlers: ``henge serve`` owns SIGINT/SIGTERM and stops the HTTP
server first.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SettingsError
from ..service.api import ServiceAPI
from .stream import EventHub

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("henge_mqtt.http")


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
        self._limit = body_limit if body_limit is not None else service.settings.max_config_bytes + 16 * 1024
        if (certfile is None) != (keyfile is None):
            raise SettingsError("https needs both http_certfile and http_keyfile")
        self._tls = (certfile, keyfile) if certfile is not None and keyfile is not None else None
        self._want = (host, port)
        self._sock: socket.socket | None = None
        self._engine: Engine | None = None
        self._loading: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._unlisten: object = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    @property
    def loaded(self) -> bool:
        """Whether a client has connected yet (and uvicorn and the app are loaded)."""
        return self._engine is not None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        host, port = self._want
        if self._tls is not None:  # a bad certificate file is a clear error now, not at the first client
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*self._tls)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise SettingsError(f"cannot serve https: {exc}") from exc
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
        self._sock = sock
        self._unlisten = self.service.events.add_listener(self.hub.on_event)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._knock)
        log.info("http.started url=%s", self.url)

    def _knock(self) -> None:
        """A client waits in the backlog: load uvicorn and the app (once), then serve."""
        if self._sock is None or self._loading is not None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._loading = asyncio.get_running_loop().create_task(self._load(self._sock))

    async def _load(self, sock: socket.socket) -> None:
        try:
            # The imports (most of the time) off the loop; the app and its routes are built on it.
            module = await asyncio.to_thread(importlib.import_module, "henge_mqtt.http.engine")
            engine: Engine = module.Engine(self.service, self.hub, body_limit=self._limit, tls=self._tls)
        except Exception:
            log.exception("http.load_failed url=%s", self.url)  # the socket stays open: clients wait, then time out
            raise
        self._engine = engine
        self._task = asyncio.get_running_loop().create_task(engine.serve(sockets=[sock]))
        log.info("http.loaded url=%s", self.url)

    async def stop(self, *, exiting: bool = False) -> None:
        """Streams end, the last minute of API use goes to the audit trail (first: the store may
        be stopping too), then uvicorn closes its connections.

        ``exiting`` (``henge serve``, whose process ends next): with no request in flight, uvicorn's
        graceful shutdown (two fixed 100 ms sleeps: 0.2 s of every stop) is skipped, and its idle
        keep-alive connections close with the process; a request in flight is still answered.
        """
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.hub.close()  # event streams end; uvicorn's graceful shutdown then has nothing to wait for
        if callable(self._unlisten):
            self._unlisten()
        if self._loading is None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        else:
            await asyncio.gather(self._loading, return_exceptions=True)  # a load under way ends first
        engine, task = self._engine, self._task
        if engine is None or task is None:
            sock.close()
            return
        engine.should_exit = True
        await engine.app.state.uses.flush()
        if exiting and not engine.in_flight:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            try:
                await asyncio.wait_for(task, 5.0)
            except TimeoutError:
                log.warning("http.stop_timeout")
        sock.close()
        self._engine = self._task = self._loading = None
