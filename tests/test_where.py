"""The ``--where`` language (docs/where.md): its grammar and meaning as pure logic (examples and
hypothesis), then as a user meets it: ``henge status --where``, ``GET /devices?where=``, and a
fleet push and a rollout targeted by what devices report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from henge_mqtt import codec
from henge_mqtt.errors import ValidationFailed
from henge_mqtt.where import MAX_DEPTH, MAX_LENGTH, WhereError, parse

from .conftest import Running, henge_cli, wait_until
from .test_http import client as http_client
from .test_http import web
from .test_mqtt5 import device5
from .test_twins import publish5, reported, subscribe_to_config

DEVICE = {"id": "cam-7", "labels": {"site": "berlin", "tier": "gold"}, "state": "online", "sync": "in_sync",
          "online": True, "version": 4, "applied_version": 4,
          "reported": {"fw": "2.3.1", "hw": {"rev": "B", "ram": 512}, "tags": ["a"], "ok": True, "x.y": 1}}


@pytest.mark.parametrize(("text", "expected"), [
    ('reported.fw < "2.4"', True),  # versions compare number by number
    ('reported.fw < "2.10"', True),
    ('reported.fw >= "2.3.1"', True),
    ('reported.fw > "2.3"', True),
    ('reported.fw == "2.3.1"', True),
    ('reported.fw = "2.3.1"', True),
    ("reported.hw.ram > 256 and reported.hw.ram <= 512", True),
    ("reported.hw.ram == 512.0", True),
    ('reported.hw.ram == "512"', False),  # typed: a string is not a number
    ('reported.hw.ram < "1000"', False),
    ("reported.ok == true", True),
    ("reported.ok == 1", False),
    ('labels.site in ["paris", "berlin"]', True),
    ("reported.hw.ram in [512.0, 1024]", True),  # one number, however written
    ("reported.ok in [1, 2]", False),  # true is not 1
    ("reported.ok in [true]", True),
    ("reported.hw in [1]", False),  # an object is in no list
    ('labels.site not in ["paris", "berlin"]', False),
    ('labels.missing not in ["x"]', False),  # a missing field: every test on it is false...
    ('labels.missing != "x"', False),
    ('not labels.missing == "x"', True),  # ... negate the whole test to include it
    ("reported.battery exists", False),
    ("not reported.battery exists", True),
    ('reported."x.y" == 1', True),
    ('id == "cam-7" and (state == "offline" or sync == "in_sync")', True),
    ('state == "offline" or sync == "drift"', False),
    ("online == true and version > 3", True),
    ("version == 4 and applied_version == 4", True),
    ('reported.fw.major == 2', False),  # fw is not an object
    ('labels.tier == "gold" and not (reported.hw.rev == "A" or reported.hw.rev == "C")', True),
    ("reported.tags exists", True),
])
def test_meaning(text: str, expected: bool) -> None:
    assert parse(text).matches(DEVICE) is expected


@pytest.mark.parametrize(("text", "message"), [
    ("labels.site == berlin", 'expected a value, found \'berlin\' (quote strings: "berlin") at column 16'),
    ('reported.fw <', "expected a value, found the end at column 14"),
    ("firmware == 1", "unknown field 'firmware'"),
    ('labels == "x"', "labels needs a name: labels.NAME at column 1"),
    ('id.x == "x"', "id has no members"),
    ('(id == "a"', "expected ')', found the end at column 11"),
    ('id == "a', "a string is not closed at column 7"),
    ("id ~ 1", "unexpected '~' at column 4"),
    ("id == 1e999", "not a finite number"),
    ("id == 1.", "a number needs digits"),
    ('reported.fw == 2.4.1', 'is not a number: quote strings and versions ("2.4.1") at column 16'),
    ("id == 12ab", 'is not a number: quote strings and versions ("12ab")'),
    ('id == "a" "b"', "expected and, or or the end, found '\"b\"'"),
    ("id not 1", "expected in after not"),
    ("labels.site in []", "expected a value, found ']'"),
    ("", "empty"),
    ("and", "expected a field"),
    ("reported. == 1", "expected a name after '.'"),
    ("version == applied_version", "expected a value, found 'applied_version'"),  # values, not fields
])
def test_errors_name_the_problem_and_the_column(text: str, message: str) -> None:
    with pytest.raises(WhereError) as caught:
        parse(text)
    assert message in str(caught.value)


def test_sizes_are_bounded() -> None:
    with pytest.raises(WhereError, match="longer than"):
        parse("id == " + '"' + "x" * MAX_LENGTH + '"')
    with pytest.raises(WhereError, match="nested more than"):
        parse("not " * (MAX_DEPTH + 1) + 'id == "a"')
    with pytest.raises(WhereError, match="more than 64 tests"):
        parse(" or ".join(f'id == "d{i}"' for i in range(65)))
    assert parse(" or ".join(f'id == "d{i}"' for i in range(64))).matches({"id": "d63"})
    with pytest.raises(WhereError, match="a list of more than"):
        parse("id in [" + ",".join("1" for _ in range(1001)) + "]")
    assert parse("not " * (MAX_DEPTH - 1) + 'id == "a"').matches({"id": "a"}) is ((MAX_DEPTH - 1) % 2 == 0)


def test_a_standing_target_reads_only_what_a_device_is() -> None:
    allowed = frozenset({"id", "labels", "reported"})
    assert parse('reported.fw < "2" and labels.a == "b"', allowed=allowed).roots == {"reported", "labels"}
    with pytest.raises(WhereError, match="state cannot be used here"):
        parse('state == "online"', allowed=allowed)


FIELD = st.sampled_from(["id", "labels.site", "reported.fw", "reported.hw.ram", "reported.ok", "state"])
VALUE = st.one_of(st.integers(-5, 600), st.sampled_from(['"2.3.1"', '"berlin"', '"2.10"', "true", "null", '"x"']))


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["cmp", "exists", "in"] + (["and", "or", "not", "paren"] if depth < 4 else [])))
    if kind == "cmp":
        return f"{draw(FIELD)} {draw(st.sampled_from(['==', '!=', '<', '<=', '>', '>=']))} {draw(VALUE)}"
    if kind == "exists":
        return f"{draw(FIELD)} exists"
    if kind == "in":
        return f"{draw(FIELD)} {draw(st.sampled_from(['in', 'not in']))} [{draw(VALUE)}, {draw(VALUE)}]"
    if kind == "not":
        return f"not ({draw(expressions(depth + 1))})"
    if kind == "paren":
        return f"({draw(expressions(depth + 1))})"
    return f"({draw(expressions(depth + 1))}) {kind} ({draw(expressions(depth + 1))})"


@settings(max_examples=300, deadline=None)
@given(expressions(), expressions())
def test_connectives_mean_what_they_say(a: str, b: str) -> None:
    x, y = parse(a).matches(DEVICE), parse(b).matches(DEVICE)
    assert parse(f"({a}) and ({b})").matches(DEVICE) is (x and y)
    assert parse(f"({a}) or ({b})").matches(DEVICE) is (x or y)
    assert parse(f"not ({a})").matches(DEVICE) is (not x)


PIECES = [*'abdeilnorstxy.=!<>()[],"\' 0123456789-\\eE', " in ", " not ", " and ", " or ", " exists", "reported.",
          "labels.", "id", "1.5e3"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_any_text_parses_or_says_why_and_nothing_else(text: str) -> None:
    try:
        where = parse(text)
    except WhereError as exc:
        assert str(exc)
    else:
        where.matches(DEVICE)


# ---- as a user meets it --------------------------------------------------------------------------------


async def _fleet(running: Running) -> dict[str, Any]:
    """Three devices on the old firmware and two on the new, as they report it; one never reported."""
    clients = {}
    for n, fw in enumerate(["2.3.1", "2.3.9", "2.10.0", "2.4.0", "2.3.0"]):
        device = f"d{n}"
        client, _, _ = await device5(running, device, {"v": 1})
        await running.service.set_labels(device, {"site": "berlin" if n % 2 else "paris"}, [])
        assert await publish5(client, running.service.topics.reported(device), reported({"fw": fw}), 1) == 0
        clients[device] = client
    await running.add("silent", {"v": 1})
    await wait_until(lambda: running.service.counters.get("reported_changed") == 5, what="five reports")
    return clients


async def test_status_where_through_the_library_the_cli_and_http(running: Running) -> None:
    await _fleet(running)
    old = 'reported.fw < "2.4"'
    assert [r["device"] for r in await running.service.status(where=old)] == ["d0", "d1", "d4"]
    assert [r["device"] for r in await running.service.status(
        labels={"site": "paris"}, where=old)] == ["d0", "d4"]
    assert [r["device"] for r in await running.service.status(where="not reported.fw exists")] == ["silent"]
    out = await asyncio.to_thread(henge_cli, "status", "--where", old + ' and labels.site == "berlin"', "--json",
                                  "--data", str(running.data_dir))
    assert out.returncode == 0, out.stderr
    assert [r["device"] for r in json.loads(out.stdout)] == ["d1"]
    bad = await asyncio.to_thread(henge_cli, "status", "--where", "reported.fw < 2.4.0", "--data",
                                  str(running.data_dir))
    assert bad.returncode == 2
    assert bad.stderr == 'error: --where: 2.4.0 is not a number: quote strings and versions ("2.4.0") at column 15\n'

    with pytest.raises(ValidationFailed, match="where: unknown field 'fw'"):
        await running.service.status(where='fw == "1"')
    async with web(running) as (server, tokens), http_client(server, tokens["viewer"]) as c:
        page = (await c.get("/api/v1/devices", params={"where": old, "limit": 2})).json()
        assert [r["device"] for r in page["items"]] == ["d0", "d1"] and page["next_cursor"] == "d1"
        rest = (await c.get("/api/v1/devices", params={"where": old, "cursor": "d1"})).json()
        assert [r["device"] for r in rest["items"]] == ["d4"]
        problem = await c.get("/api/v1/devices", params={"where": "reported.fw <"})
        assert problem.status_code == 422 and "where: expected a value" in problem.json()["detail"]


async def test_a_fleet_push_and_a_rollout_target_what_devices_report(running: Running, tmp_path: Path) -> None:
    await _fleet(running)
    answer = await running.service.fleet_push({"v": 2}, where='reported.fw >= "2.4"')
    assert sorted(answer["per_device"]) == ["d2", "d3"]
    assert [(await running.service.get_version(d)).version for d in ("d0", "d2", "d3", "silent")] == [1, 2, 2, 1]
    config = tmp_path / "c.json"
    config.write_text('{"v": 3}')
    cli = await asyncio.to_thread(henge_cli, "push", "--where", 'reported.fw < "2.4" and labels.site == "paris"',
                                  str(config), "--json", "--data", str(running.data_dir))
    assert cli.returncode == 0, cli.stderr
    assert sorted(json.loads(cli.stdout)["per_device"]) == ["d0", "d4"]
    nobody = await asyncio.to_thread(henge_cli, "push", "--where", 'reported.fw == "9"', str(config),
                                     "--data", str(running.data_dir))
    assert nobody.returncode == 1 and 'no device matches where reported.fw == "9"' in nobody.stderr
    rollout = await running.service.start_rollout({"v": 4}, where='reported.fw < "2.4"', waves=[100])
    assert rollout["devices"] == 3


async def test_a_layer_with_where_follows_what_devices_report(running: Running) -> None:
    """A device that upgrades its firmware joins the layer for the new firmware, and leaves it when
    it goes back; a device that never reported stays out; the layer's own changes respect it too."""
    clients = {}
    for device in ("d1", "d2"):
        clients[device], _, _ = await device5(running, device, {"interval": 5})
        await running.service.set_labels(device, {"site": "berlin"}, [])
    await running.add("new-one", {"interval": 5})
    for device, fw in (("d1", "2.3.1"), ("d2", "2.4.0")):
        assert await publish5(clients[device], running.service.topics.reported(device), reported({"fw": fw}), 1) == 0
    await wait_until(lambda: running.service.counters.get("reported_changed") == 2, what="two reports")
    change = await running.service.set_layer("fast", {"mode": "fast"}, labels={"site": "berlin"},
                                             where='reported.fw >= "2.4"')
    assert change["devices"] == 1
    assert (await running.service.get_version("d2")).config == {"interval": 5, "mode": "fast"}
    assert (await running.service.get_version("d1")).config == {"interval": 5}
    assert (await running.service.get_version("new-one")).config == {"interval": 5}
    assert (await running.service.list_layers())[0]["where"] == 'reported.fw >= "2.4"'
    # d1 upgrades: its next report brings it into the layer (a new version, published to it).
    await subscribe_to_config(clients["d1"], running.service.topics.config("d1"))  # and its retained v1
    assert await publish5(clients["d1"], running.service.topics.reported("d1"), reported(patch={"fw": "2.4.1"}),
                          2) == 0
    delivered = await clients["d1"].read_until(codec.Publish)
    snapshot = json.loads(delivered.payload)
    assert snapshot["version"] == 2 and snapshot["config"] == {"interval": 5, "mode": "fast"}
    assert snapshot["layers"] == ["fast@1", "device"]
    # A report that changes something else changes nothing here; going back leaves the layer.
    await publish5(clients["d1"], running.service.topics.reported("d1"), reported(patch={"uptime_note": "x"}), 3)
    await publish5(clients["d1"], running.service.topics.reported("d1"), reported(patch={"fw": "2.3.9"}), 4)
    await wait_until(lambda: _version_is(running, "d1", 3), what="d1 back out of the layer")
    assert (await running.service.get_version("d1")).config == {"interval": 5}
    explained = await running.service.explain("d2")
    assert {"pointer": "/mode", "value": "fast", "layer": "fast@1"} in explained
    history = await running.service.layer_history("fast")
    assert history[0]["where"] == 'reported.fw >= "2.4"'
    with pytest.raises(ValidationFailed, match="where: state cannot be used here"):
        await running.service.set_layer("live", {"a": 1}, labels={"site": "berlin"}, where='state == "online"')
    with pytest.raises(ValidationFailed, match="takes no labels and no where"):
        await running.service.set_layer("fleet", {"a": 1}, where='reported.fw == "1"')


async def _version_is(running: Running, device: str, version: int) -> bool:
    return (await running.service.get_version(device)).version == version
