"""The HTTP API and the web console (docs/http.md): a thin client of the service's library API."""

from __future__ import annotations

from .server import HttpServer, parse_address

__all__ = ["HttpServer", "parse_address"]
