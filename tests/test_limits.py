"""Every limit on every path (docs/configuration.md): each test exceeds one and shows the offender
cut off (or its filter refused) while another device keeps being served promptly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from henge_mqtt.certs import make_dev_certs
from henge_mqtt.settings import ListenerConfig

from . import mqtt_raw as raw
from .conftest import Running, wait_until

PROMPT = 0.5  # a well-behaved device's PINGRESP and pushes come back within this, whatever others do


class Bystander:
    """A well-behaved device connected before the attack, checked after it."""

    def __init__(self, running: Running, client: raw.RawClient) -> None:
        self.running = running
        self.client = client

    async def ping_rtt(self) -> float:
        started = time.monotonic()
        await self.client.send(raw.PINGREQ)
        kind, _ = await self.client.read_packet(PROMPT)
        assert kind == 13
        return time.monotonic() - started

    async def still_served(self) -> None:
        assert await self.ping_rtt() < PROMPT
        row = await self.running.service.push("bystander", {"n": time.time()})
        kind, body = await self.client.read_packet(PROMPT)
        assert kind == 3 and f'"version":{row.version}'.encode() in body
        packet_id = body[2 + struct.unpack("!H", body[:2])[0]:][:2]
        await self.client.send(bytes([0x40, 0x02]) + packet_id)


@contextlib.asynccontextmanager
async def bystander(running: Running) -> AsyncIterator[Bystander]:
    secret = await running.add("bystander", {"n": 0})
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect("bystander", "bystander", secret))
    assert await client.connack() == 0
    await client.send(raw.subscribe(1, "henge/devices/bystander/config"))
    assert (await client.read_packet())[0] == 9
    kind, body = await client.read_packet()  # the retained config
    assert kind == 3
    packet_id = body[2 + struct.unpack("!H", body[:2])[0]:][:2]
    await client.send(bytes([0x40, 0x02]) + packet_id)
    try:
        yield Bystander(running, client)
    finally:
        client.close()


async def device(running: Running, name: str) -> raw.RawClient:
    secret = await running.add(name, {"v": 1})
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect(name, name, secret))
    assert await client.connack() == 0
    return client


def pubrel(packet_id: int) -> bytes:
    return raw.packet(6, struct.pack("!H", packet_id), flags=2)


def subscribe_many(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(raw._str(f) + b"\x01" for f in filters)
    return raw.packet(8, body, flags=2)


async def test_qos2_without_pubrel_is_bounded_by_the_receive_maximum(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(receive_maximum=4, device_publish_burst=1000, device_publish_rate=1000) as running, \
            bystander(running) as good:
        bad = await device(running, "hoarder")
        blob = b"x" * 60_000
        recs = 0
        with contextlib.suppress(EOFError, ConnectionError):
            for i in range(1, 301):  # never a PUBREL
                await bad.send(raw.publish("henge/devices/hoarder/report", blob, qos=2, packet_id=i))
                kind, _ = await bad.read_packet(3)
                recs += kind == 5
        assert recs == 4  # PUBREC for the first receive_maximum only, then the connection is gone
        assert running.broker.conns.get("hoarder") is None
        await good.still_served()
        row = (await running.service.status("hoarder"))[0]
        assert not row["online"] and row["reason"] == "quota_exceeded"


async def test_qos2_flow_completes_and_a_missing_pubrel_times_out(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(pubrel_timeout=0.5) as running, bystander(running) as good:
        client = await device(running, "q2")
        await client.send(raw.publish("henge/devices/q2/report", b'{"version":1,"status":"applied"}', qos=2,
                                      packet_id=9))
        assert await client.read_packet() == (5, b"\x00\x09")  # PUBREC
        await client.send(pubrel(9))
        assert await client.read_packet() == (7, b"\x00\x09")  # PUBCOMP
        row = await wait_for_row(running, "q2", lambda r: r["applied_version"] == 1)
        assert row["sync"] == "in_sync"  # delivered exactly once, at the PUBLISH
        await client.send(raw.publish("henge/devices/q2/report", b"{}", qos=2, packet_id=10))
        assert await client.read_packet() == (5, b"\x00\x0a")
        started = time.monotonic()
        assert await client.closed_within(3)  # never released: closed at the PUBREL deadline
        assert time.monotonic() - started >= 0.3
        await good.still_served()


async def wait_for_row(running: Running, device_id: str, check):  # type: ignore[no-untyped-def]
    from .conftest import wait_status

    return await wait_status(running, device_id, check)


async def test_subscribe_with_too_many_filters_closes_at_once_and_logs_little(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="henge_mqtt")
    async with bystander(running) as good:
        clients = []
        for n in range(3):
            bad = await device(running, f"filters{n}")
            await bad.send(subscribe_many(1, [f"henge/devices/other/x{i}" for i in range(30_000)]))
            clients.append(bad)
        for bad in clients:
            assert await bad.closed_within(2)
        await good.still_served()
    assert len(caplog.text) < 20_000
    assert "broker.too_many_filters" in caplog.text


async def test_subscriptions_per_connection_and_wildcards_per_device_are_capped(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_subscriptions=5, max_wildcard_subscriptions=2) as running, \
            bystander(running) as good:
        client = await device(running, "greedy")
        root = "henge/devices/greedy"
        await client.send(subscribe_many(1, [f"{root}/+", f"{root}/#", f"{root}/a/+", f"{root}/a", f"{root}/b",
                                             f"{root}/c", f"{root}/d"]))
        kind, body = await client.read_packet()
        assert kind == 9
        # two wildcards granted, the third refused; then exact filters up to five in all
        assert list(body[2:]) == [1, 1, 0x80, 1, 1, 1, 0x80]
        await client.send(raw.PINGREQ)
        while (kind := (await client.read_packet())[0]) == 3:  # the retained config, through the wildcards
            pass
        assert kind == 13  # refused filters do not cost the connection
        await good.still_served()


async def test_denied_publishes_are_charged_to_the_rate_and_their_logs_bounded(
    start_service, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level(logging.INFO, logger="henge_mqtt")
    async with start_service(device_publish_rate=5, device_publish_burst=20) as running, \
            bystander(running) as good:
        bad = await device(running, "forger")
        flood = raw.publish("henge/devices/bystander/config", b'{"evil":1}', qos=1)
        with contextlib.suppress(ConnectionError):
            for _ in range(5000):
                bad.writer.write(flood)
            await bad.writer.drain()
        assert await bad.closed_within(3)
        assert (await running.service.status("forger"))[0]["reason"] == "publish_rate_exceeded"
        await good.still_served()
        assert running.retained("henge/devices/bystander/config") is not None
        assert b"evil" not in (running.retained("henge/devices/bystander/config") or b"")
    assert caplog.text.count("broker.publish_denied") < 30


async def test_oversize_publishes_are_charged_too(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_publish_bytes=1024, device_publish_rate=2, device_publish_burst=5) as running, \
            bystander(running) as good:
        bad = await device(running, "big")
        with contextlib.suppress(ConnectionError):
            for i in range(50):
                await bad.send(raw.publish("henge/devices/big/report", b"x" * 2000, qos=1, packet_id=i + 1))
        assert await bad.closed_within(3)
        assert (await running.service.status("big"))[0]["reason"] == "publish_rate_exceeded"
        await good.still_served()


async def test_packet_over_max_packet_bytes_is_closed_unread(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_packet_bytes=4096) as running, bystander(running) as good:
        bad = await device(running, "huge")
        await bad.send(b"\x32" + bytes([0x80, 0x80, 0x01]))  # announces 16 KiB, sends none of it
        assert await bad.closed_within(2)
        assert (await running.service.status("huge"))[0]["reason"] == "packet_too_large"
        await good.still_served()


async def test_invalid_topic_closes_the_connection(running: Running) -> None:
    async with bystander(running) as good:
        bad = await device(running, "wild")
        await bad.send(raw.publish("henge/devices/wild/#", b"{}"))
        assert await bad.closed_within(2)
        await good.still_served()


async def test_idle_tls_socket_is_closed_at_the_connect_deadline(tmp_path: Path, start_service) -> None:  # type: ignore[no-untyped-def]
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["dev1"])
    tls = ListenerConfig(bind="127.0.0.1:0", ssl=True, certfile=certs / "server.pem", keyfile=certs / "server.key")
    settings_listeners = {"default": ListenerConfig(bind="127.0.0.1:0"), "tls": tls}
    async with start_service(connect_timeout=0.5, listeners=settings_listeners) as running:
        tls_port = running.service.broker.addresses()[1][1]
        idle = socket.create_connection(("127.0.0.1", tls_port))  # never starts the handshake
        idle.settimeout(5)
        started = time.monotonic()
        assert await asyncio.to_thread(idle.recv, 1) == b""
        assert time.monotonic() - started < 3
        idle.close()
        # A real TLS client still gets through.
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        _reader, writer = await asyncio.open_connection("127.0.0.1", tls_port, ssl=context, server_hostname="localhost")
        writer.close()


async def test_slow_reader_is_cut_off_at_max_inflight(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_inflight=3) as running, bystander(running) as good:
        client = await device(running, "sloth")
        await client.send(raw.subscribe(1, "henge/devices/sloth/config"))
        for n in range(6):  # never acknowledged
            await running.service.push("sloth", {"n": n})
        assert await client.closed_within(3)
        await wait_until(lambda: running.broker.conns.get("sloth") is None)
        assert (await running.service.status("sloth"))[0]["reason"] == "slow_consumer"
        await good.still_served()


async def test_a_reader_that_stops_reading_is_cut_off_at_the_write_buffer_bound(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_config_bytes=900_000) as running, bystander(running) as good:
        running.broker.limits = dataclasses.replace(running.broker.limits, max_write_buffer=256 * 1024)
        client = await device(running, "deaf")
        await client.send(raw.subscribe(1, "henge/devices/deaf/#", qos=0))  # QoS 0: no inflight bound applies
        client.writer.transport.pause_reading()  # and never reads again
        for n in range(40):  # 40 x 120 KB retained config snapshots, none of them read
            if running.broker.conns.get("deaf") is None:
                break
            await running.service.push("deaf", {"n": n, "pad": "x" * 120_000})
        await wait_until(lambda: running.broker.conns.get("deaf") is None, 5, "the deaf client cut off")
        assert (await running.service.status("deaf"))[0]["reason"] == "slow_consumer"
        await good.still_served()


async def test_ping_and_empty_ack_floods_are_charged_too(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(device_publish_rate=5, device_publish_burst=20) as running, \
            bystander(running) as good:
        pinger = await device(running, "pinger")
        with contextlib.suppress(ConnectionError):
            await pinger.send(raw.PINGREQ * 500)
        assert await pinger.closed_within(3)
        acker = await device(running, "acker")
        with contextlib.suppress(ConnectionError):
            await acker.send(b"\x40\x02\x00\x07" * 500)  # PUBACKs for deliveries that never were
        assert await acker.closed_within(3)
        for name in ("pinger", "acker"):
            assert (await running.service.status(name))[0]["reason"] == "publish_rate_exceeded"
        await good.still_served()


async def test_a_connect_over_the_pre_authentication_bound_is_closed_unread(running: Running) -> None:
    async with bystander(running) as good:
        client = await raw.RawClient.open(running.port)
        await client.send(b"\x10" + bytes([0x80, 0x80, 0x10]))  # announces 256 KiB, sends none of it
        assert await client.closed_within(2)
        await good.still_served()
