"""The MQTT 3.1.1 codec: every packet type, as plain values, from and to bytes.

Decoding is synchronous and works on a body already framed whole (see :class:`Framer`), so a
connection parses inside ``data_received`` with no coroutine per field and no reader object per
connection. Every failure is a :class:`CodecError`: the connection layer catches that one type
and nothing else, so a decoder bug shows up as a bug instead of hiding as a "malformed packet".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

MAX_REMAINING_LENGTH = 268_435_455  # four length bytes [MQTT-2.2.3]
SUBACK_FAILURE = 0x80

# CONNACK return codes [MQTT-3.2.2.3].
ACCEPTED = 0
UNACCEPTABLE_PROTOCOL_VERSION = 1
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3
BAD_USERNAME_PASSWORD = 4
NOT_AUTHORIZED = 5


class CodecError(ValueError):
    """The bytes are not a valid MQTT 3.1.1 packet."""


class PacketTooLarge(CodecError):
    """A packet announced more bytes than the connection allows; it is never read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes over the limit of {limit}")
        self.size = size
        self.limit = limit


# ---- packets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    message: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    keepalive: int = 0
    clean_session: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol: str = "MQTT"
    level: int = 4


@dataclass(frozen=True, slots=True)
class Connack:
    code: int
    session_present: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    packet_id: int | None = None
    dup: bool = False


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrec:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubcomp:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback | Unsubscribe
          | Unsuback | Pingreq | Pingresp | Disconnect)


# ---- framing ---------------------------------------------------------------------------------


class Framer:
    """Cuts a byte stream into ``(first byte, body)`` frames, refusing any over ``limit``.

    The oversize check runs on the length prefix, before the body arrives: a peer cannot make us
    buffer more than ``limit`` plus five bytes.
    """

    __slots__ = ("buf", "limit")

    def __init__(self, limit: int) -> None:
        self.buf = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf + data if self.buf else data
        frames: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end:
                    self.buf = buf[pos:]
                    return frames
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise CodecError("remaining length longer than four bytes")
            if length > self.limit:
                raise PacketTooLarge(length, self.limit)
            if end - i < length:
                break
            frames.append((buf[pos], buf[i:i + length]))
            pos = i + length
        self.buf = buf[pos:] if pos < end else b""
        return frames

    @property
    def pending(self) -> int:
        return len(self.buf)


def encode_length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# ---- decoding --------------------------------------------------------------------------------


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CodecError("packet shorter than its fields")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise CodecError("packet shorter than its fields")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            value = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError("string is not UTF-8") from exc
        if "\x00" in value:
            raise CodecError("string contains U+0000")  # [MQTT-1.5.3-2]
        return value

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CodecError("trailing bytes after the packet's fields")


def _expect_flags(first: int, flags: int) -> None:
    if first & 0x0F != flags:
        raise CodecError(f"reserved flags 0x{first & 0x0F:x} on packet type {first >> 4}")  # [MQTT-2.2.2-2]


def decode_connect(body: bytes) -> Connect:
    c = _Cursor(body)
    protocol = c.text()
    level = c.u8()
    flags = c.u8()
    if flags & 0x01:
        raise CodecError("CONNECT reserved flag set")  # [MQTT-3.1.2-3]
    keepalive = c.u16()
    client_id = c.text()
    will = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise CodecError("will QoS 3")  # [MQTT-3.1.2-14]
        will = Will(c.text(), c.binary(), will_qos, bool(flags & 0x20))
    elif will_qos or flags & 0x20:
        raise CodecError("will QoS or retain without a will")  # [MQTT-3.1.2-11] [MQTT-3.1.2-15]
    if flags & 0x40 and not flags & 0x80:
        raise CodecError("password without user name")  # [MQTT-3.1.2-22]
    username = c.text() if flags & 0x80 else None
    password = c.binary() if flags & 0x40 else None
    c.end()
    return Connect(client_id, keepalive, bool(flags & 0x02), username, password, will, protocol, level)


