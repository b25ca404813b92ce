"""MQTT 5.0 on the device listener: reason codes, properties, subscription options, with exact
bytes (our codec on a raw socket) and with real clients (paho, aiomqtt, mosquitto_sub/pub)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from henge_mqtt import codec

from . import mqtt_raw as raw
from .conftest import ROOT, Running, wait_status, wait_until

V5 = 5


class Client5:
    """A raw 5.0 peer: our codec's bytes on a socket, packets decoded back into values."""

    def __init__(self, raw_client: raw.RawClient) -> None:
        self.raw = raw_client

    @classmethod
    async def connect(cls, port: int, client_id: str, username: str | None, password: str | None, *,
                      keepalive: int = 60, props: codec.Props | None = None, will: codec.Will | None = None,
                      clean: bool = True) -> tuple[Client5, codec.Connack]:
        client = cls(await raw.RawClient.open(port))
        packet = codec.Connect(client_id, keepalive, clean, username, password.encode() if password else None,
                               will, "MQTT", 5, props)
        await client.raw.send(codec.encode(packet))
        connack = await client.read()
        assert isinstance(connack, codec.Connack)
        return client, connack

    async def send(self, packet: codec.Packet) -> None:
        await self.raw.send(codec.encode(packet, version=V5))

    async def read(self, timeout: float = 5.0) -> codec.Packet:
        first, body = await self.raw.read_frame(timeout)
        return codec.decode(first, body, version=V5)

    async def read_until(self, kind: type, timeout: float = 5.0) -> Any:
        while True:
            packet = await self.read(timeout)
            if isinstance(packet, kind):
                return packet


async def device5(running: Running, name: str, config: dict[str, Any] | None = None, **kw: Any
                  ) -> tuple[Client5, codec.Connack, str]:
    secret = await running.add(name, config)
    client, connack = await Client5.connect(running.port, name, name, secret, **kw)
    assert connack.code == 0, connack
    return client, connack, secret


async def test_connack_properties(running: Running) -> None:
    _client, connack, _ = await device5(running, "d1", keepalive=0)
    props = connack.props or {}
    assert props[codec.SESSION_EXPIRY_INTERVAL] == 0
    assert props[codec.RECEIVE_MAXIMUM] == running.service.settings.receive_maximum
    assert props[codec.MAXIMUM_PACKET_SIZE] == running.service.settings.max_packet_bytes + 5
    assert props[codec.RETAIN_AVAILABLE] == 1 and props[codec.WILDCARD_SUBSCRIPTION_AVAILABLE] == 1
    assert props[codec.SHARED_SUBSCRIPTION_AVAILABLE] == 0 and props[codec.SUBSCRIPTION_IDENTIFIER_AVAILABLE] == 0
    assert props[codec.TOPIC_ALIAS_MAXIMUM] == 0
    assert props[codec.SERVER_KEEP_ALIVE] == 300  # keep-alive 0 asked for: henge caps it
    assert codec.SERVER_KEEP_ALIVE not in ((await device5(running, "d2", keepalive=30))[1].props or {})
    assert connack.session_present is False


