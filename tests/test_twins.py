"""Device twins: what a device reports it is and runs (``henge/devices/{id}/reported``), kept with a
bounded history, served by the library, the admin protocol, the CLI and HTTP; and drift, when the
config a device reports having is not the version it applied (docs/protocol.md#reported-state)."""

from __future__ import annotations

import asyncio
import json
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import Any, get_args

import paho.mqtt.client as paho

from henge_mqtt import codec
from henge_mqtt.models import Event, SyncState, config_sha256
from henge_mqtt.results import SYNC_STATES

from .conftest import ROOT, Running, henge_cli, next_message, payload_json, wait_status, wait_until
from .test_http import client as http_client
from .test_http import web
from .test_mqtt5 import Client5, device5


def reported(document: dict[str, Any] | None = None, *, patch: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"patch": patch} if patch is not None else {"document": document}).encode()


async def publish5(client: Any, topic: str, payload: bytes, packet_id: int) -> int:
    await client.send(codec.Publish(topic, payload, 1, packet_id=packet_id))
    ack = await client.read_until(codec.Puback)
    assert ack.packet_id == packet_id
    return int(ack.reason)


async def subscribe_to_config(client: Any, topic: str) -> None:
    """A raw 5.0 device subscribes to its config topic and takes the retained snapshot it gets."""
    await client.send(codec.Subscribe(11, ((topic, 1),)))
    await client.read_until(codec.Suback)
    await client.read_until(codec.Publish)


async def test_a_device_reports_its_state_and_henge_keeps_the_latest_with_history(running: Running) -> None:
    events: list[Event] = []
    running.service.add_event_listener(lambda e: events.append(e) if e.type == "reported" else None)
    client, _, _ = await device5(running, "d1", {"v": 1})
    topic = running.service.topics.reported("d1")
    assert await publish5(client, topic, reported({"fw": "2.3.1", "hw": {"rev": "B"}, "disk_free": 100}), 1) == 0
    await wait_until(lambda: len(events) == 1, what="the first reported event")
    # A merge patch (RFC 7396): null removes a member, objects merge.
    assert await publish5(client, topic, reported(patch={"fw": "2.4.0", "disk_free": None, "hw": {"ram": 512}}),
                          2) == 0
    await wait_until(lambda: len(events) == 2, what="the second reported event")
    state = await running.service.reported("d1", history=True)
    assert state["document"] == {"fw": "2.4.0", "hw": {"rev": "B", "ram": 512}}
    assert state["seq"] == 2 and state["at"] and state["changed_at"] and state["epoch"] == 1
    assert [h["seq"] for h in state["history"]] == [2, 1]
    assert state["history"][1]["document"] == {"fw": "2.3.1", "hw": {"rev": "B"}, "disk_free": 100}
    assert events[1].data == {"seq": 2, "changed": ["disk_free", "fw", "hw"]}
    # The same document again: its arrival time moves, nothing else (no history entry, no event).
    first_at = state["at"]
    assert await publish5(client, topic, reported({"fw": "2.4.0", "hw": {"ram": 512, "rev": "B"}}), 3) == 0
    await wait_until(lambda: running.service.counters.get("reported_unchanged") == 1, what="the unchanged one")
    again = await running.service.reported("d1", history=True)
    assert again["seq"] == 2 and len(again["history"]) == 2 and again["at"] >= first_at and len(events) == 2


