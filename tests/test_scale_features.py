"""Bulk operations, metrics and the benchmark harness (a tiny-N smoke run: timings never asserted)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from henge_mqtt.metrics import MetricsServer

from . import mqtt_raw as raw
from .conftest import ROOT, Running, henge_cli, next_message, payload_json, wait_until


async def cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(henge_cli, *args, input=input, timeout=60)


async def test_an_import_longer_than_the_timeout_keeps_every_secret(running: Running, tmp_path: Path) -> None:
    """An import's new secrets exist only in its answer: 50,000 devices (about 2 ms each to hash
    here) outlasted the CLI's 60 s wait, the store had them all and the secrets were lost. The
    service now ticks while it makes the secrets, each tick gives the CLI its --timeout again, so an
    import far longer than --timeout (here 1 s) ends with every secret written."""
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text("id\n" + "".join(f"big{i:05}\n" for i in range(3000)))
    secrets_file = tmp_path / "secrets.csv"
    started = time.monotonic()
    result = await cli("device", "import", str(csv_file), "--secrets-out", str(secrets_file), "--timeout", "1",
                       "--data", str(running.data_dir))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took > 2, f"the import took {took:.1f} s: no longer than its --timeout, so it proves nothing here"
    rows = secrets_file.read_text().splitlines()
    assert len(rows) == 3001
    device, secret = rows[-1].split(",")
    async with running.device_client(device, secret) as client:
        await client.subscribe(f"henge/devices/{device}/config", qos=1)


async def test_import_export_push_all_and_label(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text("id,site,tier\n" + "".join(f"d{i:03},s{i % 2},{'gold' if i < 3 else ''}\n" for i in range(10)))
    secrets_file = tmp_path / "secrets.csv"
    result = await cli("device", "import", str(csv_file), "--secrets-out", str(secrets_file), "--data", data)
    assert result.returncode == 0, result.stderr
    assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
    rows = secrets_file.read_text().splitlines()
    assert rows[0] == "id,secret" and len(rows) == 11
    secret = dict(r.split(",") for r in rows[1:])["d001"]
    assert running.service.store.get_device("d001").labels == {"site": "s1", "tier": "gold"}
    assert running.service.store.get_device("d005").labels == {"site": "s1"}

    again = await cli("device", "import", str(csv_file), "--secrets-out", str(tmp_path / "s2.csv"), "--data", data)
    assert again.returncode == 1 and "already exists; nothing was imported" in again.stderr
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"id": "j1", "labels": {"site": "s9"}}\n{"id": "bad/id"}\n')
    bad = await cli("device", "import", str(jsonl), "--secrets-out", str(tmp_path / "s3.csv"), "--data", data)
    assert bad.returncode == 1 and "invalid device id" in bad.stderr
    assert not running.service.store.has_device("j1") and not (tmp_path / "s3.csv").exists()

    exported = await cli("device", "export", "--data", data)
    assert exported.stdout.splitlines()[0] == "id,site,tier"
    assert "d000,s0,gold" in exported.stdout.splitlines()

    async with running.device_client("d001", secret) as device:
        await device.subscribe("henge/devices/d001/config", qos=1)
        cfg = tmp_path / "cfg.json"
        cfg.write_text('{"fleet": 1}')
        pushed = await cli("push", "--all", str(cfg), "--data", data, "--json")
        assert pushed.returncode == 0, pushed.stderr
        summary = json.loads(pushed.stdout)
        assert (summary["devices"], summary["online"], summary["acknowledged"]) == (10, 1, 1)
        assert payload_json(await next_message(device))["config"] == {"fleet": 1}
        cfg.write_text('{"fleet": 2}')
        by_label = await cli("push", "--label", "tier=gold", str(cfg), "--data", data, "--json")
        assert json.loads(by_label.stdout)["devices"] == 3
        assert payload_json(await next_message(device))["version"] == 2
    assert running.service.store.get_version("d005").version == 1
    assert running.service.store.get_version("d002").version == 2

    status = await cli("status", "--label", "site=s1", "--summary", "--data", data, "--json")
    counts = json.loads(status.stdout)
    assert counts["devices"] == 5 and counts["offline"] == 5
    assert counts["sync"]["pending"] + counts["sync"]["unknown"] == 5  # the same summary as GET /api/v1/summary
    table = await cli("status", "--data", data)
    assert table.stdout.strip().splitlines()[-1].startswith("devices=10 online=0 offline=10")
    whole = await cli("status", "--summary", "--data", data, "--json")  # the service's summary op: no rows sent
    assert json.loads(whole.stdout) == await running.service.summary()
    line = await cli("status", "--summary", "--data", data)
    assert line.stdout.strip() == table.stdout.strip().splitlines()[-1]
    usage = await cli("push", "--all", "d001", str(cfg), "--data", data)
    assert usage.returncode == 2 and "only the FILE" in usage.stderr


async def test_metrics_endpoint(running: Running) -> None:
    metrics = MetricsServer(running.service, "127.0.0.1", 0)
    try:
        secret = await running.add("m1", {"a": 1})
        async with running.device_client("m1", secret) as device:
            await device.subscribe("henge/devices/m1/config", qos=1)
            await next_message(device)
            await running.service.push("m1", {"a": 2})
            await next_message(device)
            await device.publish("henge/devices/m1/report", b'{"version": 2, "status": "applied"}', qos=1)
            await device.publish("henge/devices/m1/report", b"garbage", qos=1)
            await device.publish("henge/devices/m1/reported", b'{"document": {"fw": "1"}}', qos=1)
            await device.publish("henge/devices/m1/reported", b'{"document": {"fw": "1"}}', qos=1)
            await device.publish("henge/devices/m1/reported", b'{"fw": "1"}', qos=1)
            await wait_until(lambda: running.service.counters.get("reports_invalid") == 1
                             and running.service.counters.get("reports_applied") == 1
                             and running.service.counters.get("reported_unchanged") == 1)
            url = f"http://127.0.0.1:{metrics.port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        metrics.close()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["henge_connected_devices"] == 1
    assert values["henge_connects_total"] == 1
    assert values["henge_pushes_total"] == 2
    assert values['henge_reports_total{status="applied"}'] == 1
    assert values['henge_reports_total{status="invalid"}'] == 1
    assert [values[f'henge_reported_total{{outcome="{o}"}}'] for o in ("changed", "unchanged", "invalid")] == [1, 1, 1]
    assert values['henge_devices_sync{sync="in_sync"}'] == 1 and values['henge_devices_sync{sync="drift"}'] == 0
    assert values["henge_publish_latency_seconds_count"] == 1  # the live push; the first was retained


def test_bench_harness_smoke(tmp_path: Path) -> None:
    """The harness at a tiny N, so it does not rot: henge and Mosquitto (stock amqtt's storm waits out a
    phase timeout, so it is left to real runs). Correctness is asserted, never a timing."""
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--sizes", "20", "--storm", "10", "--targets",
         "henge,mosquitto-auth", "--filter", "exact,wildcard", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 20 | exact | connect + subscribe all (s) |" in result.stdout
    assert "| 20 | wildcard | fleet push, all acked (s) |" in result.stdout
    data = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    runs = {(r["target"], r["filter"]): r for r in data["results"]}
    assert set(runs) == {(t, f) for t in ("henge", "mosquitto-auth") for f in ("exact", "wildcard")}
    for r in runs.values():
        assert "error" not in r, r
        assert (r["connect_failed"], r["push_missing"], r["wrong_deliveries"]) == (0, 0, 0), r
        assert (r["storm_failed"], r["storm_without_config"], r["storm_old_still_open"]) == (0, 0, 0), r
        assert r["ping_max_ms"] is not None and r["push_first_s"] is not None
    assert runs[("henge", "exact")]["shutdown_s"] is not None
    assert runs[("henge", "exact")]["rss_console_mb"] > runs[("henge", "exact")]["rss_mb"]  # the HTTP stack, loaded


async def test_big_import_and_fleet_push_do_not_stall_connected_devices(start_service) -> None:  # type: ignore[no-untyped-def]
    """The store runs on its own thread: a connected device's PINGRESP stays prompt meanwhile."""
    # The probe pings every 10 ms, far more often than a device would: its rate is raised.
    async with start_service(device_publish_rate=1000, device_publish_burst=1000) as running:
        await _stall_probe(running)


