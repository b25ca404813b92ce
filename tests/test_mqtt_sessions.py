"""Persistent sessions, assigned client ids and the will's delay, by the book (issue "Any MQTT client"):
each test is named after the normative statement of MQTT 3.1.1 / 5.0 it checks, with raw peers for the
bytes (CONNACK flags, DUP, packet ids, order) and paho-mqtt (both versions), aiomqtt and
`mosquitto_sub -c` as the clients devices run."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from henge_mqtt import codec
from henge_mqtt.service import HengeService

from . import mqtt_raw as raw
from .conftest import Running, make_settings, wait_status, wait_until

CONFIG = "henge/devices/{}/config"


async def connect311(running: Running, device: str, secret: str, *, clean: bool,
                     client_id: str | None = None) -> tuple[raw.RawClient, bytes]:
    """A raw 3.1.1 device; returns the client and its CONNACK's two bytes (flags, code)."""
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect(device if client_id is None else client_id, device, secret, clean=clean))
    kind, body = await client.read_packet()
    assert kind == 2
    return client, body


async def publishes(client: raw.RawClient, count: int, timeout: float = 5.0) -> list[codec.Publish]:
    got: list[codec.Publish] = []
    while len(got) < count:
        first, body = await client.read_frame(timeout)
        if first >> 4 == codec.PUBLISH:
            got.append(codec.decode_publish(first, body, 4))
    return got