async def test_a_bad_reported_message_is_refused_with_a_reason_and_changes_nothing(start_service: Any) -> None:
    async with start_service(max_reported_bytes=256) as running:
        client, _, _ = await device5(running, "d1", {"v": 1})
        topic = running.service.topics.reported("d1")
        assert await publish5(client, topic, reported({"fw": "1"}), 1) == 0
        await wait_until(lambda: running.service.counters.get("reported_changed") == 1, what="the first document")
        refusals = {
            b"not json": codec.PAYLOAD_FORMAT_INVALID,
            b'{"document": {"a": NaN}}': codec.PAYLOAD_FORMAT_INVALID,
            b'{"document": {"a": 1, "a": 2}}': codec.PAYLOAD_FORMAT_INVALID,
            b'{"fw": "2"}': codec.PAYLOAD_FORMAT_INVALID,  # no envelope
            b'{"document": {}, "patch": {}}': codec.PAYLOAD_FORMAT_INVALID,
            b'{"patch": [1, 2]}': codec.PAYLOAD_FORMAT_INVALID,
            b'\xff\xfe': codec.PAYLOAD_FORMAT_INVALID,
            reported({"big": "x" * 300}): codec.QUOTA_EXCEEDED,
        }
        for n, (payload, code) in enumerate(refusals.items(), start=2):
            assert await publish5(client, topic, payload, n) == code, payload
        assert running.service.counters["reported_invalid"] == len(refusals)
        # Small patches that together would grow the document past the limit: the one that would is
        # dropped (after the merge, in the store), the document stays as it was.
        assert await publish5(client, topic, reported(patch={"a": "y" * 150}), 20) == 0
        assert await publish5(client, topic, reported(patch={"b": "z" * 150}), 21) == 0
        await wait_until(lambda: running.service.counters["reported_invalid"] == len(refusals) + 1,
                         what="the patch that would overflow")
        state = await running.service.reported("d1")
        assert state["document"] == {"fw": "1", "a": "y" * 150} and state["seq"] == 2


async def test_history_is_bounded_and_goes_with_the_device(start_service: Any) -> None:
    async with start_service(reported_history=3) as running:
        client, _, _ = await device5(running, "d1", {"v": 1})
        topic = running.service.topics.reported("d1")
        for n in range(1, 8):
            assert await publish5(client, topic, reported({"n": n}), n) == 0
        await wait_until(lambda: running.service.counters.get("reported_changed") == 7, what="seven documents")
        state = await running.service.reported("d1", history=True)
        assert [h["document"]["n"] for h in state["history"]] == [7, 6, 5] and state["seq"] == 7
        await running.service.remove_device("d1")
        await running.add("d1")
        assert (await running.service.reported("d1", history=True)) | {"device": "d1"} == {
            "device": "d1", "document": None, "seq": 0, "changed_at": None, "at": None, "epoch": None, "history": []}


async def test_a_device_cannot_report_for_another(running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    await running.add("d2", {"v": 1})
    assert await publish5(client, running.service.topics.reported("d2"), reported({"fw": "evil"}), 1) \
        == codec.NOT_AUTHORIZED_5
    assert (await running.service.reported("d2"))["document"] is None


async def test_a_plain_paho_311_device_reports_and_the_cli_and_http_show_it(running: Running) -> None:
    """paho-mqtt 3.1.1 as a plain device (no henge code on it); the CLI and the HTTP API read it back."""
    secret = await running.add("d1", {"v": 1})
    done = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="d1", protocol=paho.MQTTv311)
    client.username_pw_set("d1", secret)
    client.on_publish = lambda *a: done.set()
    client.connect("127.0.0.1", running.port)
    client.loop_start()
    try:
        client.publish("henge/devices/d1/reported", reported({"fw": "2.4", "site": {"rack": 7}}), qos=1)
        assert await asyncio.to_thread(done.wait, 5)
    finally:
        client.loop_stop()
        client.disconnect()
    await wait_until(lambda: running.service.counters.get("reported_changed") == 1, what="the paho report")
    data = str(running.data_dir)
    out = await asyncio.to_thread(henge_cli, "get", "d1", "--reported", "--json", "--data", data)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["document"] == {"fw": "2.4", "site": {"rack": 7}} and shown["seq"] == 1
    human = await asyncio.to_thread(henge_cli, "get", "d1", "--reported", "--data", data)
    assert human.returncode == 0 and '"fw": "2.4"' in human.stdout and "reported at" in human.stdout
    bad = await asyncio.to_thread(henge_cli, "get", "d1", "--history", "--data", data)
    assert bad.returncode == 2 and "--history goes with --reported" in bad.stderr and "Traceback" not in bad.stderr
    async with web(running) as (server, tokens), http_client(server, tokens["viewer"]) as c:
        answer = await c.get("/api/v1/devices/d1/reported", params={"history": "true"})
        assert answer.status_code == 200 and answer.json()["history"][0]["document"]["fw"] == "2.4"
        assert (await c.get("/api/v1/devices/ghost/reported")).status_code == 404


