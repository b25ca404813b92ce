"""The MQTT 3.1.1 codec without a network: round trips for every packet type, garbage in, and
interoperability with amqtt's public packet classes (an independent implementation)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from hypothesis import given, settings
from hypothesis import strategies as st

from henge_mqtt import codec


def made(cls: Any) -> Any:
    """``cls`` as hypothesis should build it: from the arguments given only (for a named tuple it
    would draw the fields left to their defaults too)."""
    return lambda *args, **kwargs: cls(*args, **kwargs)


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
packet_id = st.integers(1, 65535)
qos = st.integers(0, 2)

packets = st.one_of(
    st.builds(made(codec.Connect), client_id=text, keepalive=st.integers(0, 65535), clean_session=st.booleans(),
              username=st.none() | text, password=st.none() | st.binary(max_size=40),
              will=st.none() | st.builds(made(codec.Will), topic=text, message=st.binary(max_size=60), qos=qos,
                                         retain=st.booleans()),
              protocol=st.sampled_from(["MQTT", "MQIsdp"]), level=st.integers(0, 255),
              ).filter(lambda c: c.username is not None or c.password is None  # [MQTT-3.1.2-22]
                       # a 5.0 CONNECT always carries properties (maybe none): its canonical form is {}
                       # (5.0 is level 5 with the protocol name MQTT: 'MQIsdp' at level 5 carries none)
                       ).map(lambda c: c._replace(props={})
                             if c.level == 5 and c.protocol == "MQTT" and c.props is None else c),
    st.builds(made(codec.Connack), code=st.integers(0, 255), session_present=st.booleans()),
    st.builds(lambda t, p, q, r, i, d: codec.Publish(t, p, q, r, i if q else None, d and q > 0),
              text.filter(bool), st.binary(max_size=300), qos, st.booleans(), packet_id, st.booleans()),
    packet_id.map(codec.Puback), packet_id.map(codec.Pubrec), packet_id.map(codec.Pubrel),
    packet_id.map(codec.Pubcomp),
    st.builds(made(codec.Subscribe), packet_id, st.lists(st.tuples(text, qos), min_size=1, max_size=5).map(tuple)),
    st.builds(made(codec.Suback), packet_id,
              st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5).map(tuple)),
    st.builds(made(codec.Unsubscribe), packet_id, st.lists(text, min_size=1, max_size=5).map(tuple)),
    st.builds(made(codec.Unsuback), packet_id),
    st.just(codec.Pingreq()), st.just(codec.Pingresp()), st.just(codec.Disconnect()),
)


def _one_frame(data: bytes) -> tuple[int, bytes]:
    frames = codec.Framer(codec.MAX_REMAINING_LENGTH).feed(data)
    assert len(frames) == 1
    return frames[0]


@given(packets)
def test_every_packet_type_round_trips(packet: codec.Packet) -> None:
    first, body = _one_frame(codec.encode(packet))
    decoded = codec.decode(first, body)
    assert type(decoded) is type(packet) and decoded == packet  # (tuples: equal fields of two types are equal)


@given(st.lists(packets, min_size=1, max_size=8), st.data())
def test_framer_cuts_a_stream_anywhere(stream: list[codec.Packet], data: st.DataObject) -> None:
    wire = b"".join(codec.encode(p) for p in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    framer = codec.Framer(codec.MAX_REMAINING_LENGTH)
    frames: list[tuple[int, bytes]] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        frames += framer.feed(wire[start:end])
    assert [codec.decode(f, b) for f, b in frames] == stream
    assert framer.pending == 0


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_the_codecs_error(data: bytes) -> None:
    framer = codec.Framer(1000)
    try:
        for first, body in framer.feed(data):
            codec.decode(first, body)
    except codec.CodecError:
        pass


@given(st.integers(0, 255), st.binary(max_size=100))
def test_any_body_under_any_first_byte_raises_only_the_codecs_error(first: int, body: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode(first, body)


def test_oversize_is_refused_from_the_length_prefix_alone() -> None:
    framer = codec.Framer(100)
    header = b"\x30" + codec.encode_length(101)  # no body sent at all
    try:
        framer.feed(header)
    except codec.PacketTooLarge as exc:
        assert exc.size == 101 and exc.limit == 100
    else:
        raise AssertionError("an oversize packet was accepted")


def test_protocol_violations_are_codec_errors() -> None:
    bad = [
        (0x36, b"\x00\x01a\x00\x01"),  # PUBLISH QoS 3
        (0x38, b"\x00\x01a"),  # DUP on QoS 0
        (0x32, b"\x00\x01a\x00\x00"),  # packet id 0
        (0x80, b"\x00\x01\x00\x01a\x01"),  # SUBSCRIBE with flags 0
        (0x82, b"\x00\x01"),  # SUBSCRIBE without filters
        (0x82, b"\x00\x01\x00\x01a\x03"),  # requested QoS 3
        (0x60, b"\x00\x01"),  # PUBREL with flags 0
        (0x10, b"\x00\x04MQTT\x04\x01\x00\x3c\x00\x01c"),  # CONNECT reserved flag
        (0x10, b"\x00\x04MQTT\x04\x42\x00\x3c\x00\x01c\x00\x01p"),  # password without user name
        (0x30, b"\x00\x02\xc3\x28"),  # topic not UTF-8
        (0x30, b"\x00\x01\x00"),  # topic with U+0000
        (0xF0, b""),  # reserved type 15
    ]
    for first, body in bad:
        try:
            codec.decode(first, body)
        except codec.CodecError:
            continue
        raise AssertionError(f"accepted {first:#x} {body!r}")


# ---- interoperability with an independent codec (amqtt's public packet classes) -------------


def _amqtt_decode(cls: type, data: bytes) -> object:
    return asyncio.run(cls.from_stream(BufferReader(data)))


@given(text.filter(lambda t: bool(t) and "+" not in t and "#" not in t), st.binary(max_size=200), st.integers(0, 1),
       st.booleans(), packet_id)
def test_publish_matches_amqtt(topic: str, payload: bytes, q: int, retain: bool, pid: int) -> None:
    ours = codec.publish_bytes(topic, payload, q, retain, pid if q else None)
    theirs = PublishPacket.build(topic, payload, pid if q else None, False, q, retain)
    assert ours == theirs.to_bytes()
    packet = _amqtt_decode(PublishPacket, ours)
    assert (packet.topic_name, bytes(packet.data), packet.qos) == (topic, payload, q)  # type: ignore[attr-defined]


def test_subscribe_and_connect_decode_in_amqtt() -> None:
    sub = codec.encode(codec.Subscribe(7, (("henge/devices/d1/config", 1), ("a/+/b", 0))))
    decoded = _amqtt_decode(SubscribePacket, sub)
    assert decoded.payload.topics == [("henge/devices/d1/config", 1), ("a/+/b", 0)]  # type: ignore[attr-defined]
    con = codec.encode(codec.Connect("d1", 30, True, "d1", b"s3cret", codec.Will("w", b"bye", 1, False)))
    packet = _amqtt_decode(ConnectPacket, con)
    assert (packet.client_id, packet.username, packet.password, packet.will_topic) == (  # type: ignore[attr-defined]
        "d1", "d1", "s3cret", "w")


# ---- MQTT 5.0 ---------------------------------------------------------------------------------

user_props = st.lists(st.tuples(text, text), min_size=1, max_size=3)


def _props(where: str) -> st.SearchStrategy[dict[int, object]]:
    values = {
        codec.BYTE: st.integers(0, 1), codec.U16: st.integers(1, 65535), codec.U32: st.integers(1, 2**32 - 1),
        codec.VARINT: st.integers(1, 268_435_455), codec.UTF8: text, codec.BINARY: st.binary(max_size=20),
    }
    allowed = sorted(codec.ALLOWED[where])
    entries = {}
    for ident in allowed:
        kind = codec.PROPERTIES[ident][1]
        entries[ident] = user_props if kind == codec.PAIR else values[kind]
        if ident == codec.SUBSCRIPTION_IDENTIFIER and where == "publish":
            entries[ident] = st.lists(values[codec.VARINT], min_size=1, max_size=2)
    return st.fixed_dictionaries({}, optional=entries)  # type: ignore[arg-type]


packets5 = st.one_of(
    st.builds(made(codec.Connect), client_id=text, keepalive=st.integers(0, 65535), clean_session=st.booleans(),
              username=st.none() | text, password=st.none() | st.binary(max_size=40),
              will=st.none() | st.builds(made(codec.Will), topic=text, message=st.binary(max_size=60), qos=qos,
                                         retain=st.booleans(), props=_props("will")),
              protocol=st.just("MQTT"), level=st.just(5), props=_props("connect")),
    st.builds(made(codec.Connack), code=st.integers(0, 255), session_present=st.booleans(), props=_props("connack")),
    st.builds(lambda t, p, q, r, i, d, pr: codec.Publish(t, p, q, r, i if q else None, d and q > 0, pr),
              text.filter(bool), st.binary(max_size=300), qos, st.booleans(), packet_id, st.booleans(),
              _props("publish")),
    *(st.builds(cls, packet_id, st.integers(1, 255), _props("ack"))
      for cls in (codec.Puback, codec.Pubrec, codec.Pubrel, codec.Pubcomp)),
    st.builds(made(codec.Subscribe), packet_id,
              st.lists(st.tuples(text, st.sampled_from([0, 1, 2, 4, 9, 0x16, 0x2A])), min_size=1, max_size=5)
              .map(tuple), _props("subscribe")),
    st.builds(made(codec.Suback), packet_id, st.lists(st.integers(0, 255), min_size=1, max_size=5).map(tuple),
              _props("ack")),
    st.builds(made(codec.Unsubscribe), packet_id, st.lists(text, min_size=1, max_size=5).map(tuple),
              _props("unsubscribe")),
    st.builds(made(codec.Unsuback), packet_id, st.lists(st.integers(0, 255), max_size=5).map(tuple), _props("ack")),
    st.builds(made(codec.Disconnect), st.integers(1, 255), _props("disconnect")),
    st.builds(made(codec.Auth), st.integers(0, 255), _props("auth")),
)


def _normalize(packet: codec.Packet) -> codec.Packet:
    """Empty property sections decode as {} (or None where the field may be left out)."""
    changes: dict[str, object] = {"props": None} if "props" in packet._fields and not packet._asdict()["props"] else {}
    if isinstance(packet, codec.Connect) and packet.will is not None and not packet.will.props:
        changes["will"] = packet.will._replace(props=None)
    return packet._replace(**changes)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(packets5)
def test_every_v5_packet_type_round_trips(packet: codec.Packet) -> None:
    first, body = _one_frame(codec.encode(packet, version=5))
    decoded = _normalize(codec.decode(first, body, version=5))
    assert type(decoded) is type(packet) and decoded == _normalize(packet)


@settings(max_examples=500)
@given(st.integers(0, 255), st.binary(max_size=120))
def test_any_v5_body_raises_only_the_codecs_error(first: int, body: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode(first, body, version=5)
    with contextlib.suppress(codec.CodecError):
        codec.decode_connect(b"\x00\x04MQTT\x05" + body)


def test_v5_protocol_violations_carry_their_reason_code() -> None:
    def props(*pairs: bytes) -> bytes:
        raw = b"".join(pairs)
        return codec.encode_length(len(raw)) + raw

    cases = [
        (0x30, b"\x00\x01a" + props(b"\x11\x00\x00\x00\x01"), codec.PROTOCOL_ERROR),  # session expiry on PUBLISH
        (0x30, b"\x00\x01a" + props(b"\x01\x01", b"\x01\x01"), codec.PROTOCOL_ERROR),  # duplicate property
        (0x30, b"\x00\x01a" + props(b"\x01\x02"), codec.PROTOCOL_ERROR),  # payload format indicator 2
        (0x30, b"\x00\x01a" + props(b"\x7f\x00"), codec.MALFORMED_PACKET),  # unknown property
        (0x30, b"\x00\x01a" + b"\x05\x01", codec.MALFORMED_PACKET),  # properties longer than the packet
        (0x82, b"\x00\x01\x00\x00\x01a\xc1", codec.MALFORMED_PACKET),  # reserved option bits
        (0x82, b"\x00\x01\x00\x00\x01a\x31", codec.MALFORMED_PACKET),  # retain handling 3
    ]
    for first, body, reason in cases:
        try:
            codec.decode(first, body, version=5)
        except codec.CodecError as exc:
            assert exc.reason == reason, (first, body, exc)
            continue
        raise AssertionError(f"accepted {first:#x} {body!r}")