async def test_refusals_carry_5_0_reason_codes(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(sessions={"connect_burst": 1, "connect_rate": 0.01}) as running:
        secret = await running.add("d1")
        cases = [
            (("d1", "d1", "wrong"), codec.BAD_USER_NAME_OR_PASSWORD),
            (("ghost", "ghost", "x"), codec.NOT_AUTHORIZED_5),  # unknown device
            (("d2", "d1", secret), codec.NOT_AUTHORIZED_5),  # client id != user name
            (("", None, "no-user-name"), codec.CLIENT_IDENTIFIER_NOT_VALID),  # an empty id needs a user name
        ]
        for (client_id, user, password), expected in cases:
            client, connack = await Client5.connect(running.port, client_id, user, password)
            assert connack.code == expected, (client_id, connack)
            assert (connack.props or {}).get(codec.REASON_STRING), "a refusal says why"
            assert password not in str(connack.props)  # no secrets in reason strings
            assert await client.raw.closed_within(2)
        _first, connack = await Client5.connect(running.port, "d1", "d1", secret)
        assert connack.code == 0
        _, throttled = await Client5.connect(running.port, "d1", "d1", secret)  # the bucket is empty
        assert throttled.code == codec.CONNECTION_RATE_EXCEEDED
        assert (await running.service.status("d1"))[0]["online"]  # the current connection is untouched
        _, auth = await Client5.connect(running.port, "d1", "d1", secret, props={codec.AUTHENTICATION_METHOD: "SCRAM"})
        assert auth.code == codec.BAD_AUTHENTICATION_METHOD


async def test_takeover_tells_the_displaced_client_0x8e(running: Running) -> None:
    old, _, secret = await device5(running, "twin")
    _new, connack = await Client5.connect(running.port, "twin", "twin", secret)
    assert connack.code == 0
    told = await old.read_until(codec.Disconnect)
    assert told.reason == codec.SESSION_TAKEN_OVER
    assert "took over" in str((told.props or {})[codec.REASON_STRING])
    assert await old.raw.closed_within(2)


async def test_server_disconnect_reasons(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(device_publish_rate=1, device_publish_burst=2) as running:
        kicked, _, _ = await device5(running, "k1")
        await running.service.kick("k1")
        assert (await kicked.read_until(codec.Disconnect)).reason == codec.ADMINISTRATIVE_ACTION

        flood, _, _ = await device5(running, "f1")
        for _ in range(5):
            await flood.send(codec.Publish("henge/devices/f1/report", b"{}", 0))
        assert (await flood.read_until(codec.Disconnect)).reason == codec.MESSAGE_RATE_TOO_HIGH

        alias, _, _ = await device5(running, "a1")
        await alias.send(codec.Publish("henge/devices/a1/report", b"{}", 0, props={codec.TOPIC_ALIAS: 1}))
        assert (await alias.read_until(codec.Disconnect)).reason == codec.TOPIC_ALIAS_INVALID

        bad, _, _ = await device5(running, "p1")
        await bad.raw.send(b"\x30\x07\x00\x01a\x03\x7f\x00\x00")  # an unknown property
        assert (await bad.read_until(codec.Disconnect)).reason == codec.MALFORMED_PACKET

        dup, _, _ = await device5(running, "p2")
        await dup.raw.send(b"\x30\x08\x00\x01a\x04\x01\x01\x01\x01")  # a property given twice
        assert (await dup.read_until(codec.Disconnect)).reason == codec.PROTOCOL_ERROR

        filters, _, _ = await device5(running, "q1")
        await filters.send(codec.Subscribe(1, tuple((f"henge/devices/q1/{i}", 1) for i in range(20))))
        assert (await filters.read_until(codec.Disconnect)).reason == codec.QUOTA_EXCEEDED

        stay, _, _ = await device5(running, "s1")
        await running.service.stop()
        assert (await stay.read_until(codec.Disconnect)).reason == codec.SERVER_SHUTTING_DOWN


async def test_receive_maximum_exceeded_is_0x93_not_quota(start_service) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: the QoS 2 PUBLISH past the Receive Maximum henge announced is DISCONNECT 0x93 Receive
    Maximum exceeded (§3.3.4, §4.13), not 0x97 quota exceeded; docs/protocol.md says the same."""
    async with start_service(receive_maximum=3, device_publish_burst=100, device_publish_rate=100) as running:
        hoarder, connack, _ = await device5(running, "h1", {"v": 1})
        assert connack.props is not None and connack.props[codec.RECEIVE_MAXIMUM] == 3
        report = b'{"version": 1, "status": "applied"}'
        for packet_id in range(1, 4):  # never a PUBREL: each stays unacknowledged
            await hoarder.send(codec.Publish("henge/devices/h1/report", report, 2, packet_id=packet_id))
            assert (await hoarder.read_until(codec.Pubrec)).packet_id == packet_id
        await hoarder.send(codec.Publish("henge/devices/h1/report", report, 2, packet_id=4))
        told = await hoarder.read_until(codec.Disconnect)
        assert told.reason == codec.RECEIVE_MAXIMUM_EXCEEDED == 0x93
        assert told.props is not None and "Receive Maximum" in str(told.props[codec.REASON_STRING])
    assert "| DISCONNECT | 0x93 receive maximum exceeded |" in (ROOT / "docs" / "protocol.md").read_text()


async def test_keepalive_timeout_and_packet_too_large(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_packet_bytes=2048) as running:
        silent, _, _ = await device5(running, "z1", keepalive=1)
        told = await silent.read_until(codec.Disconnect, timeout=5)
        assert told.reason == codec.KEEP_ALIVE_TIMEOUT
        big, _, _ = await device5(running, "b1")
        await big.raw.send(b"\x30" + codec.encode_length(10_000))
        assert (await big.read_until(codec.Disconnect)).reason == codec.PACKET_TOO_LARGE


async def test_acks_say_why(running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    await running.add("other", {"v": 1})
    await client.send(codec.Subscribe(1, (("henge/devices/d1/config", 1), ("henge/devices/other/config", 1),
                                          ("a/#/b", 0), ("$share/g/henge/devices/d1/config", 1))))
    suback = await client.read_until(codec.Suback)
    assert suback.codes == (1, codec.NOT_AUTHORIZED_5, codec.TOPIC_FILTER_INVALID,
                            codec.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
    await client.send(codec.Publish("henge/devices/other/config", b"{}", 1, packet_id=5))
    assert (await client.read_until(codec.Puback)).reason == codec.NOT_AUTHORIZED_5
    await client.send(codec.Publish("henge/devices/d1/report", b"not json", 1, packet_id=6))
    ack = await client.read_until(codec.Puback)
    assert ack.reason == codec.PAYLOAD_FORMAT_INVALID and (ack.props or {}).get(codec.REASON_STRING)
    await client.send(codec.Publish("henge/devices/d1/report", b'{"version": 1, "status": "applied"}', 1,
                                    packet_id=7))
    assert (await client.read_until(codec.Puback)).reason == codec.SUCCESS
    await wait_status(running, "d1", lambda r: r["sync"] == "in_sync")
    await client.send(codec.Unsubscribe(8, ("henge/devices/d1/config", "henge/devices/d1/nothing")))
    assert (await client.read_until(codec.Unsuback)).codes == (0, codec.NO_SUBSCRIPTION_EXISTED)


async def test_snapshots_carry_properties_and_retain_handling(running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    await client.send(codec.Subscribe(1, (("henge/devices/d1/config", 1),)))
    await client.read_until(codec.Suback)
    snap = await client.read_until(codec.Publish)
    props = snap.props or {}
    assert props[codec.PAYLOAD_FORMAT_INDICATOR] == 1 and props[codec.CONTENT_TYPE] == "application/json"
    body = json.loads(snap.payload)
    assert dict(props[codec.USER_PROPERTY]) == {"version": "1", "sha256": body["sha256"]}
    assert snap.retain
    await client.send(codec.Puback(snap.packet_id or 0))
    # Retain Handling 1: retained messages only for a new subscription; 2: never.
    await client.send(codec.Subscribe(2, (("henge/devices/d1/config", 1 | 0x10), ("henge/devices/d1/#", 1 | 0x20))))
    await client.read_until(codec.Suback)
    await client.send(codec.Pingreq())
    assert isinstance(await client.read(), codec.Pingresp)  # nothing was sent before the PINGRESP


async def test_no_local_and_retain_as_published(running: Running) -> None:
    admin = running.service.settings.admin_name
    client, connack = await Client5.connect(running.port, "ops", admin, running.service.admin_secret)
    assert connack.code == 0
    await client.send(codec.Subscribe(1, (("ops/echo", 1 | 0x04), ("ops/rap", 1 | 0x08), ("ops/plain", 1))))
    await client.read_until(codec.Suback)
    await client.send(codec.Publish("ops/echo", b"mine", 0))
    await client.send(codec.Publish("ops/rap", b"kept", 0, retain=True))
    await client.send(codec.Publish("ops/plain", b"cleared", 0, retain=True))
    got = [await client.read_until(codec.Publish), await client.read_until(codec.Publish)]
    assert [(p.topic, p.retain) for p in got] == [("ops/rap", True), ("ops/plain", False)]  # not its own echo


async def test_will_delay_is_cancelled_by_a_reconnect(running: Running) -> None:
    watcher, _ = await Client5.connect(running.port, "watch", running.service.settings.admin_name,
                                       running.service.admin_secret)
    await watcher.send(codec.Subscribe(1, (("henge/devices/+/report", 0),)))
    await watcher.read_until(codec.Suback)
    will = codec.Will("henge/devices/w1/report", b'{"version": 1, "status": "rejected", "error": "gone"}', 0,
                      False, {codec.WILL_DELAY_INTERVAL: 1})
    keep = {codec.SESSION_EXPIRY_INTERVAL: 60}  # the session outlives the connection: the delay can run
    first, _, secret = await device5(running, "w1", {"v": 1}, will=will, props=keep, clean=False)
    first.raw.close()  # abnormal: the will is due in 1 s
    again, connack = await Client5.connect(running.port, "w1", "w1", secret, props=keep, clean=False)
    assert connack.code == 0 and connack.session_present  # a new connection to this session: cancelled
    started = time.monotonic()
    again.raw.close()  # abnormal again, with no will this time: the first one stays cancelled
    await wait_status(running, "w1", lambda r: not r["online"])
    await client_silent(watcher, 1.5)
    assert time.monotonic() - started >= 1.2
    second, _ = await Client5.connect(running.port, "w1", "w1", secret, will=will, props=keep, clean=False)
    second.raw.close()
    message = await watcher.read_until(codec.Publish, timeout=4)  # this one is not cancelled
    assert message.topic == "henge/devices/w1/report" and b"gone" in message.payload


async def client_silent(client: Client5, seconds: float) -> None:
    await client.send(codec.Pingreq())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            packet = await client.read(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            return
        assert isinstance(packet, codec.Pingresp), f"unexpected {packet!r}"
        await asyncio.sleep(0.2)
        await client.send(codec.Pingreq())


async def test_message_expiry_is_honoured(running: Running) -> None:
    admin = running.service.settings.admin_name
    pub, _ = await Client5.connect(running.port, "ops", admin, running.service.admin_secret)
    await pub.send(codec.Publish("ops/short", b"soon gone", 1, retain=True, packet_id=1,
                                 props={codec.MESSAGE_EXPIRY_INTERVAL: 1}))
    await pub.send(codec.Publish("ops/long", b"stays", 1, retain=True, packet_id=2,
                                 props={codec.MESSAGE_EXPIRY_INTERVAL: 100}))
    await pub.read_until(codec.Puback)
    await pub.read_until(codec.Puback)
    await asyncio.sleep(1.2)  # the time that passes is what is tested
    sub, _ = await Client5.connect(running.port, "ops2", admin, running.service.admin_secret)
    await sub.send(codec.Subscribe(1, (("ops/+", 1),)))
    await sub.read_until(codec.Suback)
    got = await sub.read_until(codec.Publish)
    assert got.topic == "ops/long" and 95 <= (got.props or {})[codec.MESSAGE_EXPIRY_INTERVAL] <= 100
    await sub.send(codec.Puback(got.packet_id or 0))
    await sub.send(codec.Pingreq())
    assert isinstance(await sub.read(), codec.Pingresp)  # the expired one never came


async def test_client_limits_are_respected(running: Running) -> None:
    small, _, _ = await device5(running, "tiny", {"v": 1}, props={codec.MAXIMUM_PACKET_SIZE: 400,
                                                                  codec.RECEIVE_MAXIMUM: 1})
    events: list[str] = []
    running.service.add_event_listener(lambda e: events.append(e.type))
    await small.send(codec.Subscribe(1, (("henge/devices/tiny/config", 1),)))
    await small.read_until(codec.Suback)
    first = await small.read_until(codec.Publish)
    await running.service.push("tiny", {"pad": "x" * 1000})  # over the client's Maximum Packet Size
    await wait_until(lambda: "delivery_too_large" in events)
    row = (await running.service.status("tiny"))[0]
    assert row["undeliverable"]["size"] > 400 and row["undeliverable"]["topic"] == "henge/devices/tiny/config"
    await running.service.push("tiny", {"v": 3})
    await running.service.push("tiny", {"v": 4})
    await small.send(codec.Pingreq())
    assert isinstance(await small.read(), codec.Pingresp)  # Receive Maximum 1: v3 waits for the PUBACK of v1
    await small.send(codec.Puback(first.packet_id or 0))
    third = await small.read_until(codec.Publish)
    assert json.loads(third.payload)["version"] == 3
    await small.send(codec.Puback(third.packet_id or 0))
    assert json.loads((await small.read_until(codec.Publish)).payload)["version"] == 4
    assert (await running.service.status("tiny"))[0]["undeliverable"] is None  # later configs were sent


# ---- real clients ---------------------------------------------------------------------------------


async def test_paho_v5_hears_the_takeover_reason(running: Running) -> None:
    secret = await running.add("pdev", {"v": 1})
    reasons: list[tuple[int, str]] = []
    connected = threading.Event()
    gone = threading.Event()

    def on_connect(c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        connected.set()

    def on_disconnect(c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        reasons.append((rc.value, getattr(props, "ReasonString", "")))
        gone.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pdev", protocol=paho.MQTTv5)
    client.username_pw_set("pdev", secret)
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.connect("127.0.0.1", running.port)
    client.loop_start()
    try:
        assert await asyncio.to_thread(connected.wait, 5)
        async with aiomqtt.Client("127.0.0.1", running.port, identifier="pdev", username="pdev", password=secret,
                                  protocol=aiomqtt.ProtocolVersion.V5, timeout=5) as taker:
            await taker.subscribe("henge/devices/pdev/config", qos=1)
            assert await asyncio.to_thread(gone.wait, 5)
            message = await anext(aiter(taker.messages))
            assert message.properties is not None and message.properties.ContentType == "application/json"
    finally:
        client.disconnect()
        client.loop_stop()
    assert reasons[0][0] == codec.SESSION_TAKEN_OVER and "took over" in reasons[0][1]


async def test_mosquitto_clients_speak_v5(running: Running) -> None:
    secret = await running.add("ms5", {"mode": "eco"})
    auth = ["-h", "127.0.0.1", "-p", str(running.port), "-i", "ms5", "-u", "ms5", "-P", secret, "-V", "mqttv5"]
    got = await asyncio.to_thread(subprocess.run, ["mosquitto_sub", *auth, "-t", "henge/devices/ms5/config",
                                                   "-C", "1", "-W", "5", "-F", "%p|%P"],
                                  capture_output=True, text=True, timeout=15)
    assert got.returncode == 0, got.stderr
    payload, props = got.stdout.strip().split("|", 1)
    assert json.loads(payload)["config"] == {"mode": "eco"} and "version" in props
    pub = await asyncio.to_thread(subprocess.run, ["mosquitto_pub", *auth, "-t", "henge/devices/ms5/report",
                                                   "-q", "1", "-m", '{"version": 1, "status": "applied"}'],
                                  capture_output=True, text=True, timeout=15)
    assert pub.returncode == 0, pub.stderr
    await wait_status(running, "ms5", lambda r: r["sync"] == "in_sync")
    denied = await asyncio.to_thread(subprocess.run, ["mosquitto_pub", *auth, "-t", "henge/devices/ms5/report",
                                                      "-q", "1", "-m", "not json"],
                                     capture_output=True, text=True, timeout=15)
    assert "Payload format invalid" in denied.stderr and "not a valid report" in denied.stderr



def _hostile5() -> Any:
    from hypothesis import strategies as st

    return st.one_of(
        st.binary(min_size=1, max_size=64),
        st.builds(lambda props: b"\x30" + codec.encode_length(3 + len(props)) + b"\x00\x01a" + props,
                  st.binary(max_size=20)),  # PUBLISH with arbitrary property bytes
        st.builds(lambda props: b"\x82" + codec.encode_length(6 + len(props)) + b"\x00\x01" + props + b"\x00\x01a\x01",
                  st.binary(max_size=12)),  # SUBSCRIBE with arbitrary property bytes
        st.builds(lambda body: b"\xe0" + codec.encode_length(len(body)) + body, st.binary(max_size=12)),  # DISCONNECT
        st.builds(lambda body: b"\xf0" + codec.encode_length(len(body)) + body, st.binary(max_size=12)),  # AUTH
    )


async def test_hostile_v5_packets_hurt_nobody(start_service) -> None:  # type: ignore[no-untyped-def]
    from hypothesis import HealthCheck, given, settings

    # The bystander pings after every example: more often than a device would, so its rate is raised.
    async with start_service(sessions={"connect_burst": 1000, "connect_rate": 1000}, device_publish_rate=1000,
                             device_publish_burst=1000) as running:
        await _hostile_rounds(running, given, settings, HealthCheck)


async def _hostile_rounds(running: Running, given: Any, settings: Any, HealthCheck: Any) -> None:
    good, _, _ = await device5(running, "good", {"v": 1})
    secret = await running.add("evil", {"v": 1})
    examples: list[bytes] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=_hostile5())
    def collect(data: bytes) -> None:
        examples.append(data)

    collect()
    for data in examples:
        evil, connack = await Client5.connect(running.port, "evil", "evil", secret)
        assert connack.code == 0
        await evil.raw.send(data)
        with_reply = False
        try:
            while True:  # whatever it sends back, it must be a valid 5.0 packet (or the socket closes)
                packet = await evil.read(timeout=0.3)
                with_reply = True
                if isinstance(packet, codec.Disconnect):
                    assert packet.reason >= 0x80
        except (EOFError, TimeoutError):
            pass
        evil.raw.close()
        await good.send(codec.Pingreq())  # the connected device is served, promptly
        assert isinstance(await good.read(timeout=1.0), codec.Pingresp), with_reply
    assert (await running.service.status("good"))[0]["online"]


async def test_problem_information_packet_ids_and_oversize_connect(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_packet_bytes=1024) as running:
        quiet, _, _ = await device5(running, "quiet", props={codec.REQUEST_PROBLEM_INFORMATION: 0})
        await quiet.send(codec.Subscribe(1, (("henge/devices/other/config", 1),)))
        suback = await quiet.read_until(codec.Suback)
        assert suback.codes == (codec.NOT_AUTHORIZED_5,) and not suback.props  # no reason string: it asked
        loud, _, _ = await device5(running, "loud")
        await loud.send(codec.Subscribe(1, (("henge/devices/other/config", 1),)))
        assert (await loud.read_until(codec.Suback)).props
        await loud.send(codec.Pubrel(77))
        assert (await loud.read_until(codec.Pubcomp)).reason == 0x92  # packet identifier not found
        secret = await running.add("huge")
        big = codec.encode(codec.Connect("huge", 60, True, "huge", secret.encode(), None, "MQTT", 5,
                                         {codec.USER_PROPERTY: [("pad", "x" * 2000)]}))
        client = Client5(await raw.RawClient.open(running.port))
        await client.raw.send(big)
        connack = await client.read()
        assert isinstance(connack, codec.Connack) and connack.code == codec.PACKET_TOO_LARGE
        assert await client.raw.closed_within(2)


def _sequences() -> Any:
    """Random but well-formed packet sequences a device could send after its CONNECT."""
    from hypothesis import strategies as st

    topic = st.sampled_from(["henge/devices/seq/report", "henge/devices/seq/x", "henge/devices/other/config",
                             "henge/devices/seq/#", "a/b"])
    pid = st.integers(1, 6)
    props = st.fixed_dictionaries({}, optional={
        codec.MESSAGE_EXPIRY_INTERVAL: st.integers(1, 5), codec.CONTENT_TYPE: st.sampled_from(["a", "b"]),
        codec.USER_PROPERTY: st.lists(st.tuples(st.just("k"), st.just("v")), min_size=1, max_size=2)})
    packet = st.one_of(
        st.builds(lambda t, q, p, r, pr: codec.Publish(t.replace("#", "h"), b'{"version": 1, "status": "applied"}',
                                                       q, r, p if q else None, False, pr),
                  topic, st.integers(0, 2), pid, st.booleans(), props),
        st.builds(lambda p, fs: codec.Subscribe(p, tuple(fs)), pid,
                  st.lists(st.tuples(topic, st.sampled_from([0, 1, 2, 0x04, 0x08, 0x11, 0x21])), min_size=1,
                           max_size=3)),
        st.builds(lambda p, fs: codec.Unsubscribe(p, tuple(fs)), pid, st.lists(topic, min_size=1, max_size=3)),
        pid.map(codec.Puback), pid.map(codec.Pubrel), pid.map(codec.Pubrec),  # (builds would draw the defaults too)
        st.just(codec.Pingreq()),
    )
    return st.tuples(st.sampled_from([4, 5]), st.lists(packet, min_size=1, max_size=12))


async def test_random_packet_sequences_keep_the_server_consistent(start_service) -> None:  # type: ignore[no-untyped-def]
    """Whatever order a client sends valid packets in, for both protocol versions: every reply is a
    valid packet of that version, the session ends cleanly, and a bystander is never disturbed."""
    from hypothesis import HealthCheck, given, settings

    async with start_service(sessions={"connect_burst": 1000, "connect_rate": 1000}, device_publish_rate=1000,
                             device_publish_burst=1000) as running:
        good, _, _ = await device5(running, "good", {"v": 1})
        secret = await running.add("seq", {"v": 1})
        cases: list[tuple[int, list[codec.Packet]]] = []

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=_sequences())
        def collect(case: tuple[int, list[codec.Packet]]) -> None:
            cases.append(case)

        collect()
        for version, packets in cases:
            client = Client5(await raw.RawClient.open(running.port))
            await client.raw.send(codec.encode(codec.Connect("seq", 60, True, "seq", secret.encode(), None, "MQTT",
                                                             version)))
            first, body = await client.raw.read_frame()
            ack = codec.decode(first, body, version=version)
            assert isinstance(ack, codec.Connack) and ack.code == 0
            for packet in packets:
                await client.raw.send(codec.encode(packet, version=version))
            await client.raw.send(codec.encode(codec.Pingreq()))
            with contextlib.suppress(EOFError, TimeoutError):
                while True:  # every reply decodes at the client's version, up to the PINGRESP
                    first, body = await client.raw.read_frame(timeout=2)
                    reply = codec.decode(first, body, version=version)
                    if isinstance(reply, codec.Pingresp):
                        break
            client.raw.close()
            await good.send(codec.Pingreq())
            assert isinstance(await good.read_until(codec.Pingresp, timeout=1), codec.Pingresp)
        await wait_until(lambda: running.broker.conns.get("seq") is None, 5, "the last sequence's close")
        assert running.broker.conns.get("good") is not None


async def test_henge_serve_stopping_tells_5_0_clients_and_leaves_no_socket_open(tmp_path: Path) -> None:
    """``henge serve`` on SIGTERM leaves the devices' sockets for the kernel to close at exit (instead
    of one by one): a 5.0 device is still told why (DISCONNECT 0x8B), a watcher of presence hears
    each device go offline and why, every socket is closed, the process exits 0, and each device's
    last sighting is stored (a restart says offline since then, from that address) with one
    presence-history row of the shutdown, on its epoch; a device already gone gets none."""
    import sqlite3

    from henge_mqtt.store import Store

    data = tmp_path / "data"
    store = Store(data)
    secrets = store.add_devices([("v5dev", {}), ("v4dev", {}), ("gone", {})])
    store.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0", "--no-http",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        await wait_until(lambda: (data / "service.json").exists(), 20, "henge serve started")
        service = json.loads((data / "service.json").read_text())
        port = service["port"]
        gone = await raw.RawClient.open(port)
        for _ in range(2):  # epoch 2, then offline before the shutdown
            await gone.send(raw.connect("gone", "gone", secrets["gone"]))
            assert await gone.connack() == 0
            await gone.send(raw.DISCONNECT)
            assert await gone.closed_within(5)
            gone = await raw.RawClient.open(port)
        gone.close()
        v5, connack = await Client5.connect(port, "v5dev", "v5dev", secrets["v5dev"])
        assert connack.code == 0
        v4 = await raw.RawClient.open(port)
        await v4.send(raw.connect("v4dev", "v4dev", secrets["v4dev"]))
        assert await v4.connack() == 0
        host, local_port = v4.writer.get_extra_info("sockname")[:2]
        v4_address = f"{host}:{local_port}"
        watcher = await raw.RawClient.open(port)
        admin = json.loads((data / "admin.json").read_text())
        await watcher.send(raw.connect("watcher", admin["name"], admin["secret"]))
        assert await watcher.connack() == 0
        await watcher.send(raw.subscribe(1, "henge/devices/v4dev/presence"))
        assert (await watcher.read_packet())[0] == 9
        kind, body = await watcher.read_packet()
        assert kind == 3 and b'"state":"online"' in body  # retained: v4dev is online
        proc.send_signal(signal.SIGTERM)
        kind, body = await watcher.read_packet()
        assert kind == 3 and b'"state":"offline"' in body and b'"reason":"server_shutdown"' in body
        assert (await v5.read_until(codec.Disconnect)).reason == codec.SERVER_SHUTTING_DOWN
        assert await v5.raw.closed_within(5) and await v4.closed_within(5)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    assert "Traceback" not in (await proc.stderr.read()).decode()
    store = Store(data)
    try:
        seen = {device: (last_seen, remote) for device, _, last_seen, remote in store.sessions()}
    finally:
        store.close()
    assert seen["v4dev"][1] == v4_address and seen["v4dev"][0] is not None
    assert seen["v5dev"][0] is not None
    db = sqlite3.connect(data / "henge.db")
    try:
        last = dict(db.execute("SELECT device, last_reason FROM device_sessions"))
        shutdown = db.execute("SELECT device, state, epoch, at FROM presence_history WHERE reason = 'server_shutdown' "
                              "ORDER BY device").fetchall()
        gone_rows = db.execute("SELECT state, reason, epoch FROM presence_history WHERE device = 'gone' "
                               "ORDER BY at").fetchall()
    finally:
        db.close()
    assert (last["v4dev"], last["v5dev"], last["gone"]) == ("server_shutdown", "server_shutdown", "client_disconnect")
    assert shutdown == [("v4dev", "offline", 1, seen["v4dev"][0]), ("v5dev", "offline", 1, seen["v5dev"][0])]
    assert gone_rows == [("online", "connected", 1), ("offline", "client_disconnect", 1), ("online", "connected", 2),
                         ("offline", "client_disconnect", 2)]
