"""The link between the core and a listener process: one stream socket, frames of 9 header bytes.

A listener process (:mod:`.relay_process`) holds device sockets so that the core need not: each
frame names one device connection by the listener's number for it. Both sides use this module
only; it imports nothing but the standard library, so a listener process stays small.

Frames (kind, connection number, payload length, payload):

========  ================  ===================================================================
kind      direction         payload
========  ================  ===================================================================
HELLO     listener -> core  its process id (ASCII): it is listening
OPEN      listener -> core  ``host port`` of the new peer, `` tls`` added when TLS ended there, and
                            then, when the handshake verified a client certificate, a newline
                            and its subject and issuer as JSON (``getpeercert()``'s two keys)
DATA      both              bytes from (or to) the device, unchanged
LOST      listener -> core  why the socket ended (empty: the peer closed or reset it)
CLOSE     core -> listener  close after what was sent is flushed
EOF       core -> listener  half-close (FIN after what was sent); the socket ends when the peer
                            closes it or the core aborts it
ABORT     core -> listener  drop the socket now (the core has already forgotten it)
TRUST     core -> listener  a CA certificate (PEM) that TLS listeners asking for client
                            certificates trust from now on (a claim CA: docs/onboarding.md)
========  ================  ===================================================================
"""

from __future__ import annotations

import asyncio
import logging
import struct

HEADER = struct.Struct("!BII")
HELLO, OPEN, DATA, LOST, CLOSE, EOF, ABORT, TRUST = 1, 2, 3, 4, 5, 6, 7, 8
MAX_FRAME = 64 * 1024 * 1024  # far above any read asyncio hands over (256 KiB): a corrupt length ends the link

Frame = tuple[int, int, bytes]


class LinkError(Exception):
    """The link's bytes are not frames: the other side is not a henge process of this version."""


class LinkEnd(asyncio.Protocol):
    """Either end of a link: frames out (those of one loop turn in one write: a fleet push is one
    system call, not one per device) and frames in (a corrupt stream ends the link)."""

    def __init__(self, log: logging.Logger, name: str) -> None:
        self.log, self.name = log, name
        self.transport: asyncio.Transport | None = None
        self.held = b""
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not an asyncio.Transport subclass)

    def send(self, kind: int, number: int, payload: bytes = b"") -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(HEADER.pack(kind, number, len(payload)))
        if payload:
            self.out.append(payload)  # joined once with the rest of the turn's frames: one copy

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def frames(self, data: bytes) -> list[Frame]:
        try:
            frames, self.held = cut(self.held, data)
        except LinkError as exc:
            self.log.error("%s.bad_link error=%s", self.name, exc)
            assert self.transport is not None
            self.transport.abort()
            return []
        return frames


def frame(kind: int, number: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, number, len(payload)) + payload


def cut(held: bytes, data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames in ``held + data`` and the start of the next one."""
    buffer = held + data if held else data
    frames: list[Frame] = []
    offset, size, unpack, head = 0, len(buffer), HEADER.unpack_from, HEADER.size
    while size - offset >= head:
        kind, number, length = unpack(buffer, offset)
        if length > MAX_FRAME or not HELLO <= kind <= TRUST:
            raise LinkError(f"frame kind {kind} of {length} bytes")
        end = offset + head + length
        if end > size:
            break
        frames.append((kind, number, buffer[offset + head:end]))
        offset = end
    return frames, buffer[offset:]
