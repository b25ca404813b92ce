"""Config layers (docs/rollouts.md#layers): fleet, then label layers, then the device's own, merged
with RFC 7396; versioned; a layer change stores exactly the devices whose config changes."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from henge_mqtt.errors import SchemaViolation, UnknownLayer, ValidationFailed
from henge_mqtt.layering import explain, merge_patch

from .conftest import Running, henge_cli, next_message, payload_json

pytestmark = pytest.mark.both_stores  # each service test runs on SQLite and on PostgreSQL


async def config_of(running: Running, device: str) -> dict[str, Any]:
    return (await running.service.get_version(device)).config


async def versions(running: Running, device: str) -> list[int]:
    return [v.version for v in await running.service.history(device)]


async def test_layers_merge_in_order_and_only_changed_devices_get_versions(running: Running) -> None:
    svc = running.service
    for device, labels in (("b1", {"site": "berlin"}), ("b2", {"site": "berlin", "tier": "edge"}),
                           ("p1", {"site": "paris"})):
        await svc.add_device(device, labels)
    await svc.push("b1", {"port": 9000, "debug": None})  # null in the device layer removes a key below it
    fleet = await svc.set_layer("fleet", {"port": 80, "log": {"level": "info", "file": "/var/log/x"}, "debug": True})
    assert fleet["devices"] == 3 and fleet["version"] == 1
    assert await config_of(running, "p1") == {"port": 80, "log": {"level": "info", "file": "/var/log/x"},
                                              "debug": True}
    assert await config_of(running, "b1") == {"port": 9000, "log": {"level": "info", "file": "/var/log/x"}}
    berlin = await svc.set_layer("berlin", {"log": {"level": "debug"}}, labels={"site": "berlin"}, priority=10)
    assert berlin["devices"] == 2 and set(berlin["versions"]) == {"b1", "b2"}
    edge = await svc.set_layer("edge", {"log": {"level": "warn", "file": None}}, labels={"tier": "edge"}, priority=20)
    assert edge["devices"] == 1
    b2 = await svc.get_version("b2")
    assert b2.config == {"port": 80, "log": {"level": "warn"}, "debug": True}
    assert b2.layers == ["fleet@1", "berlin@1", "edge@1", "device"]
    assert b2.snapshot().layers == b2.layers
    # A layer change that does not change a device's config gives it no version.
    p1_before = await versions(running, "p1")
    again = await svc.set_layer("berlin", {"log": {"level": "debug"}, "extra": None}, message="same effect")
    assert again["devices"] == 0 and await versions(running, "p1") == p1_before
    # Equal priorities: ordered by name.
    await svc.set_layer("aaa", {"x": "a"}, labels={"site": "paris"}, priority=5)
    await svc.set_layer("bbb", {"x": "b"}, labels={"site": "paris"}, priority=5)
    assert (await config_of(running, "p1"))["x"] == "b"


async def test_no_layers_no_change(running: Running) -> None:
    """Without layers a config is stored exactly as given, nulls included."""
    await running.add("d1")
    row = await running.service.push("d1", {"a": None, "b": {"c": None}})
    assert row.config == {"a": None, "b": {"c": None}} and row.layers == [] and row.own is None


async def test_a_connected_device_gets_the_layer_change_with_its_layers(running: Running) -> None:
    secret = await running.add("cam1", {"port": 8080})
    async with running.device_client("cam1", secret) as device:
        await device.subscribe("henge/devices/cam1/config", qos=1)
        assert payload_json(await next_message(device))["layers"] == []
        await running.service.set_layer("fleet", {"ntp": "pool.ntp.org"})
        snapshot = payload_json(await next_message(device))
        assert snapshot["config"] == {"port": 8080, "ntp": "pool.ntp.org"}
        assert snapshot["layers"] == ["fleet@1", "device"] and snapshot["version"] == 2


async def test_new_devices_and_label_changes_get_their_layers(running: Running) -> None:
    svc = running.service
    await svc.set_layer("fleet", {"ntp": "a"})
    await svc.add_device("new1")
    assert (await svc.get_version("new1")).config == {"ntp": "a"}  # version 1 from the layers alone
    await svc.set_layer("berlin", {"tz": "Europe/Berlin"}, labels={"site": "berlin"})
    await svc.set_labels("new1", {"site": "berlin"}, [])
    assert await config_of(running, "new1") == {"ntp": "a", "tz": "Europe/Berlin"}
    await svc.set_labels("new1", {}, ["site"])
    assert await config_of(running, "new1") == {"ntp": "a"}
    await svc.import_devices([("imp1", {"site": "berlin"})])
    assert await config_of(running, "imp1") == {"ntp": "a", "tz": "Europe/Berlin"}


async def test_device_push_patch_and_rollback_act_on_the_device_layer(running: Running) -> None:
    svc = running.service
    await running.add("d1", {"port": 1})
    await svc.set_layer("fleet", {"ntp": "a", "port": 80})
    assert await config_of(running, "d1") == {"ntp": "a", "port": 1}
    row, stored = await svc.push_checked("d1", None, patch={"mode": "fast"})
    assert stored and row.config == {"ntp": "a", "port": 1, "mode": "fast"}
    assert row.device_layer == {"port": 1, "mode": "fast"}
    # Equal effective content stores nothing.
    _, stored = await svc.push_checked("d1", {"port": 1, "mode": "fast", "ntp": "a"})
    assert not stored
    back = await svc.rollback("d1", 1)  # version 1's device layer, under today's layers
    assert back.config == {"ntp": "a", "port": 1}
    rows, _ = await svc.push_many(["d1"], {"fleet_push": True})
    assert rows[0].config == {"ntp": "a", "port": 80, "fleet_push": True}


async def test_a_layer_that_breaks_a_schema_is_refused_and_stores_nothing(running: Running) -> None:
    svc = running.service
    await running.add("a1", {"name": "one"})   # its own layer says nothing about port
    await running.add("a2", {"port": 80})      # its own layer overrides any port below it
    await svc.set_schema({}, {"properties": {"port": {"type": "integer"}}})
    with pytest.raises(SchemaViolation) as refused:
        await svc.set_layer("fleet", {"port": "eighty"})
    # a1 now, and any device added later with no config of its own (issue 19)
    assert [(e["device"], e["pointer"]) for e in refused.value.errors] == [
        ("a1", "/port"), ("a new device (no config of its own)", "/port")]
    assert "the layer was not stored" in str(refused.value)
    assert await svc.list_layers() == []
    assert (await versions(running, "a1"), await versions(running, "a2")) == ([1], [1])
    assert (await svc.set_layer("fleet", {"port": 443}))["devices"] == 1  # a2 keeps its own port


async def test_a_label_change_whose_layers_break_a_schema_changes_nothing(running: Running) -> None:
    svc = running.service
    await running.add("d1", {"name": "x"})
    await svc.set_schema({}, {"properties": {"port": {"type": "integer"}}})
    await svc.set_layer("bad", {"port": "eighty"}, labels={"site": "bad"}, force=True)
    with pytest.raises(SchemaViolation):
        await svc.set_labels("d1", {"site": "bad"}, [])
    assert (await svc.get_device("d1")).labels == {}  # the label change was refused whole
    assert await versions(running, "d1") == [1]
    with pytest.raises(SchemaViolation):
        await svc.add_device("d2", {"site": "bad"})
    assert not svc.store.has_device("d2")


async def test_layer_history_diff_rollback_remove_and_explain(running: Running, tmp_path: Path) -> None:
    await running.add("d1", {"port": 9000})
    data = str(running.data_dir)

    def cli(*args: str, input: str | None = None) -> Any:
        return henge_cli(*args, "--data", data, input=input)

    first = await asyncio.to_thread(cli, "layer", "set", "fleet", "-", input='{"ntp": "a", "log": {"level": "info"}}')
    assert first.returncode == 0 and "layer fleet is at version 1; 1 device(s) got a new version" in first.stdout
    await asyncio.to_thread(cli, "layer", "set", "fleet", "-", "-m", "faster",
                            input='{"ntp": "b", "log": {"level": "info"}}')
    labelled = await asyncio.to_thread(cli, "layer", "set", "ops", "-", "--label", "site=x", input='{"a": 1}')
    assert labelled.returncode == 0 and "0 device(s)" in labelled.stdout
    missing = await asyncio.to_thread(cli, "layer", "set", "nolabels", "-", input='{"a": 1}')
    assert missing.returncode == 1 and "needs its labels" in missing.stderr
    listed = await asyncio.to_thread(cli, "layer", "list")
    assert listed.stdout.splitlines()[1].startswith("fleet") and "site=x" in listed.stdout
    diff = await asyncio.to_thread(cli, "layer", "diff", "fleet", "1", "2")
    assert diff.returncode == 1 and '-  "ntp": "a"' in diff.stdout
    explained = await asyncio.to_thread(cli, "get", "d1", "--explain", "--json")
    assert {leaf["pointer"]: leaf["layer"] for leaf in json.loads(explained.stdout)} == {
        "/ntp": "fleet@2", "/log/level": "fleet@2", "/port": "device"}
    table = await asyncio.to_thread(cli, "get", "d1", "--explain")
    assert "/port" in table.stdout and "device" in table.stdout
    back = await asyncio.to_thread(cli, "layer", "rollback", "fleet", "1")
    assert back.returncode == 0 and "version 3" in back.stdout
    assert (await running.service.get_version("d1")).config["ntp"] == "a"
    history = await asyncio.to_thread(cli, "layer", "history", "fleet", "--json")
    assert [h["message"] for h in json.loads(history.stdout)] == ["", "faster", "rollback to version 1"]
    removed = await asyncio.to_thread(cli, "layer", "remove", "fleet")
    assert removed.returncode == 0
    assert (await running.service.get_version("d1")).config == {"port": 9000}
    with pytest.raises(UnknownLayer):
        await running.service.remove_layer("fleet")
    with pytest.raises(ValidationFailed, match="takes no labels"):
        await running.service.set_layer("fleet", {"a": 1}, labels={"site": "x"})
    audit = [e["action"] for e in await running.service.audit() if e["action"].startswith("layer")]
    assert audit == ["layer.set", "layer.set", "layer.set", "layer.set", "layer.remove"]


async def test_layers_survive_a_restart(start_service: Any, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    async with start_service(data_dir=data) as first:
        await first.add("d1", {"own": 1})
        await first.service.set_layer("fleet", {"ntp": "a"})
    async with start_service(data_dir=data) as second:
        assert [layer["layer"] for layer in await second.service.list_layers()] == ["fleet"]
        await second.service.push("d1", {"own": 2})
        assert (await second.service.get_version("d1")).config == {"ntp": "a", "own": 2}


async def test_a_layer_change_reaches_its_first_devices_before_the_rest_is_stored(running: Running) -> None:
    """Streamed as a fleet push is (issue "At wire speed"): the layer and its first chunk of devices in
    one transaction, published at once, the other devices chunk by chunk. The test holds the second
    chunk's transaction until the first device has its config: before, all waited for one transaction
    (0.8-0.9 s at 18,000 devices)."""
    svc = running.service
    secrets = {f"s{i:03d}": await svc.add_device(f"s{i:03d}") for i in range(150)}
    store = svc.store
    gate = threading.Event()
    real = store.continue_layer_change

    def held(devices: list[str], *, last: bool) -> list[Any]:
        assert gate.wait(30)
        return real(devices, last=last)

    store.continue_layer_change = held  # type: ignore[method-assign]
    try:
        async with running.device_client("s000", secrets["s000"]) as client:
            await client.subscribe("henge/devices/s000/config", qos=1)
            change = asyncio.create_task(svc.set_layer("fleet", {"ntp": "a"}))
            assert payload_json(await next_message(client, 10))["config"] == {"ntp": "a"}
            assert not change.done()
            assert running.retained("henge/devices/s149/config") is None  # not stored yet, so not published
    finally:
        gate.set()
    done = await change
    assert done["devices"] == 150 and set(done["versions"].values()) == {1}
    assert payload_json_bytes(running.retained("henge/devices/s149/config"))["config"] == {"ntp": "a"}
    entries = [e for e in await svc.audit() if e["action"] == "layer.set"]
    assert len(entries) == 1 and entries[0]["summary"]["devices"] == 150


async def test_a_layer_change_stopped_part_way_is_finished_when_the_service_starts(start_service: Any,
                                                                                 tmp_path: Path) -> None:
    """A service killed between two chunks of a layer change: the store holds the layer's new version
    and its first chunk only. The next start finishes it, so no device keeps a config its layers in
    force no longer give; the audit says the change once, with every device it changed."""
    data = tmp_path / "kept"
    devices = [f"s{i:03d}" for i in range(150)]
    async with start_service(data_dir=data) as first:
        for device in devices:
            await first.service.add_device(device)
        store = first.service.store
        # exactly what the store holds when the process dies after the first chunk's commit
        await first.service.worker.run(lambda: store.begin_layer_change(
            "fleet", {"ntp": "a"}, actor="admin", devices=devices[:100], last=False))
    async with start_service(data_dir=data) as second:
        svc = second.service
        for device in (devices[0], devices[100], devices[-1]):
            assert (await svc.get_version(device)).config == {"ntp": "a"}
        assert payload_json_bytes(second.retained("henge/devices/s149/config"))["config"] == {"ntp": "a"}
        entries = [e for e in await svc.audit() if e["action"] == "layer.set"]
        assert len(entries) == 1 and entries[0]["summary"]["devices"] == 150
        # nothing left under way: a restart changes nothing more
    async with start_service(data_dir=data) as third:
        assert await versions(third, devices[-1]) == [1]


json_values = st.recursive(st.integers(0, 3) | st.none() | st.sampled_from(["x", "y"]),
                           lambda children: st.dictionaries(st.sampled_from("abc"), children, max_size=3),
                           max_leaves=8)
layers = st.lists(st.dictionaries(st.sampled_from("abc"), json_values, max_size=3), min_size=1, max_size=4)


def payload_json_bytes(data: bytes | None) -> Any:
    assert data is not None
    return json.loads(data)


def _at(document: Any, pointer: str) -> Any:
    for part in pointer.split("/")[1:]:
        if not isinstance(document, dict) or part not in document:
            return KeyError
        document = document[part]
    return document


@given(layers)
@settings(max_examples=300, deadline=None)
def test_explain_names_the_layer_whose_value_each_leaf_has(chain: list[dict[str, Any]]) -> None:
    result: Any = {}
    for layer in chain:
        result = merge_patch(result, layer)
    owners = explain([(f"L{i}", layer) for i, layer in enumerate(chain)])

    def leaves(value: Any, where: str) -> list[tuple[str, Any]]:
        if isinstance(value, dict) and value:
            return [leaf for k, v in value.items() for leaf in leaves(v, f"{where}/{k}")]
        return [(where, value)]

    for pointer, value in leaves(result, "") if result else []:
        owner = owners.get(pointer)
        assert owner is not None, (pointer, owners)
        set_there = _at(chain[int(owner[1:])], pointer)
        assert set_there == value or (value == {} and isinstance(set_there, dict))


async def test_layers_over_http(running: Running) -> None:
    import httpx

    from henge_mqtt.http import HttpServer

    await running.service.add_device("d1", {"site": "x"})
    async with HttpServer(running.service, "127.0.0.1", 0) as server:
        token = (await running.service.create_token("ops", "operator"))["token"]
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as c:
            put = await c.put("api/v1/layers/fleet", json={"content": {"ntp": "a"}})
            assert put.status_code == 200 and put.json()["devices"] == 1
            site = await c.put("api/v1/layers/site-x", json={"content": {"tz": "UTC"}, "labels": {"site": "x"},
                                                             "priority": 5})
            assert site.json()["devices"] == 1
            nolabels = await c.put("api/v1/layers/other", json={"content": {"a": 1}})
            assert (nolabels.status_code, nolabels.json()["code"]) == (422, "invalid")
            explained = (await c.get("api/v1/devices/d1/explain")).json()
            assert {e["pointer"]: e["layer"] for e in explained} == {"/ntp": "fleet@1", "/tz": "site-x@1"}
            assert [layer["layer"] for layer in (await c.get("api/v1/layers")).json()] == ["fleet", "site-x"]
            await c.put("api/v1/layers/fleet", json={"content": {"ntp": "b"}})
            assert '+  "ntp": "b"' in (await c.get("api/v1/layers/fleet/diff", params={"a": 1, "b": 2})).json()["diff"]
            back = await c.post("api/v1/layers/fleet/rollback", json={"version": 1})
            assert back.json()["version"] == 3
            assert (await c.get("api/v1/layers/fleet", params={"version": 2})).json()["content"] == {"ntp": "b"}
            assert len((await c.get("api/v1/layers/fleet/history")).json()) == 3
            assert (await c.delete("api/v1/layers/site-x")).json()["removed"] is True
            gone = await c.delete("api/v1/layers/site-x")
            assert (gone.status_code, gone.json()["code"]) == (404, "unknown_layer")


async def test_a_layer_that_would_refuse_every_new_device_is_refused_unless_forced(running: Running) -> None:
    """Issue 19: every current device overrides `interval`, so none breaks; a device added next, with no
    config of its own, would get "often" and be refused. The layer change is refused for that case too."""
    svc = running.service
    await svc.set_schema({}, {"type": "object", "properties": {"interval": {"type": "integer"}}})
    for d in ("p1", "p2"):
        await running.add(d, {"interval": 5})
    with pytest.raises(SchemaViolation) as refused:
        await svc.set_layer("fleet", {"interval": "often"})
    assert [(e["device"], e["pointer"]) for e in refused.value.errors] == [
        ("a new device (no config of its own)", "/interval")]
    assert "--force" in str(refused.value)
    assert await svc.list_layers() == []
    await svc.add_device("p3")  # nothing changed: a new device is still welcome
    await svc.remove_device("p3")
    # A label layer is checked for a device with exactly its labels (the least it takes to get it).
    with pytest.raises(SchemaViolation) as labelled:
        await svc.set_layer("berlin", {"interval": "often"}, labels={"site": "berlin"})
    assert labelled.value.errors[0]["device"] == "a new device with site=berlin (no config of its own)"
    # --force stores it and says which case breaks; that case is then refused, as the answer said.
    forced = await svc.set_layer("fleet", {"interval": "often"}, force=True)
    assert forced["version"] == 1 and len(forced["new_devices_invalid"]) == 1
    assert "a new device" in forced["new_devices_invalid"][0] and "/interval" in forced["new_devices_invalid"][0]
    with pytest.raises(SchemaViolation):
        await svc.add_device("p4")
    # Removing it is checked the same way: with no layer left a new device gets no config, nothing to refuse.
    assert "new_devices_invalid" not in await svc.remove_layer("fleet")
    await svc.add_device("p4")


async def test_layer_set_cli_refuses_a_layer_new_devices_would_break(running: Running) -> None:
    data = str(running.data_dir)

    def cli(*args: str, input: str | None = None) -> Any:
        return asyncio.to_thread(henge_cli, *args, "--data", data, input=input)

    assert (await cli("schema", "set", "-", input='{"properties": {"interval": {"type": "integer"}}}')).returncode == 0
    refused = await cli("layer", "set", "fleet", "-", input='{"interval": "often"}')
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines()[0] == ("error: a new device (no config of its own): /interval: 'often' is "
                                              "not of type 'integer' (schema fleet@1)")
    forced = await cli("layer", "set", "fleet", "-", "--force", input='{"interval": "often"}')
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.startswith("warning: a new device (no config of its own): /interval")
    added = await cli("device", "add", "late")
    assert added.returncode == 1 and "/interval" in added.stderr


async def test_a_layer_change_is_previewed_with_its_schema_violations(running: Running, tmp_path: Path) -> None:
    """`henge layer set ... --dry-run` (op layer.preview): the devices it would change, the first
    one's diff, the schema violations set would refuse it for, now and for a later device; nothing
    stored."""
    svc = running.service
    for device in ("d1", "d2"):
        await svc.add_device(device, {"site": "a"})
    await svc.push("d1", {"name": "one"})
    await svc.set_schema({"site": "a"}, {"type": "object", "properties": {"port": {"type": "integer", "maximum": 100}}})
    layer = tmp_path / "ports.json"
    layer.write_text('{"port": 999}')
    data = str(running.data_dir)
    result = await asyncio.to_thread(henge_cli, "layer", "set", "ports", str(layer), "--label", "site=a",
                                     "--dry-run", "--data", data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "layer ports would change the config of 2 device(s); nothing was stored"
    assert lines[1] == "  d1, d2"
    assert any(line.startswith("schema: d1: /port:") for line in lines)
    assert any(line.startswith("schema (a device added later): a new device with site=a") for line in lines)
    assert '+  "port": 999' in result.stdout
    layer.write_text('{"port": 81}')
    ok = await asyncio.to_thread(henge_cli, "layer", "set", "ports", str(layer), "--label", "site=a", "--dry-run",
                                 "--json", "--data", data)
    answer = json.loads(ok.stdout)
    assert (answer["change"], answer["invalid"], answer["new_devices_invalid"]) == (2, [], [])
    assert answer["example"]["device"] == "d1" and answer["example"]["to_version"] == 2
    assert await svc.list_layers() == [] and [r.version for r in svc.store.history("d1")] == [1]


async def test_a_schema_is_previewed_against_every_current_config(running: Running, tmp_path: Path) -> None:
    """`henge schema set ... --dry-run` (op schema.preview): the current configs it would refuse,
    one violation a line; a document that is not a JSON Schema refused as set would; nothing stored."""
    svc = running.service
    for device, port in (("d1", 500), ("d2", 50)):
        await svc.add_device(device, {"site": "a"})
        await svc.push(device, {"port": port})
    schema = tmp_path / "ports.json"
    schema.write_text('{"type": "object", "properties": {"port": {"maximum": 100}}}')
    data = str(running.data_dir)
    result = await asyncio.to_thread(henge_cli, "schema", "set", str(schema), "--label", "site=a", "--dry-run",
                                     "--data", data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "schema site=a would be version 1 and refuse the config of 1 device(s); nothing was stored"
    assert lines[1].startswith("  d1: /port:") and lines[1].endswith("(schema site=a@1)")
    schema.write_text('{"type": 5}')
    bad = await asyncio.to_thread(henge_cli, "schema", "set", str(schema), "--dry-run", "--data", data)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    assert await svc.list_schemas() == []


async def test_a_layer_edit_from_an_older_version_is_refused_not_overwritten(running: Running, tmp_path: Path) -> None:
    """`layer set --if-version N` and `PUT /layers/{name}` with `If-Match: "N"`: stored only if N is
    the layer's current version; otherwise a version conflict (412 over HTTP) and nothing stored."""
    import httpx

    from henge_mqtt.http import HttpServer

    svc = running.service
    await svc.add_device("d1", {"site": "a"})
    layer = tmp_path / "l.json"
    layer.write_text('{"port": 1}')
    data = str(running.data_dir)
    first = await asyncio.to_thread(henge_cli, "layer", "set", "ports", str(layer), "--label", "site=a",
                                    "--if-version", "0", "--data", data)
    assert first.returncode == 0, first.stderr
    stale = await asyncio.to_thread(henge_cli, "layer", "set", "ports", str(layer), "--if-version", "0",
                                    "--data", data)
    assert stale.returncode != 0 and "expected current version 0, it is 1; nothing was stored" in stale.stderr
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        token = (await svc.create_token("ops", "operator"))["token"]
        async with httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=10,
                                     headers={"Authorization": f"Bearer {token}"}) as http:
            refused = await http.put("/api/v1/layers/ports", json={"content": {"port": 2}},
                                     headers={"If-Match": '"0"'})
            assert refused.status_code == 412 and refused.json()["code"] == "version_conflict"
            stored = await http.put("/api/v1/layers/ports", json={"content": {"port": 2}}, headers={"If-Match": '"1"'})
            assert stored.status_code == 200 and stored.json()["version"] == 2
    assert (await svc.get_version("d1")).config == {"port": 2}