def decode_publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise CodecError("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = bool(first & 0x08)
    if dup and not qos:
        raise CodecError("DUP set on a QoS 0 PUBLISH")  # [MQTT-3.3.1-2]
    c = _Cursor(body)
    topic = c.text()
    packet_id = None
    if qos:
        packet_id = c.u16()
        if not packet_id:
            raise CodecError("packet id 0")  # [MQTT-2.3.1-1]
    return Publish(topic, c.rest(), qos, bool(first & 0x01), packet_id, dup)


def _packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise CodecError("acknowledgement of the wrong length")
    packet_id = (body[0] << 8) | body[1]
    if not packet_id:
        raise CodecError("packet id 0")
    return packet_id


def decode(first: int, body: bytes) -> Packet:
    """One framed packet; raises :class:`CodecError` for anything not valid MQTT 3.1.1."""
    kind = first >> 4
    if kind == PUBLISH:
        return decode_publish(first, body)
    if kind == PUBACK:
        _expect_flags(first, 0)
        return Puback(_packet_id(body))
    if kind == PINGREQ:
        _expect_flags(first, 0)
        if body:
            raise CodecError("PINGREQ with a body")
        return Pingreq()
    if kind == SUBSCRIBE:
        _expect_flags(first, 2)  # [MQTT-3.8.1-1]
        c = _Cursor(body)
        packet_id = c.u16()
        if not packet_id:
            raise CodecError("packet id 0")
        filters: list[tuple[str, int]] = []
        while not c.done:
            topic = c.text()
            qos = c.u8()
            if qos > 2:
                raise CodecError("requested QoS above 2")  # [MQTT-3-8.3-4]
            filters.append((topic, qos))
        if not filters:
            raise CodecError("SUBSCRIBE without filters")  # [MQTT-3.8.3-3]
        return Subscribe(packet_id, tuple(filters))
    if kind == UNSUBSCRIBE:
        _expect_flags(first, 2)  # [MQTT-3.10.1-1]
        c = _Cursor(body)
        packet_id = c.u16()
        if not packet_id:
            raise CodecError("packet id 0")
        names: list[str] = []
        while not c.done:
            names.append(c.text())
        if not names:
            raise CodecError("UNSUBSCRIBE without filters")  # [MQTT-3.10.3-2]
        return Unsubscribe(packet_id, tuple(names))
    if kind == CONNECT:
        _expect_flags(first, 0)
        return decode_connect(body)
    if kind == DISCONNECT:
        _expect_flags(first, 0)
        if body:
            raise CodecError("DISCONNECT with a body")
        return Disconnect()
    if kind == PUBREC:
        _expect_flags(first, 0)
        return Pubrec(_packet_id(body))
    if kind == PUBREL:
        _expect_flags(first, 2)  # [MQTT-3.6.1-1]
        return Pubrel(_packet_id(body))
    if kind == PUBCOMP:
        _expect_flags(first, 0)
        return Pubcomp(_packet_id(body))
    if kind == CONNACK:
        _expect_flags(first, 0)
        if len(body) != 2 or body[0] & 0xFE:
            raise CodecError("malformed CONNACK")
        return Connack(body[1], bool(body[0] & 0x01))
    if kind == SUBACK:
        _expect_flags(first, 0)
        c = _Cursor(body)
        packet_id = c.u16()
        codes = tuple(c.rest())
        if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
            raise CodecError("malformed SUBACK")
        return Suback(packet_id, codes)
    if kind == UNSUBACK:
        _expect_flags(first, 0)
        return Unsuback(_packet_id(body))
    if kind == PINGRESP:
        _expect_flags(first, 0)
        if body:
            raise CodecError("PINGRESP with a body")
        return Pingresp()
    raise CodecError(f"reserved packet type {kind}")


# ---- encoding --------------------------------------------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise CodecError("string longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise CodecError("binary field longer than 65535 bytes")
    return struct.pack("!H", len(value)) + value


def _frame(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise CodecError("packet too large for MQTT")
    return bytes((first,)) + encode_length(len(body)) + body


def publish_bytes(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int | None = None,
                  dup: bool = False) -> bytes:
    """The hot path of every delivery: one PUBLISH as bytes, without building a value first."""
    encoded = topic.encode("utf-8")
    head = struct.pack("!H", len(encoded)) + encoded
    if qos:
        head += struct.pack("!H", packet_id or 0)
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    return bytes((first,)) + encode_length(len(head) + len(payload)) + head + payload


def connack(code: int, session_present: bool = False) -> bytes:
    return bytes((0x20, 0x02, int(session_present), code))


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


def pubrec(packet_id: int) -> bytes:
    return b"\x50\x02" + struct.pack("!H", packet_id)


def pubcomp(packet_id: int) -> bytes:
    return b"\x70\x02" + struct.pack("!H", packet_id)


def suback(packet_id: int, codes: list[int] | tuple[int, ...]) -> bytes:
    return _frame(0x90, struct.pack("!H", packet_id) + bytes(codes))


def unsuback(packet_id: int) -> bytes:
    return b"\xb0\x02" + struct.pack("!H", packet_id)


PINGRESP_BYTES = b"\xd0\x00"


def encode(packet: Packet) -> bytes:
    """Any packet as bytes: used by tests, clients and the rare packets; the hot path has its own."""
    if isinstance(packet, Publish):
        return publish_bytes(packet.topic, packet.payload, packet.qos, packet.retain, packet.packet_id, packet.dup)
    if isinstance(packet, Connect):
        flags = 0x02 if packet.clean_session else 0
        payload = _text(packet.client_id)
        if packet.will is not None:
            flags |= 0x04 | (packet.will.qos << 3) | (0x20 if packet.will.retain else 0)
            payload += _text(packet.will.topic) + _binary(packet.will.message)
        if packet.username is not None:
            flags |= 0x80
            payload += _text(packet.username)
        if packet.password is not None:
            flags |= 0x40
            payload += _binary(packet.password)
        header = _text(packet.protocol) + struct.pack("!BBH", packet.level, flags, packet.keepalive)
        return _frame(0x10, header + payload)
    if isinstance(packet, Connack):
        return connack(packet.code, packet.session_present)
    if isinstance(packet, Puback):
        return puback(packet.packet_id)
    if isinstance(packet, Pubrec):
        return pubrec(packet.packet_id)
    if isinstance(packet, Pubrel):
        return b"\x62\x02" + struct.pack("!H", packet.packet_id)
    if isinstance(packet, Pubcomp):
        return pubcomp(packet.packet_id)
    if isinstance(packet, Subscribe):
        body = struct.pack("!H", packet.packet_id) + b"".join(_text(t) + bytes((q,)) for t, q in packet.filters)
        return _frame(0x82, body)
    if isinstance(packet, Suback):
        return suback(packet.packet_id, packet.codes)
    if isinstance(packet, Unsubscribe):
        return _frame(0xA2, struct.pack("!H", packet.packet_id) + b"".join(_text(t) for t in packet.filters))
    if isinstance(packet, Unsuback):
        return unsuback(packet.packet_id)
    if isinstance(packet, Pingreq):
        return b"\xc0\x00"
    if isinstance(packet, Pingresp):
        return PINGRESP_BYTES
    if isinstance(packet, Disconnect):
        return b"\xe0\x00"
    raise TypeError(f"not a packet: {packet!r}")
