"""Config schemas (docs/rollouts.md#schemas): nothing a schema in force refuses is ever stored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from henge_mqtt.errors import InvalidSchema, SchemaViolation, ValidationFailed
from henge_mqtt.http import HttpServer

from .conftest import Running, henge_cli

pytestmark = pytest.mark.both_stores  # each service test runs on SQLite and on PostgreSQL

PORTS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535},
                   "name": {"type": "string"}},
    "required": ["port"],
}
BERLIN = {"type": "object", "properties": {"name": {"const": "berlin"}}}


async def versions(running: Running, device: str) -> list[int]:
    return [v.version for v in await running.service.history(device)]


async def test_a_fleet_schema_refuses_bad_configs_with_pointers_and_stores_nothing(running: Running) -> None:
    svc = running.service
    await running.add("cam1", {"port": 80})
    result = await svc.set_schema({}, PORTS)
    assert (result["schema"], result["version"], result["invalid_devices"]) == ("fleet", 1, [])
    with pytest.raises(SchemaViolation) as refused:
        await svc.push("cam1", {"port": 99999, "name": 7})
    assert {(e["pointer"], e["schema"]) for e in refused.value.errors} == {("/port", "fleet@1"), ("/name", "fleet@1")}
    assert "/port: 99999 is greater than the maximum of 65535 (schema fleet@1)" in str(refused.value)
    with pytest.raises(SchemaViolation, match="'port' is a required property"):
        await svc.push("cam1", {}, force=True)
    with pytest.raises(SchemaViolation):
        await svc.push_checked("cam1", None, patch={"port": "80"})
    assert await versions(running, "cam1") == [1]
    assert (await svc.push("cam1", {"port": 8080})).version == 2


async def test_label_schemas_apply_only_to_their_devices(running: Running) -> None:
    svc = running.service
    await svc.add_device("b1", {"site": "berlin"})
    await svc.add_device("p1", {"site": "paris"})
    await svc.set_schema({"site": "berlin"}, BERLIN)
    with pytest.raises(SchemaViolation, match=r"schema site=berlin@1"):
        await svc.push("b1", {"name": "paris"})
    assert (await svc.push("p1", {"name": "paris"})).version == 1
    assert (await svc.list_schemas()) == [{"schema": "site=berlin", "labels": {"site": "berlin"}, "version": 1}]


async def test_a_fleet_push_that_breaks_a_schema_for_one_device_stores_for_none(running: Running) -> None:
    svc = running.service
    for i in range(30):
        await svc.add_device(f"d{i:02d}", {"site": "berlin" if i == 17 else "paris"})
    await svc.set_schema({"site": "berlin"}, BERLIN)
    devices = await svc.select(all_devices=True)
    with pytest.raises(SchemaViolation) as refused:
        await svc.push_many(devices, {"name": "paris"})
    assert [e["device"] for e in refused.value.errors] == ["d17"]
    assert "nothing was stored for any device" in str(refused.value)
    assert [d for d in devices if await versions(running, d)] == []
    rows, _ = await svc.push_many(devices, {"name": "berlin"})
    assert len(rows) == 30


async def test_a_schema_that_current_configs_break_is_refused_unless_forced(running: Running) -> None:
    svc = running.service
    await running.add("ok", {"port": 80})
    await running.add("bad", {"port": 0})
    with pytest.raises(SchemaViolation) as refused:
        await svc.set_schema({}, PORTS)
    assert [(e["device"], e["pointer"]) for e in refused.value.errors] == [("bad", "/port")]
    assert "--force" in str(refused.value)
    assert await svc.list_schemas() == []
    result = await svc.set_schema({}, PORTS, force=True)
    assert result["invalid_devices"] == ["bad"]
    rows = {r["device"]: r for r in await svc.status()}
    assert (rows["bad"]["sync"], rows["ok"]["sync"]) == ("invalid", "unknown")
    assert rows["bad"]["schema_error"].startswith("/port: 0 is less than the minimum of 1")
    assert [r["device"] for r in await svc.status(sync="invalid")] == ["bad"]
    assert (await svc.summary())["sync"]["invalid"] == 1
    await svc.push("bad", {"port": 1})
    assert (await svc.status("bad"))[0]["sync"] != "invalid"
    # A rollback to the version the schema refuses is refused too.
    with pytest.raises(SchemaViolation):
        await svc.rollback("bad", 1)
    assert await versions(running, "bad") == [1, 2]
    audit = [e for e in await svc.audit() if e["action"].startswith("schema.")]
    assert [(e["action"], e["summary"]) for e in audit] == [("schema.set", {"schema": "fleet", "version": 1,
                                                                            "forced": True})]


async def test_labels_that_bring_a_schema_mark_the_device_invalid(running: Running) -> None:
    svc = running.service
    await running.add("cam1", {"name": "paris"})
    await svc.set_schema({"site": "berlin"}, BERLIN)
    assert (await svc.status("cam1"))[0]["sync"] != "invalid"
    await svc.set_labels("cam1", {"site": "berlin"}, [])
    assert (await svc.status("cam1"))[0]["sync"] == "invalid"
    await svc.set_labels("cam1", {}, ["site"])
    assert (await svc.status("cam1"))[0]["sync"] != "invalid"


async def test_bad_schema_documents_history_and_remove(running: Running) -> None:
    svc = running.service
    await running.add("cam1", {"port": 80})
    for bad, match in [({"type": "no-such-type"}, "not a valid JSON Schema 2020-12"),
                       ({"$schema": "http://json-schema.org/draft-07/schema#"}, "draft 2020-12"),
                       ({"minimum": "one"}, "/minimum"),
                       ({"properties": {"a": {"$ref": "https://example.com/a.json"}}}, "points outside the document")]:
        with pytest.raises(InvalidSchema, match=match):
            await svc.set_schema({}, bad)
    await svc.set_schema({}, PORTS)
    await svc.set_schema({}, PORTS | {"required": ["port", "name"]}, force=True)
    assert (await svc.status("cam1"))[0]["sync"] == "invalid"
    await svc.remove_schema({})
    assert (await svc.status("cam1"))[0]["sync"] != "invalid"
    history = await svc.schema_history({})
    assert [(h["version"], h["removed"]) for h in history] == [(1, False), (2, False), (3, True)]
    assert (await svc.get_schema({}, 1))["document"] == PORTS
    with pytest.raises(ValidationFailed, match="no schema 'fleet' is in force"):
        await svc.remove_schema({})
    assert (await svc.push("cam1", {"anything": True})).version == 2


async def test_schemas_survive_a_restart_and_invalid_is_recomputed(start_service: Any, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    async with start_service(data_dir=data) as first:
        await first.add("bad", {"port": 0})
        await first.service.set_schema({}, PORTS, force=True)
    async with start_service(data_dir=data) as second:
        assert (await second.service.status("bad"))[0]["sync"] == "invalid"
        with pytest.raises(SchemaViolation):
            await second.service.push("bad", {"port": -1})


async def test_schema_commands_and_one_error_line_per_violation(running: Running, tmp_path: Path) -> None:
    await running.add("cam1", {"port": 80})
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(PORTS))
    data = str(running.data_dir)
    ok = await asyncio.to_thread(henge_cli, "schema", "set", str(schema_file), "--data", data)
    assert ok.returncode == 0 and "schema fleet is at version 1" in ok.stdout
    stale = await asyncio.to_thread(henge_cli, "schema", "set", str(schema_file), "--if-version", "0", "--data", data)
    assert stale.returncode == 1 and stale.stderr == (
        "error: version conflict on 'schema fleet': expected current version 0, it is 1; nothing was stored\n")
    assert (await running.service.get_schema({}))["version"] == 1
    again = await asyncio.to_thread(henge_cli, "schema", "set", str(schema_file), "--if-version", "1", "--data", data)
    assert again.returncode == 0 and "schema fleet is at version 2" in again.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"port": 99999, "name": 7}')
    refused = await asyncio.to_thread(henge_cli, "push", "cam1", str(bad), "--data", data)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and all(line.startswith("error: ") for line in lines)
    assert lines[0] == "error: /name: 7 is not of type 'string' (schema fleet@2)"
    assert lines[1] == "error: /port: 99999 is greater than the maximum of 65535 (schema fleet@2)"
    listed = await asyncio.to_thread(henge_cli, "schema", "list", "--data", data)
    assert "fleet" in listed.stdout
    got = await asyncio.to_thread(henge_cli, "schema", "get", "--data", data)
    assert json.loads(got.stdout) == PORTS
    history = await asyncio.to_thread(henge_cli, "schema", "history", "--data", data, "--json")
    assert [h["version"] for h in json.loads(history.stdout)] == [1, 2]
    removed = await asyncio.to_thread(henge_cli, "schema", "remove", "--data", data)
    assert removed.returncode == 0 and "removed" in removed.stdout


async def test_schemas_over_http(running: Running) -> None:
    await running.add("cam1", {"port": 80})
    async with HttpServer(running.service, "127.0.0.1", 0) as server:
        admin = (await running.service.create_token("a", "admin"))["token"]
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {admin}"}) as c:
            put = await c.put("api/v1/schemas/fleet", json=PORTS, headers={"If-Match": '"0"'})
            assert put.status_code == 200 and put.json()["version"] == 1
            stale = await c.put("api/v1/schemas/fleet", json=PORTS, headers={"If-Match": '"0"'})
            assert (stale.status_code, stale.json()["code"]) == (412, "version_conflict")
            assert (await c.get("api/v1/schemas/fleet/history")).json()[-1]["version"] == 1
            refused = await c.put("api/v1/devices/cam1/config", json={"port": 0})
            assert (refused.status_code, refused.json()["code"]) == (422, "schema_violation")
            assert refused.json()["errors"] == [{"schema": "fleet@1", "pointer": "/port",
                                                 "message": "0 is less than the minimum of 1"}]
            label = await c.put("api/v1/schemas/site=berlin", json=BERLIN)
            assert label.json()["schema"] == "site=berlin"
            assert [s["schema"] for s in (await c.get("api/v1/schemas")).json()] == ["fleet", "site=berlin"]
            assert (await c.get("api/v1/schemas/site=berlin")).json()["document"] == BERLIN
            assert (await c.delete("api/v1/schemas/site=berlin")).json()["removed"] is True
            assert len((await c.get("api/v1/schemas/site=berlin/history")).json()) == 2
            bad = await c.put("api/v1/schemas/fleet", json={"type": 5})
            assert (bad.status_code, bad.json()["code"]) == (422, "invalid_schema")
