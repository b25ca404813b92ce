"""Pictures over time, from the store: the fleet (store/series.py, GET /series: a point a minute,
kept a week, averaged for the week's view) and each device's presence (GET
/devices/{id}/timeline: every change kept a week), surviving a restart, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import aiomqtt
import httpx
import pytest

from henge_mqtt.http import HttpServer
from henge_mqtt.service import HengeService
from henge_mqtt.service.presence import iso
from henge_mqtt.store.series import SERIES_KEEP

from .conftest import Running, make_settings, wait_status, wait_until

pytestmark = pytest.mark.both_stores


def counts(online: int, devices: int = 10) -> dict[str, int]:
    return {"devices": devices, "online": online, "in_sync": online, "pending": 0, "rejected": devices - online,
            "drift": 0, "conflicts": 0}


async def test_a_point_a_minute_kept_a_week_and_averaged_for_the_week(running: Running) -> None:
    svc = running.service

    async def sampled() -> bool:
        return bool((await svc.fleet_series())["points"])

    await wait_until(sampled, what="the point the service keeps as it starts")
    await svc.add_device("a")
    await svc.record_fleet_point()  # (what the sampler does once a minute)
    latest = (await svc.fleet_series())["points"][-1]
    assert (latest["devices"], latest["online"], latest["pending"]) == (1, 0, 0)
    now = int(time.time() // 60)
    base = (now - 600) // 10 * 10  # ten minutes, aligned to a 7-day point
    for i in range(10):
        await svc.worker.run(svc.store.record_point, base + i, counts(i))
    await svc.worker.run(svc.store.record_point, now - 2, counts(7))
    await svc.worker.run(svc.store.record_point, now - 2, counts(8))  # the same minute again: replaced
    day = await svc.fleet_series("24h")
    by_at = {p["at"]: p for p in day["points"]}
    assert day["step_s"] == 60 and len(by_at) == len(day["points"])
    assert [p["online"] for p in day["points"][:10]] == list(range(10))
    assert by_at[iso((now - 2) * 60)]["online"] == 8
    week = await svc.fleet_series("7d")
    assert week["step_s"] == 600
    assert week["points"][0]["online"] == 5 and week["points"][0]["rejected"] == 6  # averages (4.5, 5.5), rounded
    # Nothing older than a week: the next point drops it.
    old = now - SERIES_KEEP - 1
    await svc.worker.run(svc.store.record_point, old, counts(1))
    assert len((await svc.fleet_series("7d"))["points"]) == len(week["points"])  # outside the window already
    assert any(row[0] == old for row in await svc.worker.run(svc.store.series, 0, 1))
    await svc.record_fleet_point()
    assert all(row[0] != old for row in await svc.worker.run(svc.store.series, 0, 1))
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        viewer = (await svc.create_token("look", "viewer"))["token"]
        async with httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=10,
                                     headers={"Authorization": f"Bearer {viewer}"}) as http:
            assert (await http.get("/api/v1/series?window=7d")).json() == await svc.fleet_series("7d")
            bad = await http.get("/api/v1/series?window=1y")
            assert bad.status_code == 422


async def test_the_series_and_the_timeline_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    now = int(time.time() // 60)
    async with HengeService(settings) as svc:
        for i in range(5):
            await svc.worker.run(svc.store.record_point, now - 60 + i, counts(i))
        before = (await svc.fleet_series())["points"]
        secret = await svc.add_device("d1")
        client = await connect(svc.address[1], "d1", secret)
        await wait_until(lambda: svc.broker.session("d1", time.time()).online, what="d1 online")
        await client.__aexit__(None, None, None)
        await wait_until(lambda: not svc.broker.session("d1", time.time()).online, what="d1 offline")
    async with HengeService(settings) as again:
        after = (await again.fleet_series())["points"]
        timeline = await again.presence_timeline("d1")
    assert after[:5] == before[:5] and [p["online"] for p in after[:5]] == [0, 1, 2, 3, 4]
    assert [s["state"] for s in timeline["segments"]] == ["unknown", "online", "offline"]


async def connect(port: int, device: str, secret: str) -> aiomqtt.Client:
    client = aiomqtt.Client("127.0.0.1", port, identifier=device, username=device, password=secret, timeout=5)
    await client.__aenter__()
    return client


async def test_a_devices_presence_over_time_is_kept_with_its_takeovers(running: Running) -> None:
    """Online, offline, online again, then a second connection taking over: segments for the
    states, a mark for the takeover; a removed device's history goes with it."""
    svc = running.service
    secret = await svc.add_device("t1")
    first = await connect(running.port, "t1", secret)
    await wait_status(running, "t1", lambda r: r["online"])
    await first.__aexit__(None, None, None)
    await wait_status(running, "t1", lambda r: not r["online"])
    second = await connect(running.port, "t1", secret)
    await wait_status(running, "t1", lambda r: r["online"] and r["epoch"] == 2)
    third = await connect(running.port, "t1", secret)  # the same identity again: it takes over
    await wait_status(running, "t1", lambda r: r["epoch"] == 3)

    async def kept() -> bool:
        return bool((await svc.presence_timeline("t1"))["marks"])

    await wait_until(kept, what="the takeover in the stored history")
    timeline = await svc.presence_timeline("t1")
    assert [s["state"] for s in timeline["segments"]] == ["unknown", "online", "offline", "online"]
    assert [(m["state"], m["epoch"]) for m in timeline["marks"]] == [("takeover", 3)]
    assert timeline["segments"][-1]["to"] == timeline["to"]
    assert timeline["segments"][0]["from"] == timeline["from"]
    week = await svc.presence_timeline("t1", "7d")
    assert [s["state"] for s in week["segments"]] == ["unknown", "online", "offline", "online"]
    for client in (second, third):
        with contextlib.suppress(aiomqtt.MqttError):  # (the one taken over is closed already)
            await client.__aexit__(None, None, None)
    await svc.remove_device("t1")
    await svc.add_device("t1")
    fresh = await svc.presence_timeline("t1")
    assert [s["state"] for s in fresh["segments"]] == ["unknown"] and fresh["marks"] == []