async def _stall_probe(running: Running) -> None:
    # As `henge serve` does after start-up: what exists now (here: every earlier test's leftovers)
    # is frozen, so a full collection does not rescan it in the middle of the measurement.
    gc.collect()
    gc.freeze()
    try:
        await _probe(running)
    finally:
        gc.unfreeze()


async def _probe(running: Running) -> None:
    secret = await running.add("probe")
    probe = await raw.RawClient.open(running.port)
    await probe.send(raw.connect("probe", "probe", secret))
    assert await probe.connack() == 0
    rtts: list[float] = []
    done = asyncio.Event()

    async def ping() -> None:
        while not done.is_set():
            started = time.monotonic()
            await probe.send(raw.PINGREQ)
            assert (await probe.read_packet(5))[0] == 13
            rtts.append(time.monotonic() - started)
            await asyncio.sleep(0.01)

    pinger = asyncio.create_task(ping())
    started = time.monotonic()
    secrets_by_id = await running.service.import_devices([(f"bulk{i:05}", {}) for i in range(10_000)])
    devices = await running.service.select(all_devices=True)
    await running.service.push_many(devices, {"fleet": 1})
    busy = time.monotonic() - started
    done.set()
    await pinger
    assert len(secrets_by_id) == 10_000
    assert len(rtts) > 10 and max(rtts) < 0.1, (busy, max(rtts))
    assert busy > 3 * max(rtts)  # the work took far longer than the worst stall it caused