async def test_events_topic_carries_reported_changes(running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    async with running.admin_client() as admin:
        await admin.subscribe(running.service.topics.events, qos=0)
        await publish5(client, running.service.topics.reported("d1"), reported({"fw": "1"}), 1)
        while True:
            event = payload_json(await next_message(admin))
            if event["type"] == "reported":
                break
        assert event["device"] == "d1" and event["data"] == {"seq": 1, "changed": ["fw"]}


async def test_drift_when_the_reported_config_is_not_the_applied_version(running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    topic, report = running.service.topics.reported("d1"), running.service.topics.report("d1")
    good = config_sha256({"v": 1})
    assert await publish5(client, topic, reported({"config_sha256": good}), 1) == 0
    assert await publish5(client, report, b'{"version": 1, "status": "applied"}', 2) == 0
    await wait_status(running, "d1", lambda r: r["sync"] == "in_sync")
    # Someone edits the file on the device: the next report says so.
    assert await publish5(client, topic, reported(patch={"config_sha256": config_sha256({"v": 99})}), 3) == 0
    row = await wait_status(running, "d1", lambda r: r["sync"] == "drift")
    assert row["applied_version"] == row["desired_version"] == 1
    assert [r["device"] for r in await running.service.status(sync="drift")] == ["d1"]
    assert (await running.service.summary())["sync"]["drift"] == 1
    # Reconcile: the current version is delivered again, the device rewrites its file and says so.
    await subscribe_to_config(client, running.service.topics.config("d1"))
    answer = await running.service.reconcile("d1")
    assert answer == {"device": "d1", "version": 1, "online": True, "sync": "drift"}
    again = await client.read_until(codec.Publish)
    assert json.loads(again.payload)["version"] == 1 and json.loads(again.payload)["sha256"] == good
    assert await publish5(client, topic, reported(patch={"config_sha256": good}), 5) == 0
    await wait_status(running, "d1", lambda r: r["sync"] == "in_sync")


async def test_drift_waits_for_the_reported_state_and_the_report_of_a_new_version(running: Running) -> None:
    """A device that writes v2, says so in its reported state, then reports v2 applied, is never
    seen in drift between the two messages (reported first: pending, then in sync)."""
    client, _, _ = await device5(running, "d1", {"v": 1})
    topic, report = running.service.topics.reported("d1"), running.service.topics.report("d1")
    await publish5(client, topic, reported({"config_sha256": config_sha256({"v": 1})}), 1)
    await publish5(client, report, b'{"version": 1, "status": "applied"}', 2)
    await wait_status(running, "d1", lambda r: r["sync"] == "in_sync")
    await running.service.push("d1", {"v": 2})
    seen: set[str] = set()
    watcher = asyncio.create_task(_watch_sync(running, "d1", seen))
    try:
        await publish5(client, topic, reported(patch={"config_sha256": config_sha256({"v": 2})}), 3)
        await publish5(client, report, b'{"version": 2, "status": "applied"}', 4)
        await wait_status(running, "d1", lambda r: r["sync"] == "in_sync" and r["applied_version"] == 2)
    finally:
        watcher.cancel()
    assert "drift" not in seen


async def _watch_sync(running: Running, device: str, seen: set[str]) -> None:
    while True:
        seen.add((await running.service.status(device))[0]["sync"])
        await asyncio.sleep(0)


async def test_the_agent_reports_its_base_set_shows_a_local_edit_as_drift_and_reconciles(
        running: Running, tmp_path: Path) -> None:
    secret = await running.add("dev1", {"interval": 1})
    (tmp_path / "dev1.secret").write_text(secret)
    target, fw = tmp_path / "dev1.json", tmp_path / "fw"
    fw.write_text("2.3.1")
    facts = tmp_path / "facts.sh"
    facts.write_text(f'printf \'{{"fw": "%s", "hw": {{"rev": "B"}}}}\' "$(cat {fw})"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "henge_mqtt", "agent", "--broker", f"mqtt://127.0.0.1:{running.port}",
        "--device", "dev1", "--secret-file", str(tmp_path / "dev1.secret"), "--write", str(target),
        "--state", str(tmp_path / "dev1.state.json"), "--report-cmd", f"sh {facts}", "--report-interval", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        await wait_status(running, "dev1", lambda r: r["sync"] == "in_sync" and r["reported_at"])
        doc = (await running.service.reported("dev1"))["document"]
        assert doc["config_sha256"] == config_sha256({"interval": 1}) and doc["applied_version"] == 1
        assert doc["agent"]["name"] == "henge-agent" and doc["agent"]["version"]
        assert doc["platform"]["system"] == platform.system() and doc["started_at"] and doc["booted_at"]
        assert doc["fw"] == "2.3.1" and doc["hw"] == {"rev": "B"}
        # Someone edits the file on the device: drift within one report interval.
        target.write_text('{"interval": 1000}\n')
        await wait_status(running, "dev1", lambda r: r["sync"] == "drift", timeout=10)
        out = await asyncio.to_thread(henge_cli, "push", "--reconcile", "dev1", "--data", str(running.data_dir))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "dev1: version 1 delivered again; sync was drift"
        await wait_status(running, "dev1", lambda r: r["sync"] == "in_sync", timeout=10)
        assert json.loads(target.read_text()) == {"interval": 1}
        # What --report-cmd prints is reported when it changes (a firmware upgrade).
        fw.write_text("2.4.0")
        await wait_until(lambda: _reported_fw(running, "2.4.0"), timeout=10, what="the new firmware reported")
        audit = await running.service.audit("dev1")
        assert any(e["action"] == "reconcile" and e["summary"]["sync"] == "drift" for e in audit)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert b"Traceback" not in err and b"agent.reconcile" in err


async def _reported_fw(running: Running, fw: str) -> bool:
    return bool((await running.service.reported("dev1"))["document"]["fw"] == fw)


def test_reconcile_usage_and_an_unknown_device_are_one_line(tmp_path: Path) -> None:
    both = henge_cli("push", "--reconcile", "d1", "cfg.json", "--data", str(tmp_path))
    assert both.returncode == 2 and "--reconcile takes one device id" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1


def test_the_sync_states_are_one_set() -> None:
    assert get_args(SyncState) == SYNC_STATES


async def test_the_same_message_again_moves_only_its_arrival_and_a_new_device_of_the_id_starts_afresh(
        running: Running) -> None:
    client, _, _ = await device5(running, "d1", {"v": 1})
    topic = running.service.topics.reported("d1")
    same = reported({"fw": "1"})
    assert await publish5(client, topic, same, 1) == 0
    await wait_until(lambda: running.service.counters.get("reported_changed") == 1, what="the first document")
    first = (await running.service.reported("d1"))["at"]
    for n in range(2, 5):
        assert await publish5(client, topic, same, n) == 0
    assert running.service.counters["reported_unchanged"] == 3
    moved = (await running.service.reported("d1"))["at"]
    assert moved > first and (await running.service.status("d1"))[0]["reported_at"] == moved
    await running.service.reports.write_arrivals()  # what the timer (or the shutdown) does
    assert running.service.reports.arrival_of("d1") is None
    assert (await running.service.reported("d1", history=True)) | {"history": None} == {
        "device": "d1", "document": {"fw": "1"}, "seq": 1, "changed_at": first, "at": moved, "epoch": 1,
        "history": None}
    await running.service.remove_device("d1")
    secret = await running.add("d1", {"v": 1})
    again, _ = await Client5.connect(running.port, "d1", "d1", secret)
    assert await publish5(again, topic, same, 1) == 0
    await wait_until(lambda: running.service.counters.get("reported_changed") == 2, what="the new device's first")
    assert (await running.service.reported("d1"))["document"] == {"fw": "1"}
