"""The MQTT codec, 3.1.1 (level 4) and 5.0 (level 5): every packet type, as plain values, from and to bytes.

Decoding is synchronous and works on a body already framed whole (see :class:`Framer`), so a
connection parses inside ``data_received`` with no coroutine per field and no reader object per
connection. Every failure is a :class:`CodecError`: the connection layer catches that one type
and nothing else, so a decoder bug shows up as a bug instead of hiding as a "malformed packet".
"""

from __future__ import annotations

import struct
from typing import NamedTuple

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
CONNACK_REASONS = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                   4: "bad user name or password", 5: "not authorized"}


# MQTT 5.0 reason codes henge sends [MQTT-2.4].
SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11
DISCONNECT_WITH_WILL = 0x04
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED_5 = 0x87
SERVER_UNAVAILABLE_5 = 0x88
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F

# MQTT 5.0 properties [MQTT-2.2.2.2]: id -> (name, type).
BYTE, U16, U32, VARINT, UTF8, BINARY, PAIR = range(7)
PROPERTIES: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", BYTE), 0x02: ("message_expiry_interval", U32),
    0x03: ("content_type", UTF8), 0x08: ("response_topic", UTF8), 0x09: ("correlation_data", BINARY),
    0x0B: ("subscription_identifier", VARINT), 0x11: ("session_expiry_interval", U32),
    0x12: ("assigned_client_identifier", UTF8), 0x13: ("server_keep_alive", U16),
    0x15: ("authentication_method", UTF8), 0x16: ("authentication_data", BINARY),
    0x17: ("request_problem_information", BYTE), 0x18: ("will_delay_interval", U32),
    0x19: ("request_response_information", BYTE), 0x1A: ("response_information", UTF8),
    0x1C: ("server_reference", UTF8), 0x1F: ("reason_string", UTF8), 0x21: ("receive_maximum", U16),
    0x22: ("topic_alias_maximum", U16), 0x23: ("topic_alias", U16), 0x24: ("maximum_qos", BYTE),
    0x25: ("retain_available", BYTE), 0x26: ("user_property", PAIR), 0x27: ("maximum_packet_size", U32),
    0x28: ("wildcard_subscription_available", BYTE), 0x29: ("subscription_identifier_available", BYTE),
    0x2A: ("shared_subscription_available", BYTE),
}
PAYLOAD_FORMAT_INDICATOR, MESSAGE_EXPIRY_INTERVAL, CONTENT_TYPE = 0x01, 0x02, 0x03
RESPONSE_TOPIC, CORRELATION_DATA, SUBSCRIPTION_IDENTIFIER = 0x08, 0x09, 0x0B
SESSION_EXPIRY_INTERVAL, ASSIGNED_CLIENT_IDENTIFIER, SERVER_KEEP_ALIVE, AUTHENTICATION_METHOD = 0x11, 0x12, 0x13, 0x15
REQUEST_PROBLEM_INFORMATION, WILL_DELAY_INTERVAL, REASON_STRING = 0x17, 0x18, 0x1F
RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS, RETAIN_AVAILABLE = 0x21, 0x22, 0x23, 0x25
USER_PROPERTY, MAXIMUM_PACKET_SIZE = 0x26, 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE, SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x28, 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A
# Which properties each packet may carry [MQTT-2.2.2.2]; the will's are apart.
ALLOWED: dict[str, frozenset[int]] = {
    "connect": frozenset({0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16}),
    "will": frozenset({0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26}),
    "connack": frozenset({0x11, 0x21, 0x24, 0x25, 0x27, 0x12, 0x22, 0x1F, 0x26, 0x28, 0x29, 0x2A, 0x13, 0x1A,
                          0x1C, 0x15, 0x16}),
    "publish": frozenset({0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x0B, 0x03}),
    "ack": frozenset({0x1F, 0x26}),
    "subscribe": frozenset({0x0B, 0x26}),
    "unsubscribe": frozenset({0x26}),
    "disconnect": frozenset({0x11, 0x1F, 0x26, 0x1C}),
    "auth": frozenset({0x15, 0x16, 0x1F, 0x26}),
}
Props = dict[int, object]  # user properties: a list of (name, value); subscription identifiers: a list


