"""Takeovers, zombies, stale events and identity conflicts against the real embedded broker."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from . import mqtt_raw as raw
from .conftest import Running, next_message, payload_json, wait_status, wait_until

REPORT = "henge/devices/{}/report"


async def presence_of(running: Running, device: str) -> dict:  # type: ignore[type-arg]
    data = running.retained(f"henge/devices/{device}/presence")
    assert data is not None
    import json

    return json.loads(data)


async def raw_device(running: Running, device: str, secret: str, **kwargs: object) -> raw.RawClient:
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect(device, device, secret, **kwargs))  # type: ignore[arg-type]
    assert await client.connack() == 0
    return client



@pytest.mark.parametrize(("old_clean", "new_clean"), [(True, True), (False, False), (True, False), (False, True)])
async def test_takeover_every_clean_session_combination(running: Running, old_clean: bool, new_clean: bool) -> None:
    secret = await running.add("dev1", {"v": 1})
    async with running.admin_client() as watcher:
        await watcher.subscribe("henge/devices/dev1/report", qos=1)
        old = await raw_device(running, "dev1", secret, clean=old_clean, will=(REPORT.format("dev1"), b"WILL"))
        await old.send(raw.subscribe(1, "henge/devices/dev1/config"))
        assert (await old.read_packet())[0] == 9  # SUBACK
        assert (await old.read_packet())[0] == 3  # the retained snapshot
        first_epoch = (await presence_of(running, "dev1"))["epoch"]

        started = time.monotonic()
        async with running.device_client("dev1", secret, clean_session=new_clean) as new:
            closed = await old.closed_within(2.0)
            elapsed = time.monotonic() - started
            assert closed, "the old connection must be closed"
            assert elapsed < 1.0, f"old connection closed after {elapsed:.3f}s"
            await new.subscribe("henge/devices/dev1/config", qos=1)
            assert payload_json(await next_message(new))["config"] == {"v": 1}
            await running.service.push("dev1", {"v": 2})
            latest = payload_json(await next_message(new))["config"]
            if not new_clean and not old_clean:  # the session resumed: the snapshot the old connection never
                assert latest == {"v": 1}        # acknowledged is re-sent first [MQTT-4.4.0-1]
                latest = payload_json(await next_message(new))["config"]
            assert latest == {"v": 2}
            presence = await presence_of(running, "dev1")
            assert presence["state"] == "online" and presence["epoch"] == first_epoch + 1
            assert presence["reason"] == "takeover"
            # the displaced connection's will is suppressed
            with pytest.raises(TimeoutError):
                await next_message(watcher, 0.5)
        status = (await running.service.status("dev1"))[0]
        assert status["takeovers"] == 1 and status["epoch"] == first_epoch + 1


async def test_takeover_will_publish_setting_sends_old_will(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(sessions={"takeover_will": "publish"}) as running:
        secret = await running.add("dev1", {"v": 1})
        async with running.admin_client() as watcher:
            await watcher.subscribe("henge/devices/dev1/report", qos=1)
            old = await raw_device(running, "dev1", secret, will=(REPORT.format("dev1"), b"WILL"))
            async with running.device_client("dev1", secret):
                assert (await next_message(watcher)).payload == b"WILL"
            old.close()


async def test_zombie_is_timed_out_after_one_and_a_half_keepalives(running: Running) -> None:
    secret = await running.add("dev1", {"v": 1})
    async with running.admin_client() as watcher:
        await watcher.subscribe("henge/devices/dev1/report", qos=1)
        zombie = await raw_device(running, "dev1", secret, keepalive=1, will=(REPORT.format("dev1"), b"LOST"))
        started = time.monotonic()
        assert not await zombie.closed_within(1.2), "closed before 1.5 x keep-alive"
        assert await zombie.closed_within(1.5), "not closed after 1.5 x keep-alive"
        elapsed = time.monotonic() - started
        assert 1.4 <= elapsed <= 2.9
        assert (await next_message(watcher)).payload == b"LOST"
    presence = await presence_of(running, "dev1")
    assert (presence["state"], presence["reason"]) == ("offline", "keepalive_timeout")


async def test_keepalive_zero_gets_the_maximum(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(max_keepalive=1) as running:
        secret = await running.add("dev1")
        silent = await raw_device(running, "dev1", secret, keepalive=0)
        assert await silent.closed_within(3.0)
        await wait_status(running, "dev1", lambda r: not r["online"])


async def test_pings_keep_a_connection_alive(running: Running) -> None:
    secret = await running.add("dev1")
    client = await raw_device(running, "dev1", secret, keepalive=1)
    for _ in range(4):
        await asyncio.sleep(0.5)
        await client.send(raw.PINGREQ)
        assert (await client.read_packet())[0] == 13
    assert (await running.service.status("dev1"))[0]["online"]
    client.close()


@pytest.mark.parametrize("victim_clean", [True, False])
async def test_wrong_password_with_victim_id_leaves_victim_untouched(running: Running, victim_clean: bool) -> None:
    secret = await running.add("victim", {"v": 1})
    async with running.device_client("victim", secret, clean_session=victim_clean) as victim:
        await victim.subscribe("henge/devices/victim/config", qos=1)
        await next_message(victim)
        epoch = (await presence_of(running, "victim"))["epoch"]
        for clean in (True, False):
            attacker = await raw.RawClient.open(running.port)
            await attacker.send(raw.connect("victim", "victim", "wrong", clean=clean))
            assert await attacker.connack() == 4
            assert await attacker.closed_within(2.0)
        await running.service.push("victim", {"v": 2})
        assert payload_json(await next_message(victim))["version"] == 2
        presence = await presence_of(running, "victim")
        assert (presence["state"], presence["epoch"]) == ("online", epoch)


async def test_fifty_rapid_reconnects_end_with_one_live_connection(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(sessions={"connect_burst": 100}) as running:
        secret = await running.add("dev1", {"v": 1})
        clients = []
        for i in range(50):
            client = await raw_device(running, "dev1", secret)
            await client.send(raw.subscribe(1, "henge/devices/dev1/config"))
            clients.append(client)
            if i == 25:
                await running.service.push("dev1", {"v": 2})
        last = clients[-1]
        for client in clients[:-1]:
            assert await client.closed_within(2.0)
        assert not await last.closed_within(0.3)
        await running.service.push("dev1", {"v": 3})
        versions = []
        while True:
            kind, body = await last.read_packet()
            if kind == 3:
                versions.append(body)
                if b'"version":3' in body:
                    break
        assert len(running.broker.conns) == 1
        presence = await presence_of(running, "dev1")
        assert presence["state"] == "online"
        assert (await running.service.status("dev1"))[0]["epoch"] == 50
        last.close()


async def test_flapping_device_is_rate_limited_without_losing_its_connection(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(sessions={"connect_burst": 3, "connect_rate": 0.5, "conflict_takeovers": 100}) as running:
        secret = await running.add("dev1")
        codes = []
        clients = []
        for _ in range(6):
            client = await raw.RawClient.open(running.port)
            await client.send(raw.connect("dev1", "dev1", secret))
            codes.append(await client.connack())
            clients.append(client)
        assert codes == [0, 0, 0, 3, 3, 3]  # a throttle is transient: 3, server unavailable
        assert not await clients[2].closed_within(0.3), "a refused CONNECT must not kick the current one"
        for c in clients:
            c.close()


async def _ping_pong(running: Running, secret: str, rounds: int) -> list[int]:
    codes = []
    for _i in range(rounds):
        client = await raw.RawClient.open(running.port)
        await client.send(raw.connect("twin", "twin", secret))
        codes.append(await client.connack())
        await client.send(raw.PINGREQ)  # alive: it answers
        await asyncio.sleep(0.05)
    return codes


async def test_identity_conflict_is_flagged(running: Running) -> None:
    secret = await running.add("twin", {"v": 1})
    events = []
    running.service.add_event_listener(lambda e: events.append(e))
    codes = await _ping_pong(running, secret, 6)
    assert codes == [0] * 6  # policy flag: keep serving the newest
    status = (await running.service.status("twin"))[0]
    assert status["conflict"] is True and status["conflict_remotes"]
    assert [e.type for e in events].count("conflict") == 1
    assert await running.service.clear_conflict("twin")
    assert (await running.service.status("twin"))[0]["conflict"] is False


async def test_identity_conflict_quarantine_refuses(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service(sessions={"conflict_policy": "quarantine", "quarantine_initial": 30}) as running:
        secret = await running.add("twin", {"v": 1})
        codes = await _ping_pong(running, secret, 6)
        assert codes[:4] == [0, 0, 0, 0]
        assert codes[4:] == [5, 5]
        presence = await presence_of(running, "twin")
        assert (presence["state"], presence["reason"]) == ("offline", "quarantined")
        assert (await running.service.status("twin"))[0]["quarantined_until"] is not None


async def test_hundred_concurrent_connects_with_retained_messages(running: Running) -> None:
    secrets = {f"d{i:03}": await running.add(f"d{i:03}", {"n": i}) for i in range(100)}

    async def one(device: str) -> int:
        async with running.device_client(device, secrets[device], timeout=15) as client:
            await client.subscribe(f"henge/devices/{device}/config", qos=1)
            snap = payload_json(await next_message(client, 15))
            assert snap["device"] == device
            return int(snap["config"]["n"])

    results = await asyncio.gather(*(one(d) for d in secrets))
    assert sorted(results) == list(range(100))
    await wait_until(lambda: not running.broker.conns)
    assert not any(row["online"] for row in await running.service.status())
    assert not running.broker.online_devices()


async def test_early_close_never_leaves_a_stale_session(running: Running) -> None:
    secret = await running.add("dev1")
    for _ in range(50):
        client = await raw.RawClient.open(running.port)
        await client.send(raw.connect("dev1", "dev1", secret, keepalive=0))
        client.writer.transport.abort()
    await wait_until(lambda: not running.broker.conns)
    assert not (await running.service.status("dev1"))[0]["online"]


async def test_kick_closes_current_connection(running: Running) -> None:
    secret = await running.add("dev1")
    client = await raw_device(running, "dev1", secret)
    assert (await running.service.kick("dev1")).kicked is True
    assert await client.closed_within(1.0)
    presence = await presence_of(running, "dev1")
    assert (presence["state"], presence["reason"]) == ("offline", "kicked")
    assert (await running.service.kick("dev1")).kicked is False


async def test_epochs_survive_restart(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service() as first:
        secret = await first.add("dev1")
        for _ in range(3):
            async with first.device_client("dev1", secret):
                pass
        assert (await first.service.status("dev1"))[0]["epoch"] == 3
    async with start_service() as second, second.device_client("dev1", secret):
        assert (await second.service.status("dev1"))[0]["epoch"] == 4


async def test_shutdown_marks_devices_offline_quickly(start_service) -> None:  # type: ignore[no-untyped-def]
    async with start_service() as running:
        secret = await running.add("dev1")
        client = await raw_device(running, "dev1", secret)
        admin = "henge-admin"
        watcher = await raw.RawClient.open(running.port)
        await watcher.send(raw.connect("watcher", admin, running.service.admin_secret))
        assert await watcher.connack() == 0
        await watcher.send(raw.subscribe(1, "henge/devices/dev1/presence"))
        assert (await watcher.read_packet())[0] == 9
        kind, body = await watcher.read_packet()
        assert kind == 3 and b'"state":"online"' in body  # retained: dev1 is online
        started = time.monotonic()
        await running.service.stop()
        assert time.monotonic() - started < 2.0
        assert await client.closed_within(1.0)
        kind, body = await watcher.read_packet()  # the watcher heard why, before its own socket closed
        assert kind == 3 and b'"state":"offline"' in body and b'"reason":"server_shutdown"' in body


async def test_second_connect_packet_closes_connection(running: Running) -> None:
    secret = await running.add("dev1")
    client = await raw_device(running, "dev1", secret)
    await client.send(raw.connect("dev1", "dev1", secret))
    assert await client.closed_within(2.0)
    presence = await presence_of(running, "dev1")
    assert presence["state"] == "offline"


async def test_admin_identity_never_touches_device_sessions(running: Running) -> None:
    secret = await running.add("dev1")
    device = await raw_device(running, "dev1", secret)
    async with aiomqtt.Client("127.0.0.1", running.port, identifier="dev1",
                              username=running.service.settings.admin_name,
                              password=running.service.admin_secret, timeout=5):
        assert not await device.closed_within(0.3)
    device.close()


async def test_last_seen_survives_a_restart(start_service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "kept"
    async with start_service(data_dir=data) as first:
        secret = await first.add("dev1", {"v": 1})
        await first.add("never")
        client = await raw_device(first, "dev1", secret)
        await client.send(raw.DISCONNECT)
        row = await wait_status(first, "dev1", lambda r: not r["online"])
        left_at, remote = row["since"], row["remote"]
    async with start_service(data_dir=data) as second:
        row = (await second.service.status("dev1"))[0]
        assert (row["online"], row["reason"], row["since"], row["remote"]) == (False, "server_start", left_at, remote)
        assert row["epoch"] == 1
        presence = await presence_of(second, "dev1")
        assert (presence["reason"], presence["since"], presence["remote"]) == ("server_start", left_at, remote)
        never = (await second.service.status("never"))[0]
        assert (never["reason"], never["since"]) == ("never_connected", None)