async def nothing_more(client: raw.RawClient, wait: float = 0.5) -> None:
    try:
        first, _ = await client.read_frame(wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected packet type {first >> 4}")


def puback(packet_id: int) -> bytes:
    return raw.packet(4, struct.pack("!H", packet_id))


def config_of(message: codec.Publish) -> Any:
    return json.loads(message.payload)["config"]


async def away_session(running: Running, device: str, secret: str) -> None:
    """A 3.1.1 device that subscribed with CleanSession 0, acknowledged its snapshot, and left cleanly."""
    client, _ = await connect311(running, device, secret, clean=False)
    await client.send(raw.subscribe(1, CONFIG.format(device)))
    assert (await client.read_packet())[0] == 9
    [snapshot] = await publishes(client, 1)
    assert snapshot.packet_id is not None
    await client.send(puback(snapshot.packet_id))
    await client.send(raw.DISCONNECT)
    assert await client.closed_within(2)
    await wait_status(running, device, lambda r: not r["online"])


# ---- 3.1.1 ------------------------------------------------------------------------------------------


async def test_MQTT_3_2_2_3_a_first_cleansession_0_connect_has_no_session_present(running: Running) -> None:
    secret = await running.add("s1", {"v": 1})
    _, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x00\x00"  # session present 0, accepted


async def test_MQTT_3_1_2_4_and_3_2_2_2_cleansession_0_resumes_with_what_arrived_meanwhile(running: Running) -> None:
    """[MQTT-3.1.2-4] resume from the session; [MQTT-3.2.2-2] session present 1; [MQTT-3.1.2-5] QoS 1
    messages for its subscriptions kept while away, collapsed to the latest snapshot (one, not two)."""
    secret = await running.add("s1", {"v": 1})
    await away_session(running, "s1", secret)
    await running.service.push("s1", {"v": 2})
    await running.service.push("s1", {"v": 3})
    client, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x01\x00"  # CONNACK 20 02 01 00
    [message] = await publishes(client, 1)  # no SUBSCRIBE: the session still holds it
    assert config_of(message) == {"v": 3} and message.qos == 1
    await client.send(puback(message.packet_id or 0))
    await nothing_more(client)
    await running.service.push("s1", {"v": 4})  # and live deliveries go on through the session
    [live] = await publishes(client, 1)
    assert config_of(live) == {"v": 4}


async def test_MQTT_3_1_2_5_other_messages_queue_in_order_while_away(running: Running) -> None:
    """Non-retained QoS 1 messages published while the device is away all wait, in order (QoS 0 ones
    need not); only retained ones supersede each other (as on the broker itself)."""
    secret = await running.add("s1", {"v": 1})
    await away_session(running, "s1", secret)
    async with running.admin_client() as admin:
        for n, qos in ((1, 0), (2, 1), (3, 1)):
            await admin.publish(CONFIG.format("s1"), json.dumps({"config": {"n": n}}), qos=qos)
        await admin.publish(CONFIG.format("s1"), json.dumps({"config": {"r": 1}}), qos=1, retain=True)
        await admin.publish(CONFIG.format("s1"), json.dumps({"config": {"r": 2}}), qos=1, retain=True)
    client, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x01\x00"
    got = await publishes(client, 3)
    assert [config_of(m) for m in got] == [{"n": 2}, {"n": 3}, {"r": 2}]
    for message in got:
        await client.send(puback(message.packet_id or 0))
    await nothing_more(client)


async def test_MQTT_3_1_2_6_and_3_2_2_1_cleansession_1_discards_the_session(running: Running) -> None:
    secret = await running.add("s1", {"v": 1})
    await away_session(running, "s1", secret)
    clean, connack = await connect311(running, "s1", secret, clean=True)
    assert connack == b"\x00\x00"
    await running.service.push("s1", {"v": 2})
    await nothing_more(clean)  # the session's subscription went with it
    await clean.send(raw.DISCONNECT)
    assert await clean.closed_within(2)
    again, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x00\x00"  # a new session
    await nothing_more(again)


async def test_MQTT_4_4_0_1_unacknowledged_qos1_is_resent_with_dup_and_its_packet_ids_in_order(
        running: Running) -> None:
    secret = await running.add("s1", {"v": 1})
    client, _ = await connect311(running, "s1", secret, clean=False)
    await client.send(raw.subscribe(1, CONFIG.format("s1")))
    assert (await client.read_packet())[0] == 9
    await running.service.push("s1", {"v": 2})
    first = await publishes(client, 2)  # the retained v1, then v2: neither acknowledged
    assert [config_of(m) for m in first] == [{"v": 1}, {"v": 2}] and not any(m.dup for m in first)
    client.writer.transport.abort()  # the network goes
    await wait_status(running, "s1", lambda r: not r["online"])
    again, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x01\x00"
    resent = await publishes(again, 2)
    assert [(m.dup, m.packet_id, config_of(m)) for m in resent] == [
        (True, first[0].packet_id, {"v": 1}), (True, first[1].packet_id, {"v": 2})]
    for message in resent:
        await again.send(puback(message.packet_id or 0))
    await nothing_more(again)


async def test_MQTT_3_1_3_8_an_empty_client_id_with_cleansession_0_is_refused_0x02(running: Running) -> None:
    secret = await running.add("s1")
    client, connack = await connect311(running, "s1", secret, clean=False, client_id="")
    assert connack == b"\x00\x02"  # identifier rejected
    assert await client.closed_within(2)


async def test_MQTT_3_1_3_6_an_empty_client_id_becomes_the_user_name(running: Running) -> None:
    """Several SDKs send an empty client id: the server assigns one, here the user name (as Mosquitto's
    use_username_as_clientid); the device is then known, online, by its id."""
    secret = await running.add("s1", {"v": 1})
    client, connack = await connect311(running, "s1", secret, clean=True, client_id="")
    assert connack == b"\x00\x00"
    await wait_status(running, "s1", lambda r: r["online"])
    await client.send(raw.subscribe(1, CONFIG.format("s1")))
    assert (await client.read_packet())[0] == 9
    assert config_of((await publishes(client, 1))[0]) == {"v": 1}


async def test_takeover_keeps_the_session_not_the_displaced_connections_state(running: Running) -> None:
    """A second CleanSession 0 connection takes the session over: subscriptions carry on; the displaced
    connection's will does not (suppressed, as on any takeover)."""
    secret = await running.add("s1", {"v": 1})
    async with running.admin_client() as watcher:
        await watcher.subscribe("henge/devices/s1/report", qos=1)
        old = await raw.RawClient.open(running.port)
        await old.send(raw.connect("s1", "s1", secret, clean=False, will=("henge/devices/s1/report", b"WILL")))
        assert await old.connack() == 0
        await old.send(raw.subscribe(1, CONFIG.format("s1")))
        assert (await old.read_packet())[0] == 9
        [snapshot] = await publishes(old, 1)
        await old.send(puback(snapshot.packet_id or 0))
        new, connack = await connect311(running, "s1", secret, clean=False)
        assert connack == b"\x01\x00"
        assert await old.closed_within(2)
        await running.service.push("s1", {"v": 2})
        [message] = await publishes(new, 1)
        assert config_of(message) == {"v": 2} and not message.dup
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(watcher.messages.__anext__(), 0.5)


async def test_kick_and_removal_end_the_session(running: Running) -> None:
    secret = await running.add("s1", {"v": 1})
    await away_session(running, "s1", secret)
    assert (await running.service.status("s1"))[0]["session"]["persistent"]
    client, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x01\x00"
    await wait_status(running, "s1", lambda r: r["online"])
    await running.service.kick("s1")
    assert await client.closed_within(2)
    assert (await running.service.status("s1"))[0]["session"] is None
    again, connack = await connect311(running, "s1", secret, clean=False)
    assert connack == b"\x00\x00"  # kicked: the device starts afresh
    await again.send(raw.subscribe(1, CONFIG.format("s1")))
    assert (await again.read_packet())[0] == 9
    await again.send(raw.DISCONNECT)
    await wait_status(running, "s1", lambda r: not r["online"])
    assert running.broker.sessions.get("s1") is not None
    await running.service.remove_device("s1")
    assert running.broker.sessions.get("s1") is None and len(running.broker.index) == 0


# ---- 5.0 ----------------------------------------------------------------------------------------


async def connect5(running: Running, device: str, secret: str, *, clean: bool = True, expiry: int | None = None,
                   client_id: str | None = None, will: codec.Will | None = None) -> tuple[raw.RawClient, codec.Connack]:
    client = await raw.RawClient.open(running.port)
    props = {codec.SESSION_EXPIRY_INTERVAL: expiry} if expiry is not None else None
    await client.send(codec.encode(codec.Connect(device if client_id is None else client_id, 60, clean, device,
                                                 secret.encode(), will, "MQTT", 5, props)))
    first, body = await client.read_frame()
    connack = codec.decode(first, body, version=5)
    assert isinstance(connack, codec.Connack)
    return client, connack


async def test_MQTT_3_2_2_16_an_empty_client_id_is_assigned_and_said(running: Running) -> None:
    secret = await running.add("s5")
    _, connack = await connect5(running, "s5", secret, client_id="")
    assert connack.code == 0 and (connack.props or {})[codec.ASSIGNED_CLIENT_IDENTIFIER] == "s5"


async def test_MQTT_3_2_2_x_session_expiry_is_granted_up_to_the_maximum(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(session_expiry_max=3600) as running:
        secret = await running.add("s5")
        _, connack = await connect5(running, "s5", secret, clean=False, expiry=0xFFFFFFFF)
        assert (connack.props or {})[codec.SESSION_EXPIRY_INTERVAL] == 3600  # what the server keeps, said


async def test_MQTT_3_1_3_9_the_will_goes_when_the_session_ends_if_that_is_first(running: Running) -> None:
    """Will Delay 60 s with Session Expiry 0: the session ends with the connection, so the will goes at
    once (§3.1.2.5); with Session Expiry 1: after 1 s, when the session ends."""
    secret = await running.add("w5")
    async with running.admin_client() as watcher:
        await watcher.subscribe("henge/devices/w5/report", qos=1)
        will = codec.Will("henge/devices/w5/report", b"WILL", 1, False, {codec.WILL_DELAY_INTERVAL: 60})
        for expiry, at_most in ((0, 1.0), (1, 2.5)):
            client, connack = await connect5(running, "w5", secret, expiry=expiry, will=will)
            assert connack.code == 0
            await wait_status(running, "w5", lambda r: r["online"])
            lost = time.monotonic()
            client.writer.transport.abort()
            message = await asyncio.wait_for(watcher.messages.__anext__(), 5)
            assert message.payload == b"WILL" and time.monotonic() - lost < at_most
            assert time.monotonic() - lost >= (0.8 if expiry else 0)


async def test_MQTT_3_3_2_5_a_message_that_expires_while_it_waits_in_the_session_is_not_sent(
        running: Running) -> None:
    """Published while the device is away, with Message Expiry Intervals 1 s and 60 s: after 2 s only
    the second is delivered, with what is left of its interval."""
    secret = await running.add("x5")
    client, _ = await connect5(running, "x5", secret, clean=False, expiry=600)
    await client.send(codec.encode(codec.Subscribe(1, ((CONFIG.format("x5"), 1),)), version=5))
    await client.read_frame()
    await client.send(codec.encode(codec.Disconnect(0), version=5))
    await wait_status(running, "x5", lambda r: not r["online"])
    async with running.admin_client(protocol=aiomqtt.ProtocolVersion.V5) as admin:
        for seconds in (1, 60):
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = seconds
            await admin.publish(CONFIG.format("x5"), json.dumps({"config": {"lives": seconds}}), qos=1,
                                properties=props)
    await asyncio.sleep(2.1)  # what is tested: time passing while the messages wait
    again, connack = await connect5(running, "x5", secret, clean=False, expiry=600)
    assert connack.session_present
    first, body = await again.read_frame()
    message = codec.decode(first, body, version=5)
    assert isinstance(message, codec.Publish) and json.loads(message.payload)["config"] == {"lives": 60}
    assert 55 <= (message.props or {})[codec.MESSAGE_EXPIRY_INTERVAL] <= 58
    with pytest.raises(TimeoutError):
        await again.read_frame(0.5)


async def test_MQTT_3_1_2_23_an_expired_session_frees_everything(running: Running) -> None:
    secret = await running.add("e5", {"v": 1})
    baseline = len(running.broker.index)
    client, _ = await connect5(running, "e5", secret, clean=False, expiry=1)
    await client.send(codec.encode(codec.Subscribe(1, ((CONFIG.format("e5"), 1),)), version=5))
    await client.read_frame()
    await client.send(codec.encode(codec.Disconnect(0), version=5))
    await wait_status(running, "e5", lambda r: not r["online"])
    session = running.broker.sessions["e5"]
    await running.service.push("e5", {"v": 2})  # queued while away
    assert session.memory_parts() == (1, 1, 1) and len(running.broker.index) == baseline + 1  # v1 unacked
    await wait_until(lambda: "e5" not in running.broker.sessions, 5, "the session to expire")
    assert session.memory_parts() == (0, 0, 0) and len(running.broker.index) == baseline
    store = running.service.store

    async def forgotten() -> bool:
        return await running.service.worker.run(store.mqtt_sessions) == []

    await wait_until(forgotten, 5, "the store to forget it")
    _, connack = await connect5(running, "e5", secret, clean=False, expiry=1)
    assert connack.code == 0 and not connack.session_present


async def test_MQTT_3_14_2_2_a_disconnect_may_shorten_a_session_not_start_one(running: Running) -> None:
    secret = await running.add("d5")
    client, _ = await connect5(running, "d5", secret, clean=False, expiry=600)
    await client.send(codec.encode(codec.Disconnect(0, {codec.SESSION_EXPIRY_INTERVAL: 0}), version=5))
    await wait_status(running, "d5", lambda r: not r["online"])
    assert "d5" not in running.broker.sessions  # ended with the connection, as the client asked
    clean, _ = await connect5(running, "d5", secret, expiry=0)
    await clean.send(codec.encode(codec.Disconnect(0, {codec.SESSION_EXPIRY_INTERVAL: 60}), version=5))
    first, body = await clean.read_frame()
    told = codec.decode(first, body, version=5)
    assert isinstance(told, codec.Disconnect) and told.reason == codec.PROTOCOL_ERROR


# ---- sessions survive a restart; status says so ----------------------------------------------------


async def test_sessions_survive_a_service_restart_and_status_shows_them(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    async with HengeService(settings) as service:
        running = Running(service, tmp_path / "data")
        secret = await running.add("r1", {"v": 1})
        await away_session(running, "r1", secret)
        row = (await service.status("r1"))[0]
        assert row["session"]["persistent"] and row["session"]["expires_at"] is not None
    async with HengeService(make_settings(tmp_path / "data")) as service:  # the gateway rebooted
        running = Running(service, tmp_path / "data")
        assert (await service.status("r1"))[0]["session"]["expiry"] == 7 * 86400
        await service.push("r1", {"v": 2})
        client, connack = await connect311(running, "r1", secret, clean=False)
        assert connack == b"\x01\x00"
        [message] = await publishes(client, 1)  # without a SUBSCRIBE: the subscription survived
        assert config_of(message) == {"v": 2}
        await client.send(puback(message.packet_id or 0))
        shown = await asyncio.to_thread(_cli, "device", "show", "r1", "--data", str(tmp_path / "data"))
        assert "persistent (connected; kept 604800 s after it disconnects)" in shown
        client.writer.transport.abort()
        await wait_status(running, "r1", lambda r: not r["online"])
        status = await asyncio.to_thread(_cli, "status", "r1", "--data", str(tmp_path / "data"))
        assert status.splitlines()[-1].startswith("session: persistent (expires 20") and "in 6d)" in status


def _cli(*args: str) -> str:
    from .conftest import henge_cli

    done = henge_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- the clients devices run ---------------------------------------------------------------------


def _paho(version: str, device: str, secret: str, port: int, received: list[Any]) -> paho.Client:
    if version == "5":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv311,
                             clean_session=False)
    client.username_pw_set(device, secret)
    client.on_message = lambda c, u, m: received.append(json.loads(m.payload)["config"])
    return client


@pytest.mark.parametrize("version", ["3.1.1", "5"])
async def test_paho_keeps_its_subscription_across_reconnects(running: Running, version: str) -> None:
    secret = await running.add("p1", {"v": 1})
    received: list[Any] = []
    flags: list[bool] = []

    def connect() -> paho.Client:
        client = _paho(version, "p1", secret, running.port, received)
        client.on_connect = lambda c, u, f, rc, p: flags.append(bool(f.session_present))
        if version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            client.connect("127.0.0.1", running.port, clean_start=False, properties=props)
        else:
            client.connect("127.0.0.1", running.port)
        client.loop_start()
        return client

    first = connect()
    await wait_until(lambda: flags == [False], 5, "the first CONNACK")
    first.subscribe(CONFIG.format("p1"), qos=1)
    await wait_until(lambda: received == [{"v": 1}], 5, "the retained snapshot")
    first.disconnect()
    first.loop_stop()
    await wait_status(running, "p1", lambda r: not r["online"])
    await running.service.push("p1", {"v": 2})
    second = connect()  # subscribes to nothing: the session does
    try:
        await wait_until(lambda: received == [{"v": 1}, {"v": 2}], 5, "the snapshot pushed while away")
        assert flags == [False, True]
        await running.service.push("p1", {"v": 3})
        await wait_until(lambda: received[-1] == {"v": 3}, 5, "a live delivery")
    finally:
        second.disconnect()
        second.loop_stop()


async def test_aiomqtt_with_a_persistent_session_gets_what_it_missed(running: Running) -> None:
    secret = await running.add("a1", {"v": 1})
    async with running.device_client("a1", secret, clean_session=False) as client:
        await client.subscribe(CONFIG.format("a1"), qos=1)
        message = await asyncio.wait_for(client.messages.__anext__(), 5)
        assert json.loads(message.payload)["config"] == {"v": 1}  # type: ignore[arg-type]
    await wait_status(running, "a1", lambda r: not r["online"])
    await running.service.push("a1", {"v": 2})
    async with running.device_client("a1", secret, clean_session=False) as client:
        message = await asyncio.wait_for(client.messages.__anext__(), 5)
        assert json.loads(message.payload)["config"] == {"v": 2}  # type: ignore[arg-type]


async def test_mosquitto_sub_c_gets_the_session_s_message_and_the_retained_one(running: Running) -> None:
    """`mosquitto_sub -c` (a persistent session) subscribes again on every start: with the session it
    gets the message queued while it was away *and* the retained one; a clean client gets one."""
    secret = await running.add("m1", {"v": 1})
    sub = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    base = [sub, "-h", "127.0.0.1", "-p", str(running.port), "-i", "m1", "-u", "m1", "-P", secret, "-t",
            CONFIG.format("m1"), "-q", "1", "-W", "5"]

    def run(*extra: str) -> list[Any]:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=20)
        return [json.loads(line)["config"] for line in done.stdout.splitlines()]

    assert await asyncio.to_thread(run, "-c", "-C", "1") == [{"v": 1}]
    await wait_status(running, "m1", lambda r: not r["online"])
    await running.service.push("m1", {"v": 2})
    assert await asyncio.to_thread(run, "-c", "-C", "2") == [{"v": 2}, {"v": 2}]


# ---- the offline queue, as a property ------------------------------------------------------------


def test_the_offline_queue_is_bounded_ordered_and_collapses_retained_messages() -> None:
    """Whatever is published for a session with no connection: at most ``max_queued`` messages wait;
    a retained message leaves at most one per topic (the latest); the rest keep their order; the
    newest message is always kept."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from henge_mqtt.server.session import Session

    topics = st.sampled_from(["a", "b", "c", "d"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(topics, st.booleans()), max_size=60), st.integers(min_value=1, max_value=8))
    def check(published: list[tuple[str, bool]], bound: int) -> None:
        session = Session("dev", 60, bound)
        for n, (topic, retained) in enumerate(published):
            session.deliver(topic, str(n).encode(), 1, False, False, retained=retained)
        kept = [(m[0], int(m[1])) for m in (session.queued or {}).values()]
        assert len(kept) <= bound
        assert [n for _, n in kept] == sorted(n for _, n in kept)  # in the order they came
        if published:
            assert kept[-1][1] == len(published) - 1  # the newest is never the one dropped
        retained_topics = [t for t, n in kept if published[n][1]]
        assert len(retained_topics) == len(set(retained_topics))
        for topic, n in kept:  # a kept retained message is the latest retained one of its topic
            if published[n][1]:
                assert all(not r or t != topic for t, r in published[n + 1:])
        assert session.dropped + len(kept) <= len(published)

    check()


async def test_MQTT_4_6_0_every_message_of_a_full_session_arrives_in_order_after_a_reconnect(
        running: Running) -> None:
    """50 messages sent and not acknowledged when the link died, then 50 more while away (the bounds):
    the next connection gets all 100, the first 50 with DUP, in the order they were published, and
    is not cut off as a slow consumer for it."""
    secret = await running.add("f1")
    client, _ = await connect311(running, "f1", secret, clean=False)
    await client.send(raw.subscribe(1, CONFIG.format("f1")))
    assert (await client.read_packet())[0] == 9
    async with running.admin_client() as admin:
        for n in range(50):
            await admin.publish(CONFIG.format("f1"), json.dumps({"config": {"n": n}}), qos=1)
        sent = await publishes(client, 50)
        client.writer.transport.abort()
        await wait_status(running, "f1", lambda r: not r["online"])
        for n in range(50, 100):
            await admin.publish(CONFIG.format("f1"), json.dumps({"config": {"n": n}}), qos=1)
    again, connack = await connect311(running, "f1", secret, clean=False)
    assert connack == b"\x01\x00"
    got = await publishes(again, 100)
    assert [config_of(m)["n"] for m in got] == list(range(100))
    assert [m.dup for m in got] == [True] * 50 + [False] * 50
    assert [m.packet_id for m in got[:50]] == [m.packet_id for m in sent]
    for message in got:
        await again.send(puback(message.packet_id or 0))
    await running.service.push("f1", {"after": True})
    assert config_of((await publishes(again, 1))[0]) == {"after": True}  # still connected, still served


async def test_an_admin_client_keeps_its_session_in_memory(running: Running) -> None:
    """[MQTT-3.1.2-4] for any client: an admin script with CleanSession 0 resumes its subscription."""
    await running.add("s1", {"v": 1})
    admin = running.service.settings.admin_name
    ops = aiomqtt.Client("127.0.0.1", running.port, identifier="ops-1", username=admin,
                         password=running.service.admin_secret, clean_session=False, timeout=5)
    async with ops:
        await ops.subscribe("henge/devices/+/config", qos=1)
        await asyncio.wait_for(ops.messages.__anext__(), 5)  # the retained snapshot
    await running.service.push("s1", {"v": 2})
    async with aiomqtt.Client("127.0.0.1", running.port, identifier="ops-1", username=admin,
                              password=running.service.admin_secret, clean_session=False, timeout=5) as again:
        message = await asyncio.wait_for(again.messages.__anext__(), 5)  # without subscribing again
        assert json.loads(message.payload)["config"] == {"v": 2}  # type: ignore[arg-type]


async def test_MQTT_3_1_2_8_an_admin_clients_will_is_published_when_its_connection_is_lost(
        running: Running) -> None:
    admin, password = running.service.settings.admin_name, running.service.admin_secret
    async with running.admin_client() as watcher:
        await watcher.subscribe("ops/last-words", qos=1)
        client = await raw.RawClient.open(running.port)
        await client.send(raw.connect("ops-2", admin, password, will=("ops/last-words", b"gone")))
        assert await client.connack() == 0
        client.writer.transport.abort()
        message = await asyncio.wait_for(watcher.messages.__anext__(), 5)
        assert (str(message.topic), message.payload) == ("ops/last-words", b"gone")


async def test_MQTT_3_1_3_9_an_admin_clients_will_waits_for_its_delay_too(running: Running) -> None:
    """Will Delay 1 s with Session Expiry 5 s, for any client (the admin identity here): the will comes
    after about a second, not at once."""
    admin, password = running.service.settings.admin_name, running.service.admin_secret
    async with running.admin_client() as watcher:
        await watcher.subscribe("ops/delayed", qos=1)
        client = await raw.RawClient.open(running.port)
        will = codec.Will("ops/delayed", b"late", 1, False, {codec.WILL_DELAY_INTERVAL: 1})
        await client.send(codec.encode(codec.Connect("ops-3", 60, True, admin, password.encode(), will, "MQTT", 5,
                                                     {codec.SESSION_EXPIRY_INTERVAL: 5})))
        await client.read_frame()
        lost = time.monotonic()
        client.writer.transport.abort()
        message = await asyncio.wait_for(watcher.messages.__anext__(), 5)
        assert message.payload == b"late" and time.monotonic() - lost >= 0.7


async def test_MQTT_3_3_4_9_receive_maximum_holds_for_admin_clients_too(running: Running) -> None:
    """Receive Maximum is announced to every 5.0 client: the admin identity past it gets 0x93 as well."""
    admin, password = running.service.settings.admin_name, running.service.admin_secret
    raw_client = await raw.RawClient.open(running.port)
    await raw_client.send(codec.encode(codec.Connect("ops-4", 60, True, admin, password.encode(), None, "MQTT", 5)))
    first, body = await raw_client.read_frame()
    granted = codec.decode(first, body, version=5)
    assert isinstance(granted, codec.Connack)
    maximum = (granted.props or {})[codec.RECEIVE_MAXIMUM]
    for packet_id in range(1, maximum + 2):
        await raw_client.send(codec.encode(codec.Publish("ops/q2", b"x", 2, packet_id=packet_id), version=5))
    while True:
        first, body = await raw_client.read_frame()
        packet = codec.decode(first, body, version=5)
        if isinstance(packet, codec.Disconnect):
            assert packet.reason == codec.RECEIVE_MAXIMUM_EXCEEDED
            return
