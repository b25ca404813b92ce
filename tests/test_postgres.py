"""The store on PostgreSQL (`henge serve --store postgresql://...`, docs/scaling.md#postgresql): the
same service, the same contract, a real PostgreSQL cluster (tests/pg.py), and `henge migrate`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from henge_mqtt.device import Agent
from henge_mqtt.errors import StoreError
from henge_mqtt.service import HengeService
from henge_mqtt.store import Store

from .conftest import ROOT, Running, henge_cli, make_settings, wait_status, wait_until


async def accept(config: dict[str, Any]) -> None:
    return None


async def test_the_service_on_postgres_keeps_everything_across_instances(pg_url: str, tmp_path: Path) -> None:
    """Two service instances on different data dirs, one after the other, on one PostgreSQL store."""
    first = make_settings(tmp_path / "a", store=pg_url)
    async with HengeService(first) as svc:
        running = Running(svc, tmp_path / "a")
        secret = await svc.add_device("cam1", {"site": "berlin"})
        await svc.push("cam1", {"port": 80})
        stop = asyncio.Event()
        agent = asyncio.create_task(Agent("127.0.0.1", running.port, "cam1", secret, accept,
                                          tmp_path / "cam1.json").run(stop))
        try:
            await wait_status(running, "cam1", lambda r: r["online"] and r["sync"] == "in_sync")
            await svc.set_schema({}, {"properties": {"port": {"type": "integer"}}})
            await svc.set_layer("fleet", {"ntp": "a"})
            rollout = await svc.start_rollout({"port": 443}, all_devices=True, waves=[100], min_applied=100)

            async def done() -> bool:
                return (await svc.rollout_status(rollout["id"]))["state"] == "completed"

            await wait_until(done, 15)
            await wait_status(running, "cam1", lambda r: r["sync"] == "in_sync" and r["desired_version"] == 3)
        finally:
            stop.set()
            await agent
        token = (await svc.create_token("ops", "operator"))["token"]
    second = make_settings(tmp_path / "b", store=pg_url)
    async with HengeService(second) as svc:
        row = (await svc.status("cam1"))[0]
        assert (row["desired_version"], row["applied_version"], row["reason"]) == (3, 3, "server_start")
        assert (await svc.get_version("cam1")).config == {"ntp": "a", "port": 443}
        assert [v.version for v in await svc.history("cam1")] == [1, 2, 3]
        assert (await svc.list_schemas())[0]["schema"] == "fleet"
        assert (await svc.list_rollouts())[0]["state"] == "completed"
        assert svc.verify_token(token) == ("ops", "operator")
        actions = [e["action"] for e in await svc.audit()]
        assert actions[:2] == ["device.add", "push"] and "rollout.complete" in actions
        assert svc.store.verify_device("cam1", secret)


async def test_serve_with_store_and_the_cli(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0",
                             "--no-http", "--store", pg_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: (data / "service.json").exists() or proc.poll() is not None, 20)
        assert proc.poll() is None
        added = await asyncio.to_thread(henge_cli, "device", "add", "d1", "--data", str(data), "--json")
        assert added.returncode == 0, added.stderr
        pushed = await asyncio.to_thread(henge_cli, "push", "d1", "-", "--data", str(data), input='{"a": 1}')
        assert pushed.returncode == 0 and "version 1" in pushed.stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    store = Store(tmp_path / "elsewhere", url=pg_url)
    try:
        assert store.get_version("d1").config == {"a": 1}
    finally:
        store.close()
    bad = henge_cli("serve", "--data", str(tmp_path / "e"), "--port", "0", "--no-http", "--store",
                    "postgresql://henge:secret@127.0.0.1:1/nowhere", timeout=30)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot open the store at postgresql://henge:***@127.0.0.1:1/nowhere")
    assert "secret" not in bad.stderr


async def test_migrate_sqlite_to_postgres_and_back(pg_url: str, tmp_path: Path, postgres: Any) -> None:
    data = tmp_path / "sqlite"
    async with HengeService(make_settings(data)) as svc:
        for i in range(5):
            await svc.add_device(f"m{i}", {"site": "x" if i % 2 else "y"})
            await svc.push(f"m{i}", {"n": i})
            await svc.push(f"m{i}", {"n": i + 10})
        await svc.set_layer("site-x", {"tz": "UTC"}, labels={"site": "x"})
        await svc.create_token("t", "viewer")
        before = {d: [v.model_dump() for v in await svc.history(d)] for d in (f"m{i}" for i in range(5))}
        audit_before = await svc.audit(limit=1000)
    moved = await asyncio.to_thread(henge_cli, "migrate", "--from", str(data), "--to", pg_url, "--json")
    assert moved.returncode == 0, moved.stderr
    counts = json.loads(moved.stdout)
    assert (counts["devices"], counts["config_versions"], counts["layers"], counts["api_tokens"]) == (5, 12, 1, 1)
    again = await asyncio.to_thread(henge_cli, "migrate", "--from", str(data), "--to", pg_url)
    assert again.returncode == 1 and "migrate into an empty store" in again.stderr
    async with HengeService(make_settings(tmp_path / "pg-instance", store=pg_url)) as svc:
        after = {d: [v.model_dump() for v in await svc.history(d)] for d in before}
        assert after == before
        assert (await svc.audit(limit=1000)) == audit_before
        await svc.push("m0", {"n": 99})  # the audit sequence goes on after the copied ids
        assert (await svc.audit(limit=1))[0]["id"] == audit_before[-1]["id"] + 1
    back = await asyncio.to_thread(henge_cli, "migrate", "--from", pg_url, "--to", str(tmp_path / "back"), "--json")
    assert back.returncode == 0, back.stderr
    store = Store(tmp_path / "back")
    try:
        assert store.get_version("m0").config == {"n": 99} and len(store.history("m3")) == 3  # 2 pushes, 1 layer
        assert list(store.layers()) == ["site-x"]
    finally:
        store.close()


def test_a_bad_url_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape("cannot open the store at postgresql://u:***@127.0.0.1:1/x")):
        Store(tmp_path, url="postgresql://u:pw@127.0.0.1:1/x")
