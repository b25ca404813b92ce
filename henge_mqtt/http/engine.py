"""uvicorn and the API's app, loaded when the first HTTP client knocks (``server.HttpServer``).

Kept apart so that a service whose console nobody has opened never imports FastAPI, Starlette,
uvicorn or the app's routes and models: about 15 MB of the idle process (``python
bench/import_rss.py``). uvicorn serves the socket ``HttpServer`` bound at start, and accepts the
connections that waited in its backlog while this loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..service.api import ServiceAPI
from .app import create_app
from .stream import EventHub


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


class Engine(uvicorn.Server):
    """uvicorn's server with the app it serves; no signal handlers (``henge serve`` owns them)."""

    def __init__(self, service: ServiceAPI, hub: EventHub, *, body_limit: int, tls: tuple[Path, Path] | None) -> None:
        self.app: FastAPI = create_app(service, hub, body_limit=body_limit)
        super().__init__(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2, ws="none",
            http=_BoundedH11, server_header=False, timeout_keep_alive=30,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None))
        self.config.load()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service's own handlers stay in charge

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return len(self.server_state.tasks)
