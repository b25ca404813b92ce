"""The blocking admin client: one connection, calls one after another, no event loop.

The CLI's one-shot commands (``henge push``, ``get``, ``status`` ...) run on it, so a command
starts without loading asyncio (with typer, the most of what ``henge push`` cost before the service
answered). Event streams and watches, and library users, have ``client.AdminClient``; the two speak
``admin_protocol`` and fail in the same words.

A socket read waits at most until the reply's deadline (``timeout``, plus the op's own ``wait``,
renewed by each progress tick, as ``AdminClient`` does) or the next ping: a PINGREQ goes out when
the connection has said nothing for half the keep-alive (a fleet push with ``--wait`` may take
minutes). The service's QoS 1 messages are acknowledged.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import admin_protocol as protocol
from . import codec
from .errors import ServiceUnavailable
from .topics import Topics

if TYPE_CHECKING:
    from .endpoint import Endpoint

__all__ = ["AdminCall"]


class AdminCall:
    """``with AdminCall(endpoint) as admin: admin.call("get", device="d1")``."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 10.0, keepalive: int = protocol.KEEPALIVE) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.keepalive = keepalive
        self.topics = Topics(endpoint.topic_prefix)
        self.client_id = protocol.client_id()
        self._reply_topic = self.topics.admin_reply(self.client_id)
        self._sock: socket.socket | None = None
        self._framer = codec.Framer(64 * 1024 * 1024)
        self._packets: deque[codec.Packet] = deque()
        self._ids = 0
        self._ping_at = 0.0

    def __enter__(self) -> AdminCall:
        e = self.endpoint
        tls = e.tls_context()  # bad TLS files: one error before any connection is tried
        try:
            if e.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(e.socket)
            else:
                sock = socket.create_connection((e.host, e.port), timeout=self.timeout)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=e.host)
        except TimeoutError as exc:
            raise protocol.unreachable(e, f"no answer within {self.timeout:g} s") from exc
        except OSError as exc:
            raise protocol.unreachable(e, str(exc)) from exc
        self._sock = sock
        deadline = time.monotonic() + self.timeout
        try:
            self._send(codec.encode(codec.Connect(
                client_id=self.client_id, keepalive=self.keepalive, clean_session=True,
                username=e.username, password=e.secret.encode())))
            ack = self._next(deadline)
            if not isinstance(ack, codec.Connack):
                raise protocol.unreachable(e, f"the service answered the CONNECT with {type(ack).__name__}")
            if ack.code != 0:
                raise protocol.refused(e, ack.code)
            packet_id = self._next_id()
            self._send(codec.encode(codec.Subscribe(packet_id, ((self._reply_topic, 1),))))
            while True:
                packet = self._next(deadline)
                if isinstance(packet, codec.Suback) and packet.packet_id == packet_id:
                    break
            if codec.SUBACK_FAILURE in packet.codes:
                raise ServiceUnavailable(f"{protocol.LOST} at {e.where}: the broker refused the subscription "
                                         f"to {self._reply_topic}")
        except TimeoutError as exc:
            self.close()
            raise protocol.unreachable(e, f"no answer within {self.timeout:g} s") from exc
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(codec.disconnect())
        except OSError:  # already gone: nothing to say goodbye to
            pass
        sock.close()

    def call(self, op: str, /, *, wait: float | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
        """Run one admin operation; raises :class:`RemoteError` with the service's code and message.

        ``wait``: how much longer than ``timeout`` the reply may take when the operation itself
        waits; an operation that says how far it is (progress ticks) gets that long again per tick.
        """
        request_id, request = protocol.request(op, args, self._reply_topic)
        limit = self.timeout + (wait or 0.0)
        deadline = time.monotonic() + limit
        ticked = False
        self._send(codec.publish_bytes(self.topics.admin_requests, request, 1, False, self._next_id()))
        while True:
            try:
                packet = self._next(deadline)
            except TimeoutError as exc:
                raise protocol.no_answer(op, limit, ticked) from exc
            if not isinstance(packet, codec.Publish) or packet.topic != self._reply_topic:
                continue
            body = protocol.body_of(packet.payload)
            if body is None or body["id"] != request_id:
                continue
            if "progress" in body:
                ticked = True
                deadline = time.monotonic() + limit
                if progress is not None:
                    progress(body["progress"])
                continue
            return protocol.result_of(body)

    # ---- the connection --------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise ServiceUnavailable(protocol.LOST)
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except OSError as exc:
            raise ServiceUnavailable(f"{protocol.LOST}: {exc}") from exc
        self._ping_at = time.monotonic() + self.keepalive / 2

    def _next(self, deadline: float) -> codec.Packet:
        """The next packet from the service (acknowledged if it asks); TimeoutError at ``deadline``."""
        while not self._packets:
            if self._sock is None:
                raise ServiceUnavailable(protocol.LOST)
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            if now >= self._ping_at:
                self._send(codec.encode(codec.Pingreq()))
                continue
            self._sock.settimeout(min(deadline, self._ping_at) - now)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ServiceUnavailable(f"{protocol.LOST}: {exc}") from exc
            if not data:
                raise ServiceUnavailable(protocol.LOST)
            try:
                for first, body in self._framer.feed(data):
                    self._packets.append(codec.decode(first, body, 4))
            except codec.CodecError as exc:
                raise ServiceUnavailable(f"the service sent a malformed packet: {exc}") from exc
        packet = self._packets.popleft()
        if isinstance(packet, codec.Publish) and packet.qos == 1 and packet.packet_id is not None:
            self._send(codec.puback(packet.packet_id))
        return packet

    def _next_id(self) -> int:
        self._ids = self._ids % 65535 + 1
        return self._ids
