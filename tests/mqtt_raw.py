"""A raw MQTT 3.1.1 peer for misbehaving-client tests: exact bytes, no client library."""

from __future__ import annotations

import asyncio
import struct


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, body: bytes, flags: int = 0) -> bytes:
    return bytes([(kind << 4) | flags]) + _remaining(len(body)) + body


def connect(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will:
        flags |= 0x04
        payload += _str(will[0]) + _str(will[1])
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    return packet(1, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def subscribe(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    return packet(8, struct.pack("!H", packet_id) + _str(topic_filter) + bytes([qos]), flags=2)


def publish(topic: str, data: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + data
    return packet(3, body, flags=(qos << 1) | int(retain))


PINGREQ = bytes([0xC0, 0x00])
DISCONNECT = bytes([0xE0, 0x00])


OPEN: list[RawClient] = []  # closed after every test by the ``close_raw_clients`` fixture


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        OPEN.append(self)

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(packet type, body); raises EOFError when the broker closed the connection."""
        first, body = await self.read_frame(timeout)
        return first >> 4, body

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(first byte, body); raises EOFError when the broker closed the connection."""
        async with asyncio.timeout(timeout):
            try:
                first = await self.reader.readexactly(1)
                mult, length = 1, 0
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    if not byte & 0x80:
                        break
                body = await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise EOFError("connection closed by the broker") from exc
        return first[0], body

    async def connack(self, timeout: float = 5.0) -> int:
        kind, body = await self.read_packet(timeout)
        assert kind == 2, f"expected CONNACK, got packet type {kind}"
        return body[1]

    async def closed_within(self, timeout: float) -> bool:
        """True if the broker closes the connection within ``timeout`` (other packets are skipped)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if not await self.reader.read(65536):
                        return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()
