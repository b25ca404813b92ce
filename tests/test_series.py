"""The fleet over time (store/series.py, GET /series): a point a minute, kept a week, averaged for
the week's view, surviving a restart, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from henge_mqtt.http import HttpServer
from henge_mqtt.service import HengeService
from henge_mqtt.service.presence import iso
from henge_mqtt.store.series import SERIES_KEEP

from .conftest import Running, make_settings, wait_until

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


async def test_the_series_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    now = int(time.time() // 60)
    async with HengeService(settings) as svc:
        for i in range(5):
            await svc.worker.run(svc.store.record_point, now - 60 + i, counts(i))
        before = (await svc.fleet_series())["points"]
    async with HengeService(settings) as again:
        after = (await again.fleet_series())["points"]
    assert after[:5] == before[:5] and [p["online"] for p in after[:5]] == [0, 1, 2, 3, 4]
