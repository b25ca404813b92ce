"""Synchronous MQTT 3.1.1 codec for the packets every device sends and receives.

amqtt decodes with ``async`` readers, one ``await`` per field, which is most of the CPU of a
connect storm. These parse a packet body already read whole, and build the few replies as bytes.
Anything unusual (QoS 2 flows) still goes through amqtt's codecs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class Malformed(ValueError):
    """The bytes are not a valid packet of the type announced."""


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Malformed("packet shorter than its fields")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            value = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Malformed("string is not UTF-8") from exc
        if "\x00" in value:
            raise Malformed("string contains U+0000")  # [MQTT-1.5.3-2]
        return value

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


@dataclass(frozen=True, slots=True)
class Connect:
    protocol: str
    level: int
    clean_session: bool
    keepalive: int
    client_id: str
    will_topic: str | None
    will_message: bytes | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: str | None
    reserved_flag: bool
    password_without_username: bool


def parse_connect(body: bytes) -> Connect:
    c = _Cursor(body)
    protocol = c.text()
    level = c.u8()
    flags = c.u8()
    keepalive = c.u16()
    client_id = c.text()
    will_topic = will_message = None
    if flags & 0x04:
        will_topic, will_message = c.text(), c.binary()
    username = c.text() if flags & 0x80 else None
    password = None
    if flags & 0x40:
        try:
            password = c.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Malformed("password is not UTF-8") from exc
    will_qos = (flags >> 3) & 0x03
    if will_qos == 3 or (not flags & 0x04 and (will_qos or flags & 0x20)):
        raise Malformed("invalid will flags")  # [MQTT-3.1.2-11] [MQTT-3.1.2-14]
    return Connect(protocol, level, bool(flags & 0x02), keepalive, client_id, will_topic, will_message, will_qos,
                   bool(flags & 0x20), username, password, bool(flags & 0x01),
                   bool(flags & 0x40) and not flags & 0x80)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    c = _Cursor(body)
    packet_id = c.u16()
    topics = []
    while not c.done:
        topic = c.text()
        qos = c.u8()
        if qos > 2:
            raise Malformed("requested QoS above 2")  # [MQTT-3.8.3-4]
        topics.append((topic, qos))
    return packet_id, topics


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    c = _Cursor(body)
    packet_id = c.u16()
    topics = []
    while not c.done:
        topics.append(c.text())
    return packet_id, topics


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes, int, bool]:
    """``(topic, packet_id, payload, qos, retain)``."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    c = _Cursor(body)
    topic = c.text()
    packet_id = c.u16() if qos else None
    return topic, packet_id, c.rest(), qos, bool(flags & 0x01)


def parse_packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise Malformed("acknowledgement of the wrong length")
    return int.from_bytes(body, "big")


def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connack(code: int, session_present: bool = False) -> bytes:
    return bytes((0x20, 0x02, int(session_present), code))


def suback(packet_id: int, codes: list[int]) -> bytes:
    body = struct.pack("!H", packet_id) + bytes(codes)
    return b"\x90" + encode_length(len(body)) + body


def unsuback(packet_id: int) -> bytes:
    return b"\xb0\x02" + struct.pack("!H", packet_id)


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


PINGRESP = b"\xd0\x00"
