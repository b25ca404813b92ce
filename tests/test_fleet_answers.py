"""`henge push --all/--label [--wait]` answers in devices (docs/rollouts.md#fleet-answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from henge_mqtt.device import Agent, ApplyFailed

from .conftest import Running, henge_cli, wait_status

pytestmark = pytest.mark.both_stores  # each service test runs on SQLite and on PostgreSQL


@pytest.fixture
async def agents(running: Running, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """ok-1 and ok-2 apply anything; picky rejects {"mode": "fast"}; away is never connected."""

    async def accept(config: dict[str, Any]) -> None:
        return None

    async def picky(config: dict[str, Any]) -> None:
        if config.get("mode") == "fast":
            raise ApplyFailed("mode fast needs firmware 2")

    secrets = {}
    for device, site in (("ok-1", "a"), ("ok-2", "a"), ("picky", "b"), ("away", "b")):
        secrets[device] = await running.service.add_device(device, {"site": site})
    stop = asyncio.Event()
    tasks = [asyncio.create_task(Agent("127.0.0.1", running.port, d, secrets[d], apply, tmp_path / f"{d}.json")
                                 .run(stop)) for d, apply in (("ok-1", accept), ("ok-2", accept), ("picky", picky))]
    for device in ("ok-1", "ok-2", "picky"):
        await wait_status(running, device, lambda r: r["online"])
    try:
        yield secrets
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def push(running: Running, tmp_path: Path, config: dict[str, Any], *args: str) -> tuple[int, str, str]:
    cfg = tmp_path / "fleet.json"
    cfg.write_text(json.dumps(config))
    result = await asyncio.to_thread(henge_cli, "push", *args, str(cfg), "--data", str(running.data_dir))
    return result.returncode, result.stdout, result.stderr


async def test_wait_exits_0_when_every_device_applied(running: Running, agents: dict[str, str],
                                                      tmp_path: Path) -> None:
    code, out, err = await push(running, tmp_path, {"mode": "slow"}, "--label", "site=a", "--wait", "--timeout", "10")
    assert code == 0, err
    assert "stored a new version for 2 of 2 devices" in out
    assert "2 online, 0 offline, 2 delivered; 2 applied, 0 rejected, 0 not reported yet" in out


async def test_wait_exits_3_on_a_rejection_and_names_it(running: Running, agents: dict[str, str],
                                                         tmp_path: Path) -> None:
    code, out, _ = await push(running, tmp_path, {"mode": "fast"}, "--all", "--wait", "--timeout", "3", "--json")
    assert code == 3
    result = json.loads(out)
    assert {k: result[k] for k in ("online", "offline", "delivered", "applied", "rejected", "pending")} == {
        "online": 3, "offline": 1, "delivered": 3, "applied": 2, "rejected": 1, "pending": 1}
    assert result["per_device"]["picky"]["error"] == "mode fast needs firmware 2"
    assert result["listed"]["offline"] == ["away"]
    code, out, err = await push(running, tmp_path, {"mode": "fast", "n": 2}, "--all", "--wait", "--timeout", "3")
    assert code == 3
    assert "rejected by 1: mode fast needs firmware 2" in out and "rejected: picky" in out
    # Said once on stderr, as a single-device push says it (issue 19): counts and the common messages.
    assert err == "error: 1 of 4 devices rejected the new version: mode fast needs firmware 2 (1); 1 not reported\n"
    assert "offline (they get it when they connect): away" in out


async def test_wait_exits_4_when_a_device_does_not_report(running: Running, agents: dict[str, str],
                                                          tmp_path: Path) -> None:
    code, out, err = await push(running, tmp_path, {"mode": "slow"}, "--all", "--wait", "--timeout", "2")
    assert code == 4
    assert err == "error: 1 of 4 devices did not report the new version within 2 s (1 offline)\n"
    assert "3 applied, 0 rejected, 1 not reported yet" in out
    assert "timed out after 2 s with 1 devices not reported" in out


async def test_without_wait_the_answer_counts_devices_not_subscribers(running: Running, tmp_path: Path) -> None:
    """A client that only listens (mosquitto_sub with the device's identity) has the version
    delivered; it is not counted as applied."""
    secret = await running.service.add_device("listener")
    await running.service.add_device("gone")
    async with running.device_client("listener", secret) as listener:
        await listener.subscribe("henge/devices/listener/config", qos=1)
        code, out, err = await push(running, tmp_path, {"x": 1}, "--all", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {k: result[k] for k in ("targeted", "online", "offline", "delivered", "applied", "pending")} == {
        "targeted": 2, "online": 1, "offline": 1, "delivered": 1, "applied": 0, "pending": 2}


async def test_a_fleet_push_is_previewed_before_anything_is_stored(running: Running, tmp_path: Path) -> None:
    """`henge push --label ... --dry-run` (op push_preview, POST /push/preview): which devices would
    get a new version (with their layers merged, as the push would), which are already there, the
    first one's diff; nothing stored, nothing published."""
    from henge_mqtt.http import HttpServer

    svc = running.service
    await svc.set_layer("base", {"ntp": "a"}, labels={"site": "b"})
    for device in ("p1", "p2", "p3"):
        await svc.add_device(device, {"site": "b"})
    await svc.push("p1", {"port": 80})
    await svc.push("p2", {"port": 81})  # p3: its layer only
    before = {d: [r.version for r in svc.store.history(d)] for d in ("p1", "p2", "p3")}
    code, out, err = await push(running, tmp_path, {"port": 81}, "--label", "site=b", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "would change 2 of 3 devices (1 unchanged); nothing was stored"
    assert lines[1] == "  p1, p3"
    assert '-  "port": 80' in out and '+  "port": 81' in out and "--- p1 v2" in out and "+++ p1 v3" in out
    code, out, _ = await push(running, tmp_path, {"port": 81}, "--label", "site=b", "--dry-run", "--json")
    answer = json.loads(out)
    assert (answer["targeted"], answer["change"], answer["unchanged"], answer["devices"], answer["more"]) == (
        3, 2, 1, ["p1", "p3"], 0)
    assert answer["example"]["device"] == "p1" and answer["example"]["to_version"] == 3
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        viewer = (await svc.create_token("look", "viewer"))["token"]
        import httpx

        async with httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=10,
                                     headers={"Authorization": f"Bearer {viewer}"}) as http:
            reply = await http.post("/api/v1/push/preview", json={"where": 'labels.site == "b"',
                                                                  "config": {"port": 81}})
            assert reply.status_code == 200 and reply.json()["devices"] == ["p1", "p3"]
            refused = await http.post("/api/v1/push", json={"all": True, "config": {"port": 81}})
            assert refused.status_code == 403  # a viewer previews; it cannot push
    assert {d: [r.version for r in svc.store.history(d)] for d in ("p1", "p2", "p3")} == before
    code, _, err = await push(running, tmp_path, {"port": 81}, "p1", "--dry-run")
    assert code == 2
    assert err.strip() == "error: --dry-run previews a fleet push: give --all, --label k=v or --where EXPR"


async def test_progress_counts_agree_with_the_answer(running: Running, agents: dict[str, str]) -> None:
    """The progress ticks count without an entry per device (a 10,000-device push ticks every
    0.25 s): the last one says what the answer says."""
    ticks: list[dict[str, Any]] = []
    result = await running.service.fleet_push({"mode": "fast", "tick": 1}, all_devices=True, wait=1.5,
                                              progress=ticks.append)
    counted = [t for t in ticks if "pending" in t]
    assert counted, ticks  # "away" never reports: the wait ticks until its end
    keys = ("targeted", "devices", "online", "delivered", "applied", "rejected", "pending")
    assert {k: counted[-1][k] for k in keys} == {k: result[k] for k in keys} == {
        "targeted": 4, "devices": 4, "online": 3, "delivered": 3, "applied": 2, "rejected": 1, "pending": 1}