async def test_labels_can_change_and_import_can_update(running: Running, tmp_path: Path) -> None:
    data = str(running.data_dir)
    await running.service.add_device("l1", {"site": "berlin", "tier": "gold"})
    events: list[str] = []
    running.service.add_event_listener(lambda e: events.append(e.type))
    changed = await asyncio.to_thread(henge_cli, "device", "label", "l1", "site=paris", "tier-", "rack=7",
                                      "--data", data, "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["labels"] == {"site": "paris", "rack": "7"}
    assert (await running.service.get_device("l1")).labels == {"site": "paris", "rack": "7"}
    assert "labels_changed" in events
    audit = await running.service.audit("l1")
    assert audit[-1]["action"] == "device.label" and audit[-1]["summary"]["removed"] == ["tier"]
    bad = await asyncio.to_thread(henge_cli, "device", "label", "l1", "oops", "--data", data)
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid label change")
    unknown = await asyncio.to_thread(henge_cli, "device", "label", "ghost", "a=b", "--data", data)
    assert unknown.returncode == 1 and "unknown device 'ghost'" in unknown.stderr

    csv = tmp_path / "fleet.csv"
    csv.write_text("id,site\nl1,rome\nl2,oslo\n")
    refused = await asyncio.to_thread(henge_cli, "device", "import", str(csv), "--data", data,
                                      "--secrets-out", str(tmp_path / "s1.csv"))
    assert refused.returncode == 1 and "--update" in refused.stderr
    assert not running.service.store.has_device("l2")  # all or nothing
    upserted = await asyncio.to_thread(henge_cli, "device", "import", str(csv), "--update", "--data", data,
                                       "--secrets-out", str(tmp_path / "s2.csv"), "--json")
    assert upserted.returncode == 0, upserted.stderr
    assert json.loads(upserted.stdout)["imported"] == 1 and json.loads(upserted.stdout)["updated"] == 1
    assert (await running.service.get_device("l1")).labels == {"site": "rome"}
    assert (tmp_path / "s2.csv").read_text().count("\n") == 2  # header + the one new device's secret


async def test_backup_during_pushes_restores_and_converges(start_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "live"
    async with start_service(data_dir=source) as running:
        secret = await running.add("b1", {"n": 0})
        await running.add("b2", {"n": 0})
        stop = asyncio.Event()

        async def stream() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await running.service.push_many(["b1", "b2"], {"n": n})
                await asyncio.sleep(0)

        pusher = asyncio.create_task(stream())
        online = await asyncio.to_thread(henge_cli, "backup", str(tmp_path / "online.db"), "--data", str(source))
        stop.set()
        await pusher
        assert online.returncode == 0, online.stderr
        assert oct((tmp_path / "online.db").stat().st_mode & 0o777) == "0o600"
        busy = await asyncio.to_thread(henge_cli, "restore", str(tmp_path / "online.db"), "--data", str(source))
        assert busy.returncode == 1 and "stop it before restoring" in busy.stderr
    offline = await asyncio.to_thread(henge_cli, "backup", str(tmp_path / "offline.db"), "--data", str(source))
    assert offline.returncode == 0, offline.stderr

    target = tmp_path / "restored"
    restored = await asyncio.to_thread(henge_cli, "restore", str(tmp_path / "online.db"), "--data", str(target))
    assert restored.returncode == 0 and "restored 2 devices" in restored.stdout, restored.stderr
    again = await asyncio.to_thread(henge_cli, "restore", str(tmp_path / "offline.db"), "--data", str(target))
    assert again.returncode == 1 and "--force" in again.stderr
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    bad = await asyncio.to_thread(henge_cli, "restore", str(junk), "--data", str(tmp_path / "x"), "--force")
    assert bad.returncode == 1 and "not a henge backup" in bad.stderr

    async with start_service(data_dir=target) as back:
        histories = {d: [r.version for r in await back.service.history(d)] for d in ("b1", "b2")}
        for versions in histories.values():  # whole transactions only: contiguous histories, pushes in step
            assert versions == list(range(1, len(versions) + 1))
        assert len(histories["b1"]) == len(histories["b2"]) >= 1
        latest = await back.service.get_version("b1")
        async with back.device_client("b1", secret) as device:  # the device converges on the restored state
            await device.subscribe("henge/devices/b1/config", qos=1)
            assert payload_json(await next_message(device))["version"] == latest.version


async def test_a_fleet_push_stopped_between_chunks_publishes_every_version_it_stored(running: Running) -> None:
    """The store writes a fleet push's next chunk while the loop publishes the last one: a push
    cancelled between them (its caller gone, the service stopping) still publishes the chunk
    whose transaction committed, so no device misses a version the store keeps."""
    from henge_mqtt.service.configs import FIRST_CHUNK

    devices = [f"cut{i:04}" for i in range(FIRST_CHUNK * 6)]
    await running.service.import_devices([(d, {}) for d in devices])
    push: asyncio.Task[object] | None = None

    def progress(state: dict[str, object]) -> None:
        if state["stored"] == FIRST_CHUNK and push is not None:
            push.cancel()  # the second chunk is being stored now

    push = asyncio.create_task(running.service.push_many(devices, {"cut": 1}, progress=progress))
    try:
        await push
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the push was not cancelled between chunks")
    broker = running.service.broker

    def retained() -> dict[str, int]:
        return {topic.split("/")[2]: json.loads(data)["version"]
                for topic, data, _, _ in broker.retained.matching("henge/devices/+/config")}  # type: ignore[attr-defined]

    stored = {d for d in devices if await running.service.history(d)}
    assert FIRST_CHUNK < len(stored) < len(devices)  # the second chunk committed, the rest never began
    await wait_until(lambda: set(retained()) >= stored, 10, "every stored version published")
    assert all(retained()[d] == 1 for d in stored) and not set(retained()) - stored
