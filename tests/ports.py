"""Ports the tests choose: the suite binds nothing it did not pick (never 1883 or 8080)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