class CodecError(ValueError):
    """The bytes are not a valid MQTT packet; ``reason`` is the 5.0 reason code to close with."""

    def __init__(self, message: str, reason: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolViolation(CodecError):
    """Well-formed bytes that break a rule of the protocol (a property not allowed there, ...)."""

    def __init__(self, message: str, reason: int = PROTOCOL_ERROR) -> None:
        super().__init__(message, reason)


class PacketTooLarge(CodecError):
    """A packet announced more bytes than the connection allows; it is never read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes over the limit of {limit}", PACKET_TOO_LARGE)
        self.size = size
        self.limit = limit


# ---- packets ---------------------------------------------------------------------------------
# Named tuples: immutable values like a frozen dataclass, made without one (a dataclass costs about
# 1 ms of import each, and every CLI command imports this module). Equality is a tuple's: compare
# the types too where two packet types could hold the same fields (tests/test_codec.py does).


class Will(NamedTuple):
    topic: str
    message: bytes
    qos: int
    retain: bool
    props: Props | None = None  # 5.0 only


class Connect(NamedTuple):
    client_id: str
    keepalive: int = 0
    clean_session: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol: str = "MQTT"
    level: int = 4
    props: Props | None = None  # 5.0 only


class Connack(NamedTuple):
    code: int
    session_present: bool = False
    props: Props | None = None


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    packet_id: int | None = None
    dup: bool = False
    props: Props | None = None


class Puback(NamedTuple):
    packet_id: int
    reason: int = 0
    props: Props | None = None


class Pubrec(NamedTuple):
    packet_id: int
    reason: int = 0
    props: Props | None = None


class Pubrel(NamedTuple):
    packet_id: int
    reason: int = 0
    props: Props | None = None


class Pubcomp(NamedTuple):
    packet_id: int
    reason: int = 0
    props: Props | None = None


class Subscribe(NamedTuple):
    packet_id: int
    filters: tuple[tuple[str, int], ...]  # (filter, options): QoS in bits 0-1; 5.0 adds NL, RAP, RH
    props: Props | None = None


class Suback(NamedTuple):
    packet_id: int
    codes: tuple[int, ...]
    props: Props | None = None


class Unsubscribe(NamedTuple):
    packet_id: int
    filters: tuple[str, ...]
    props: Props | None = None


class Unsuback(NamedTuple):
    packet_id: int
    codes: tuple[int, ...] = ()  # 5.0 only
    props: Props | None = None


class Pingreq(NamedTuple):
    pass


class Pingresp(NamedTuple):
    pass


class Disconnect(NamedTuple):
    reason: int = 0
    props: Props | None = None


class Auth(NamedTuple):
    reason: int = 0
    props: Props | None = None


AUTH = 15

Packet = (Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback | Unsubscribe
          | Unsuback | Pingreq | Pingresp | Disconnect | Auth)


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
        frames, self.buf = cut_frames(self.buf, data, self.limit)
        return frames

    @property
    def pending(self) -> int:
        return len(self.buf)


def cut_frames(buf: bytes, data: bytes, limit: int) -> tuple[list[tuple[int, bytes]], bytes]:
    """:meth:`Framer.feed` as a function: ``(frames, the bytes left over)`` of what was held
    (``buf``) and what arrived (``data``). A server connection keeps ``buf`` in its own slots: one
    object less for each of 10,000 connections."""
    buf = buf + data if buf else data
    frames: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= end:
                return frames, buf[pos:]
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise CodecError("remaining length longer than four bytes")
        if length > limit:
            raise PacketTooLarge(length, limit)
        if end - i < length:
            break
        frames.append((buf[pos], buf[i:i + length]))
        pos = i + length
    return frames, buf[pos:] if pos < end else b""


def encode_length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if n < 16384:  # every config of a usual size: two bytes, no loop
        return bytes((n & 0x7F | 0x80, n >> 7))
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

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 21:
                raise CodecError("variable byte integer longer than four bytes")

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

    def props(self, where: str) -> Props:
        """A 5.0 property section, checked against what ``where`` (a key of ALLOWED) may carry."""
        length = self.varint()
        stop = self.pos + length
        if stop > len(self.data):
            raise CodecError("properties longer than the packet")
        allowed = ALLOWED[where]
        found: Props = {}
        while self.pos < stop:
            ident = self.varint()
            spec = PROPERTIES.get(ident)
            if spec is None:
                raise CodecError(f"unknown property 0x{ident:02x}")
            if ident not in allowed:
                raise ProtocolViolation(f"property {spec[0]} is not allowed on {where}")
            kind = spec[1]
            value: object
            if kind == BYTE:
                value = self.u8()
                if value > 1 and ident != 0x24:  # every byte property but maximum_qos is 0 or 1
                    raise ProtocolViolation(f"{spec[0]} must be 0 or 1")
            elif kind == U16:
                value = self.u16()
            elif kind == U32:
                value = self.u32()
            elif kind == VARINT:
                value = self.varint()
                if not value:
                    raise ProtocolViolation("subscription identifier 0")
            elif kind == UTF8:
                value = self.text()
            elif kind == BINARY:
                value = self.binary()
            else:
                value = (self.text(), self.text())
            if ident == USER_PROPERTY or (ident == SUBSCRIPTION_IDENTIFIER and where == "publish"):
                found.setdefault(ident, [])
                found[ident].append(value)  # type: ignore[attr-defined]
            elif ident in found:
                raise ProtocolViolation(f"property {spec[0]} given twice")
            else:
                found[ident] = value
        if self.pos != stop:
            raise CodecError("a property runs past the property section")
        if found.get(RECEIVE_MAXIMUM) == 0 or found.get(MAXIMUM_PACKET_SIZE) == 0:
            raise ProtocolViolation("receive maximum or maximum packet size of 0")
        return found


def _expect_flags(first: int, flags: int) -> None:
    if first & 0x0F != flags:
        raise CodecError(f"reserved flags 0x{first & 0x0F:x} on packet type {first >> 4}")  # [MQTT-2.2.2-2]


def decode_connect(body: bytes) -> Connect:
    """A CONNECT of either protocol level: the level byte says whether properties follow."""
    c = _Cursor(body)
    protocol = c.text()
    level = c.u8()
    flags = c.u8()
    if flags & 0x01:
        raise CodecError("CONNECT reserved flag set")  # [MQTT-3.1.2-3]
    keepalive = c.u16()
    v5 = level == 5 and protocol == "MQTT"
    props = c.props("connect") if v5 else None
    client_id = c.text()
    will = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise CodecError("will QoS 3")  # [MQTT-3.1.2-14]
        will_props = c.props("will") if v5 else None
        will = Will(c.text(), c.binary(), will_qos, bool(flags & 0x20), will_props)
    elif will_qos or flags & 0x20:
        raise CodecError("will QoS or retain without a will")  # [MQTT-3.1.2-11] [MQTT-3.1.2-15]
    if flags & 0x40 and not flags & 0x80 and not v5:
        raise CodecError("password without user name")  # [MQTT-3.1.2-22]; 5.0 allows it
    username = c.text() if flags & 0x80 else None
    password = c.binary() if flags & 0x40 else None
    c.end()
    return Connect(client_id, keepalive, bool(flags & 0x02), username, password, will, protocol, level, props)


def decode_publish(first: int, body: bytes, version: int = 4) -> Publish:
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
    props = c.props("publish") if version == 5 else None
    return Publish(topic, c.rest(), qos, bool(first & 0x01), packet_id, dup, props)


def _packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise CodecError("acknowledgement of the wrong length")
    packet_id = (body[0] << 8) | body[1]
    if not packet_id:
        raise CodecError("packet id 0")
    return packet_id


def _ack(body: bytes, version: int) -> tuple[int, int, Props | None]:
    """``(packet id, reason, props)`` of PUBACK/PUBREC/PUBREL/PUBCOMP; 5.0 may omit the tail."""
    if version != 5 or len(body) == 2:
        return _packet_id(body), 0, None
    c = _Cursor(body)
    packet_id = c.u16()
    if not packet_id:
        raise CodecError("packet id 0")
    reason = c.u8()
    props = c.props("ack") if not c.done else None
    c.end()
    return packet_id, reason, props


def _reason_and_props(body: bytes, where: str) -> tuple[int, Props | None]:
    """DISCONNECT and AUTH (5.0): both fields may be left out."""
    if not body:
        return 0, None
    c = _Cursor(body)
    reason = c.u8()
    props = c.props(where) if not c.done else None
    c.end()
    return reason, props


def decode(first: int, body: bytes, version: int = 4) -> Packet:
    """One framed packet; raises :class:`CodecError` for anything not valid at that protocol level."""
    kind = first >> 4
    v5 = version == 5
    if kind == PUBLISH:
        return decode_publish(first, body, version)
    if kind == PUBACK:
        _expect_flags(first, 0)
        return Puback(*_ack(body, version))
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
        props = c.props("subscribe") if v5 else None
        filters: list[tuple[str, int]] = []
        while not c.done:
            topic = c.text()
            options = c.u8()
            if (options & 0x03) == 3:
                raise CodecError("requested QoS 3")  # [MQTT-3.8.3-4]
            if options & (0xC0 if v5 else 0xFC) or (options >> 4) & 0x03 == 3:
                raise CodecError("reserved subscription option bits set")  # [MQTT-3.8.3-5]
            filters.append((topic, options))
        if not filters:
            raise ProtocolViolation("SUBSCRIBE without filters")  # [MQTT-3.8.3-3]
        return Subscribe(packet_id, tuple(filters), props)
    if kind == UNSUBSCRIBE:
        _expect_flags(first, 2)  # [MQTT-3.10.1-1]
        c = _Cursor(body)
        packet_id = c.u16()
        if not packet_id:
            raise CodecError("packet id 0")
        props = c.props("unsubscribe") if v5 else None
        names: list[str] = []
        while not c.done:
            names.append(c.text())
        if not names:
            raise ProtocolViolation("UNSUBSCRIBE without filters")  # [MQTT-3.10.3-2]
        return Unsubscribe(packet_id, tuple(names), props)
    if kind == CONNECT:
        _expect_flags(first, 0)
        return decode_connect(body)
    if kind == DISCONNECT:
        _expect_flags(first, 0)
        if not v5:
            if body:
                raise CodecError("DISCONNECT with a body")
            return Disconnect()
        return Disconnect(*_reason_and_props(body, "disconnect"))
    if kind == PUBREC:
        _expect_flags(first, 0)
        return Pubrec(*_ack(body, version))
    if kind == PUBREL:
        _expect_flags(first, 2)  # [MQTT-3.6.1-1]
        return Pubrel(*_ack(body, version))
    if kind == PUBCOMP:
        _expect_flags(first, 0)
        return Pubcomp(*_ack(body, version))
    if kind == CONNACK:
        _expect_flags(first, 0)
        c = _Cursor(body)
        flags, code = c.u8(), c.u8()
        if flags & 0xFE:
            raise CodecError("malformed CONNACK")
        props = c.props("connack") if v5 else None
        c.end()
        return Connack(code, bool(flags & 0x01), props)
    if kind == SUBACK:
        _expect_flags(first, 0)
        c = _Cursor(body)
        packet_id = c.u16()
        props = c.props("ack") if v5 else None
        codes = tuple(c.rest())
        if not codes or (not v5 and any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes)):
            raise CodecError("malformed SUBACK")
        return Suback(packet_id, codes, props)
    if kind == UNSUBACK:
        _expect_flags(first, 0)
        if not v5:
            return Unsuback(_packet_id(body))
        c = _Cursor(body)
        packet_id = c.u16()
        props = c.props("ack")
        return Unsuback(packet_id, tuple(c.rest()), props)
    if kind == PINGRESP:
        _expect_flags(first, 0)
        if body:
            raise CodecError("PINGRESP with a body")
        return Pingresp()
    if kind == AUTH and v5:
        _expect_flags(first, 0)
        return Auth(*_reason_and_props(body, "auth"))
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


def encode_props(props: Props | None) -> bytes:
    """A 5.0 property section (its length first); ``b"\\x00"`` for none."""
    if not props:
        return b"\x00"
    body = props_body(props)
    return encode_length(len(body)) + body


def props_body(props: Props) -> bytes:
    """The properties of :func:`encode_props` without their length (sections built from parts)."""
    if len(props) == 1 and USER_PROPERTY in props:  # a snapshot's own: its version and digest, per message
        return b"".join(b"\x26" + _text(name) + _text(text) for name, text in props[USER_PROPERTY])  # type: ignore[attr-defined]
    out = bytearray()
    for ident, value in props.items():
        kind = PROPERTIES[ident][1]
        values = value if ident == USER_PROPERTY or (ident == SUBSCRIPTION_IDENTIFIER
                                                     and isinstance(value, list)) else [value]
        for item in values:  # type: ignore[attr-defined]
            out += encode_length(ident)
            if kind == BYTE:
                out.append(int(item))
            elif kind == U16:
                out += struct.pack("!H", item)
            elif kind == U32:
                out += struct.pack("!I", item)
            elif kind == VARINT:
                out += encode_length(int(item))
            elif kind == UTF8:
                out += _text(str(item))
            elif kind == BINARY:
                out += _binary(bytes(item))
            else:
                name, text = item
                out += _text(name) + _text(text)
    return bytes(out)


def publish_bytes(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int | None = None,
                  dup: bool = False, props: bytes | None = None) -> bytes:
    """The hot path of every delivery: one PUBLISH as bytes. ``props``: an encoded 5.0 property
    section (see :func:`encode_props`), for a 5.0 connection only."""
    encoded = topic.encode("utf-8")
    head = struct.pack("!H", len(encoded)) + encoded
    if qos:
        head += struct.pack("!H", packet_id or 0)
    if props is not None:
        head += props
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    return bytes((first,)) + encode_length(len(head) + len(payload)) + head + payload


def connack(code: int, session_present: bool = False, props: Props | None = None, version: int = 4) -> bytes:
    if version == 5:
        return _frame(0x20, bytes((int(session_present), code)) + encode_props(props))
    return bytes((0x20, 0x02, int(session_present), code))


def _ack_bytes(first: int, packet_id: int, reason: int, props: Props | None, version: int) -> bytes:
    if version == 5 and (reason or props):
        return _frame(first, struct.pack("!HB", packet_id, reason) + (encode_props(props) if props else b""))
    return bytes((first, 0x02)) + struct.pack("!H", packet_id)


def puback(packet_id: int, reason: int = 0, props: Props | None = None, version: int = 4) -> bytes:
    return _ack_bytes(0x40, packet_id, reason, props, version)


def pubrec(packet_id: int, reason: int = 0, props: Props | None = None, version: int = 4) -> bytes:
    return _ack_bytes(0x50, packet_id, reason, props, version)


def pubcomp(packet_id: int, reason: int = 0, props: Props | None = None, version: int = 4) -> bytes:
    return _ack_bytes(0x70, packet_id, reason, props, version)


def suback(packet_id: int, codes: list[int] | tuple[int, ...], props: Props | None = None,
           version: int = 4) -> bytes:
    head = struct.pack("!H", packet_id) + (encode_props(props) if version == 5 else b"")
    return _frame(0x90, head + bytes(codes))


def unsuback(packet_id: int, codes: list[int] | tuple[int, ...] = (), props: Props | None = None,
             version: int = 4) -> bytes:
    if version == 5:
        return _frame(0xB0, struct.pack("!H", packet_id) + encode_props(props) + bytes(codes))
    return b"\xb0\x02" + struct.pack("!H", packet_id)


def disconnect(reason: int = 0, props: Props | None = None, version: int = 4) -> bytes:
    if version == 5 and (reason or props):
        return _frame(0xE0, bytes((reason,)) + (encode_props(props) if props else b""))
    return b"\xe0\x00"


PINGRESP_BYTES = b"\xd0\x00"


def encode(packet: Packet, version: int = 4) -> bytes:
    """Any packet as bytes: used by tests, clients and the rare packets; the hot path has its own."""
    v5 = version == 5
    if isinstance(packet, Publish):
        props = encode_props(packet.props) if v5 else None
        return publish_bytes(packet.topic, packet.payload, packet.qos, packet.retain, packet.packet_id, packet.dup,
                             props)
    if isinstance(packet, Connect):
        cv5 = packet.level == 5 and packet.protocol == "MQTT"
        flags = 0x02 if packet.clean_session else 0
        payload = _text(packet.client_id)
        if packet.will is not None:
            flags |= 0x04 | (packet.will.qos << 3) | (0x20 if packet.will.retain else 0)
            if cv5:
                payload += encode_props(packet.will.props)
            payload += _text(packet.will.topic) + _binary(packet.will.message)
        if packet.username is not None:
            flags |= 0x80
            payload += _text(packet.username)
        if packet.password is not None:
            flags |= 0x40
            payload += _binary(packet.password)
        header = _text(packet.protocol) + struct.pack("!BBH", packet.level, flags, packet.keepalive)
        if cv5:
            header += encode_props(packet.props)
        return _frame(0x10, header + payload)
    if isinstance(packet, Connack):
        return connack(packet.code, packet.session_present, packet.props, version)
    if isinstance(packet, Puback):
        return puback(packet.packet_id, packet.reason, packet.props, version)
    if isinstance(packet, Pubrec):
        return pubrec(packet.packet_id, packet.reason, packet.props, version)
    if isinstance(packet, Pubrel):
        return _ack_bytes(0x62, packet.packet_id, packet.reason, packet.props, version)
    if isinstance(packet, Pubcomp):
        return pubcomp(packet.packet_id, packet.reason, packet.props, version)
    if isinstance(packet, Subscribe):
        head = struct.pack("!H", packet.packet_id) + (encode_props(packet.props) if v5 else b"")
        return _frame(0x82, head + b"".join(_text(t) + bytes((q,)) for t, q in packet.filters))
    if isinstance(packet, Suback):
        return suback(packet.packet_id, packet.codes, packet.props, version)
    if isinstance(packet, Unsubscribe):
        head = struct.pack("!H", packet.packet_id) + (encode_props(packet.props) if v5 else b"")
        return _frame(0xA2, head + b"".join(_text(t) for t in packet.filters))
    if isinstance(packet, Unsuback):
        return unsuback(packet.packet_id, packet.codes, packet.props, version)
    if isinstance(packet, Pingreq):
        return b"\xc0\x00"
    if isinstance(packet, Pingresp):
        return PINGRESP_BYTES
    if isinstance(packet, Disconnect):
        return disconnect(packet.reason, packet.props, version)
    if isinstance(packet, Auth):
        return _frame(0xF0, bytes((packet.reason,)) + encode_props(packet.props))
    raise TypeError(f"not a packet: {packet!r}")
