"""Ports the tests choose: the suite binds nothing it did not pick (never 1883 or 8080)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together, so no two are the same)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
