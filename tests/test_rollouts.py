"""Staged rollouts end to end (docs/rollouts.md#staged-rollouts): real devices (henge's agent over
MQTT) that apply or reject, waves, halts that revert, pause/resume/abort, one rollout per device,
and kill -9 at any moment."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from henge_mqtt.backoff import Backoff
from henge_mqtt.device import Agent, ApplyFailed
from henge_mqtt.errors import RolloutConflict, SchemaViolation
from henge_mqtt.http import HttpServer
from henge_mqtt.rollout_plan import plan
from henge_mqtt.store import Store

from .conftest import ROOT, Running, henge_cli, next_message, wait_status, wait_until
from .ports import free_port as _free_port

pytestmark = pytest.mark.both_stores  # each service test runs on SQLite and on PostgreSQL

Applier = Callable[[dict[str, Any]], Awaitable[None]]


async def accept(config: dict[str, Any]) -> None:
    return None


def rejecting(value: int, why: str = "not on this hardware") -> Applier:
    async def apply(config: dict[str, Any]) -> None:
        if config.get("v") == value:
            raise ApplyFailed(why)

    return apply


class Devices:
    """Agents for some devices of a running service."""

    def __init__(self, running: Running, tmp_path: Path) -> None:
        self.running, self.tmp_path = running, tmp_path
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, secrets: dict[str, str], apply: dict[str, Applier]) -> None:
        for device, applier in apply.items():
            agent = Agent("127.0.0.1", self.running.port, device, secrets[device], applier,
                          self.tmp_path / f"{device}.json", backoff=Backoff(base=0.05, cap=0.5))
            self.tasks.append(asyncio.create_task(agent.run(self.stop)))
        for device in apply:
            await wait_status(self.running, device, lambda r: r["online"] and r["sync"] == "in_sync")

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


@pytest.fixture
async def devices(running: Running, tmp_path: Path) -> AsyncIterator[Devices]:
    fleet = Devices(running, tmp_path)
    try:
        yield fleet
    finally:
        await fleet.close()


async def add(running: Running, n: int, prefix: str = "d") -> dict[str, str]:
    secrets = {}
    for i in range(n):
        device = f"{prefix}{i:02d}"
        secrets[device] = await running.service.add_device(device, {"site": "a"})
        await running.service.push(device, {"v": 0})
    return secrets


async def finished(running: Running, rollout: str, timeout: float = 20) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        found.update(await running.service.rollout_status(rollout))
        return found["state"] not in ("running", "reverting")

    await wait_until(done, timeout, f"rollout {rollout} to finish")
    return found


async def configs(running: Running, device: str) -> list[dict[str, Any]]:
    return [v.config for v in await running.service.history(device)]


async def test_a_rollout_goes_wave_by_wave_and_completes(running: Running, devices: Devices) -> None:
    secrets = await add(running, 10)
    await devices.start(secrets, dict.fromkeys(secrets, accept))
    status = await running.service.start_rollout({"v": 1}, all_devices=True, waves=[10, 50, 100], min_applied=100)
    assert [w["targeted"] for w in status["waves"]] == [1, 4, 5]
    done = await finished(running, status["id"])
    assert done["state"] == "completed"
    assert [(w["published"], w["online"], w["delivered"], w["applied"], w["rejected"]) for w in done["waves"]] == [
        (1, 1, 1, 1, 0), (4, 4, 4, 4, 0), (5, 5, 5, 5, 0)]
    for device in secrets:
        assert await configs(running, device) == [{"v": 0}, {"v": 1}]  # one version each, none twice
    expected = plan(status["id"], list(secrets), waves=[10, 50, 100])
    rows = await running.service.worker.run(running.service.store.rollout_devices, status["id"])
    assert [[r["device"] for r in rows if r["wave"] == i] for i in range(3)] == [sorted(w) for w in expected]
    events = [e["action"] for e in await running.service.audit() if e["action"].startswith("rollout")]
    assert events == ["rollout.start", "rollout.wave", "rollout.wave", "rollout.wave", "rollout.complete"]


async def test_rejections_halt_and_revert_what_the_rollout_changed(running: Running, devices: Devices) -> None:
    secrets = await add(running, 10)
    await devices.start(secrets, {d: rejecting(1, "v1 needs firmware 2") for d in secrets})
    status = await running.service.start_rollout({"v": 1}, all_devices=True, waves=[30, 100], max_rejected="1")
    done = await finished(running, status["id"])
    assert done["state"] == "halted" and "rejected, more than the limit of 1" in done["reason"]
    first, second = done["waves"]
    assert (first["targeted"], first["published"], first["rejected"], first["reverted"]) == (3, 3, 3, 3)
    assert first["errors"] == {"v1 needs firmware 2": 3}
    assert (second["targeted"], second["published"]) == (7, 0)
    rows = await running.service.worker.run(running.service.store.rollout_devices, status["id"])
    for row in rows:
        history = await configs(running, row["device"])
        if row["wave"] == 0:
            assert history == [{"v": 0}, {"v": 1}, {"v": 0}]  # back on the previous config, as a new version
        else:
            assert history == [{"v": 0}]  # never touched
    # The devices got the revert too: their agents applied version 3.
    for row in rows:
        if row["wave"] == 0:
            await wait_status(running, row["device"], lambda r: r["applied_version"] == 3)


async def test_a_finished_wave_keeps_its_numbers(running: Running, devices: Devices) -> None:
    """Issue 19: once the devices apply the revert (and later versions), the halted wave still says what
    the rollout's own version got: 2 rejected with the devices' reason, in the library, CLI and API."""
    secrets = await add(running, 20)
    await devices.start(secrets, {d: rejecting(1, "v1 needs firmware 2") for d in secrets})
    svc = running.service
    status = await svc.start_rollout({"v": 1}, all_devices=True, waves=[10, 50, 100], max_rejected="1")
    done = await finished(running, status["id"])
    assert done["state"] == "halted" and "2 rejected" in done["reason"]
    first = done["waves"][0]
    expected = (2, 0, 2, {"v1 needs firmware 2": 2}, 2)
    assert (first["targeted"], first["applied"], first["rejected"], first["errors"], first["reverted"]) == expected
    reverted = [r["device"] for r in await svc.worker.run(svc.store.rollout_devices, status["id"])
                if r["reverted_version"] is not None]
    for device in reverted:  # the revert (version 3) is applied by the devices: not the wave's outcome
        await wait_status(running, device, lambda r: r["applied_version"] == 3 and r["sync"] == "in_sync")
        await svc.push(device, {"v": 7})  # and a later version too
        await wait_status(running, device, lambda r: r["applied_version"] == 4)

    def numbers(ro: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(w["targeted"], w["applied"], w["rejected"], w["errors"], w["reverted"]) for w in ro["waves"]]

    later = await svc.rollout_status(status["id"])
    assert numbers(later) == numbers(done) and numbers(later)[0] == expected
    cli = json.loads((await asyncio.to_thread(henge_cli, "rollout", "status", status["id"], "--data",
                                              str(running.data_dir), "--json")).stdout)
    assert numbers(cli) == numbers(done)
    async with HttpServer(svc, "127.0.0.1", 0) as web:
        token = (await svc.create_token("t", "viewer"))["token"]
        async with httpx.AsyncClient(base_url=web.url, headers={"Authorization": f"Bearer {token}"}) as http:
            api = (await http.get(f"/api/v1/rollouts/{status['id']}")).json()
    assert numbers(api) == numbers(done)


async def test_a_rejection_keeps_its_reason_after_later_versions(running: Running, devices: Devices) -> None:
    """Issue 19: "why was v2 rejected?" stays answerable once v3 is applied: every version keeps its own
    report (state, error, when, on which connection epoch) in the library, the CLI and the API."""
    secrets = await add(running, 1)
    await devices.start(secrets, {"d00": rejecting(1, "v1 needs firmware 2")})
    svc = running.service
    rejected = await svc.push("d00", {"v": 1})
    await wait_status(running, "d00", lambda r: r["sync"] == "rejected")
    applied = await svc.push("d00", {"v": 2})
    row = await wait_status(running, "d00",
                            lambda r: r["sync"] == "in_sync" and r["applied_version"] == applied.version)
    history = {v.version: v.report for v in await svc.history("d00")}
    bad = history[rejected.version]
    assert bad is not None and (bad.status, bad.error, bad.epoch) == ("rejected", "v1 needs firmware 2", row["epoch"])
    good = history[applied.version]
    assert good is not None and (good.status, good.error) == ("applied", None)
    assert (await svc.get_version("d00", rejected.version)).report == bad
    cli = json.loads((await asyncio.to_thread(henge_cli, "history", "d00", "--data", str(running.data_dir),
                                              "--json")).stdout)
    assert {v["version"]: v["report"]["error"] if v["report"] else None for v in cli} == {
        1: None, rejected.version: "v1 needs firmware 2", applied.version: None}
    people = (await asyncio.to_thread(henge_cli, "history", "d00", "--data", str(running.data_dir))).stdout
    assert "rejected: v1 needs firmware 2" in people
    async with HttpServer(svc, "127.0.0.1", 0) as web:
        token = (await svc.create_token("t", "viewer"))["token"]
        async with httpx.AsyncClient(base_url=web.url, headers={"Authorization": f"Bearer {token}"}) as http:
            versions = (await http.get("/api/v1/devices/d00/versions")).json()
            one = (await http.get(f"/api/v1/devices/d00/config?version={rejected.version}")).json()
    assert versions[rejected.version - 1]["report"]["error"] == "v1 needs firmware 2"
    assert one["report"]["status"] == "rejected" and one["report"]["epoch"] == row["epoch"]


async def test_a_wave_that_does_not_apply_in_time_halts(running: Running, devices: Devices) -> None:
    secrets = await add(running, 4)
    await devices.start(secrets, dict.fromkeys(secrets, accept))
    silent = await running.service.add_device("mute", {"site": "a"})
    async with running.device_client("mute", silent) as mute:  # connected, listening, never reporting
        await mute.subscribe("henge/devices/mute/config", qos=1)
        status = await running.service.start_rollout({"v": 1}, labels={"site": "a"}, wave_size=5, min_applied=100,
                                                     wave_timeout=1.0)
        done = await finished(running, status["id"])
    assert done["state"] == "halted" and "timed out" in done["reason"]
    assert done["waves"][0]["pending"] == 1 and done["waves"][0]["reverted"] == 4
    assert done["kept"] == ["no previous config: kept the rollout's"]  # mute had no config before


async def test_pause_resume_abort_and_one_rollout_per_device(running: Running, devices: Devices) -> None:
    secrets = await add(running, 6)
    await devices.start(secrets, dict.fromkeys(secrets, accept))
    svc = running.service
    status = await svc.start_rollout({"v": 1}, all_devices=True, wave_size=2, pause=30, min_applied=100)
    with pytest.raises(RolloutConflict, match=f"active rollout {status['id']}"):
        await svc.start_rollout({"v": 9}, all_devices=True)

    async def wave_two_waiting() -> bool:
        st = await svc.rollout_status(status["id"])
        return st["waves"][0]["applied"] == 2 and st["wave"] == 2

    await wait_until(wave_two_waiting, 10)
    paused = await svc.pause_rollout(status["id"])
    assert paused["state"] == "paused"
    resumed = await svc.resume_rollout(status["id"])
    assert resumed["state"] == "running"
    aborted = await svc.abort_rollout(status["id"], revert=True)
    assert aborted["state"] == "aborted" and aborted["waves"][0]["reverted"] == 2
    assert aborted["waves"][1]["published"] == 0
    # Finished: the devices are free for the next rollout.
    again = await svc.start_rollout({"v": 2}, all_devices=True, waves=[100], min_applied=100)
    assert (await finished(running, again["id"]))["state"] == "completed"


async def test_an_offline_device_gets_its_version_when_it_connects(running: Running, devices: Devices,
                                                                   tmp_path: Path) -> None:
    secrets = await add(running, 3)
    await devices.start({d: s for d, s in secrets.items() if d != "d02"}, {"d00": accept, "d01": accept})
    status = await running.service.start_rollout({"v": 1}, all_devices=True, waves=[100], min_applied=100)
    done = await finished(running, status["id"])
    assert done["state"] == "completed" and (done["waves"][0]["offline"], done["waves"][0]["pending"]) == (1, 1)
    late = Devices(running, tmp_path)
    await late.start(secrets, {"d02": accept})  # it connects later, gets the retained version, applies it
    await wait_status(running, "d02", lambda r: r["applied_version"] == 2)
    await late.close()
    # The rollout's record is what it was when it ended (issue 19): the late apply is the device's, not the wave's.
    wave = (await running.service.rollout_status(status["id"]))["waves"][0]
    assert (wave["applied"], wave["pending"], wave["offline"]) == (2, 1, 1)


async def test_a_wave_reaches_its_first_devices_before_the_rest_is_stored(running: Running) -> None:
    """A wave is streamed as a fleet push is (issue "At wire speed"): its devices in chunks, each
    published as soon as it commits. The test holds the wave's last transaction until the first
    device has its version; the wave is then complete and audited once, with every device."""
    svc = running.service
    secrets = {f"w{i:03d}": await svc.add_device(f"w{i:03d}") for i in range(150)}
    store = svc.store
    gate = threading.Event()
    real = store.publish_wave

    def held(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("last"):
            assert gate.wait(30)
        return real(*args, **kwargs)

    store.publish_wave = held  # type: ignore[method-assign]
    try:
        async with running.device_client("w000", secrets["w000"]) as client:
            await client.subscribe("henge/devices/w000/config", qos=1)
            status = await svc.start_rollout({"v": 1}, all_devices=True, waves=[100], min_applied=0)
            assert json.loads((await next_message(client, 10)).payload)["config"] == {"v": 1}  # type: ignore[arg-type]
            assert running.retained("henge/devices/w149/config") is None  # not stored yet, so not published
    finally:
        gate.set()
    done = await finished(running, status["id"])
    assert done["state"] == "completed" and done["waves"][0]["targeted"] == 150
    assert json.loads(running.retained("henge/devices/w149/config") or b"{}")["config"] == {"v": 1}
    waves = [e["summary"] for e in await svc.audit() if e["action"] == "rollout.wave"]
    assert waves == [{"rollout": status["id"], "wave": 1, "devices": 150}]


async def test_a_wave_stopped_part_way_is_published_in_full_when_the_rollout_resumes(start_service: Any,
                                                                                      tmp_path: Path) -> None:
    """The process dies between two of a wave's transactions (here: its last one fails as a kill
    there would leave it): the store holds the first chunk's versions, the wave is not marked as
    gone out. The next start resumes the rollout and publishes the rest of the wave, each device
    once, and the wave's audit entry counts all of them."""
    data = tmp_path / "kept"
    devices = [f"w{i:03d}" for i in range(150)]
    async with start_service(data_dir=data) as first:
        svc = first.service
        for device in devices:
            await svc.add_device(device)
        store = svc.store
        real = store.publish_wave
        reached = threading.Event()

        def dies(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("last"):
                reached.set()
                raise RuntimeError("the process died before the wave's last transaction")
            return real(*args, **kwargs)

        store.publish_wave = dies  # type: ignore[method-assign]
        status = await svc.start_rollout({"v": 1}, all_devices=True, waves=[100], min_applied=0)
        await wait_until(reached.is_set, 10, "the wave's last transaction")
        assert await configs(first, devices[0]) == [{"v": 1}]
        assert await configs(first, devices[-1]) == []  # the wave stands in part
    async with start_service(data_dir=data) as second:
        done = await finished(second, status["id"])
        assert done["state"] == "completed" and done["waves"][0]["targeted"] == 150
        for device in (devices[0], devices[99], devices[100], devices[-1]):
            assert await configs(second, device) == [{"v": 1}]
        waves = [e["summary"] for e in await second.service.audit() if e["action"] == "rollout.wave"]
        assert waves == [{"rollout": status["id"], "wave": 1, "devices": 150}]


async def test_a_rollout_that_breaks_a_schema_never_starts(running: Running) -> None:
    await add(running, 2)
    await running.service.set_schema({}, {"properties": {"v": {"type": "integer"}}})
    with pytest.raises(SchemaViolation):
        await running.service.start_rollout({"v": "one"}, all_devices=True)
    assert await running.service.list_rollouts() == []


async def test_rollout_commands_and_http(running: Running, devices: Devices) -> None:
    secrets = await add(running, 4)
    await devices.start(secrets, dict.fromkeys(secrets, accept))
    data = str(running.data_dir)
    started = await asyncio.to_thread(henge_cli, "rollout", "start", "-", "--all", "--waves", "50,100",
                                      "--min-applied", "100%", "--data", data, "--json", input='{"v": 1}')
    assert started.returncode == 0, started.stderr
    rollout = json.loads(started.stdout)["id"]
    watched = await asyncio.to_thread(henge_cli, "rollout", "status", rollout, "--watch", "0.2", "--data", data,
                                      timeout=60)
    assert watched.returncode == 0 and f"rollout {rollout}: completed" in watched.stdout
    listed = await asyncio.to_thread(henge_cli, "rollout", "list", "--data", data)
    assert rollout in listed.stdout and "completed" in listed.stdout
    bad = await asyncio.to_thread(henge_cli, "rollout", "start", "-", "--all", "--waves", "50", "--data", data,
                                  input='{"v": 2}')
    assert bad.returncode == 1 and "the last wave must reach 100" in bad.stderr
    async with HttpServer(running.service, "127.0.0.1", 0) as server:
        token = (await running.service.create_token("ops", "operator"))["token"]
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as c:
            made = await c.post("api/v1/rollouts", json={"all": True, "config": {"v": 3}, "waves": [100],
                                                         "min_applied": 100})
            assert made.status_code == 201
            rid = made.json()["id"]
            await finished(running, rid)
            assert (await c.get(f"api/v1/rollouts/{rid}")).json()["state"] == "completed"
            assert [r["id"] for r in (await c.get("api/v1/rollouts")).json()] == [rollout, rid]
            gone = await c.post("api/v1/rollouts/r-nope/pause")
            assert (gone.status_code, gone.json()["code"]) == (404, "unknown_rollout")


# ---- kill -9 ----------------------------------------------------------------------------------------

_REPORTERS = r"""
import asyncio, json, sys
import aiomqtt
port, mode, secrets = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

async def device(name, secret):
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier=name, username=name, password=secret,
                                      timeout=3) as c:
                await c.subscribe(f"henge/devices/{name}/config", qos=1)
                async for m in c.messages:
                    snap = json.loads(m.payload)
                    bad = mode == "reject" and snap["config"].get("v") == 2
                    report = {"version": snap["version"], "status": "rejected" if bad else "applied"}
                    if bad:
                        report["error"] = "v2 refused"
                    await c.publish(f"henge/devices/{name}/report", json.dumps(report), qos=1)
        except Exception:
            await asyncio.sleep(0.1)

async def main():
    await asyncio.gather(*(device(d, s) for d, s in secrets.items()))

asyncio.run(main())
"""




def _serve(data: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", str(port),
                             "--no-http", "--log-level", "warning"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if json.loads((data / "service.json").read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
        time.sleep(0.05)


def wait_online(data: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while (online := json.loads(henge_cli("status", "--summary", "--json", "--data", str(data)).stdout)["online"]
           ) != count:
        assert time.monotonic() < deadline, f"{online} devices online, not {count}"
        time.sleep(0.1)


def _check(data: Path, rollout: str, devices: list[str], value: int) -> dict[str, Any]:
    """What must hold after any kill: versions contiguous, no device given the rollout's config twice,
    waves published in order and whole (these waves have at most 100 devices, one transaction; a
    larger wave is published in chunks and may stand in part until its rollout resumes)."""
    store = Store(data)
    try:
        ro = store.rollout(rollout)
        rows = store.rollout_devices(rollout)
        for device in devices:
            history = store.history(device)
            assert [r.version for r in history] == list(range(1, len(history) + 1))
            assert sum(r.config == {"v": value} for r in history) <= 1, f"{device} got the rollout twice"
        published_waves = sorted({r["wave"] for r in rows if r["new_version"] is not None})
        assert published_waves == list(range(len(published_waves))), "a wave was skipped"
        for wave in published_waves:
            assert all(r["new_version"] is not None for r in rows if r["wave"] == wave), "a wave went out in part"
        return ro
    finally:
        store.close()


def test_kill_minus_nine_at_any_moment_of_a_rollout(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    devices = [f"k{i:02d}" for i in range(24)]
    secrets = store.add_devices([(d, {}) for d in devices])
    for d in devices:
        store.push(d, {"v": 0}, actor="test")
    store.close()
    port = _free_port()
    rng = random.Random(11)
    proc = _serve(data, port)
    reporters = subprocess.Popen([sys.executable, "-c", _REPORTERS, str(port), "accept", json.dumps(secrets)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = henge_cli("rollout", "start", "-", "--all", "--wave-size", "4", "--min-applied", "100",
                            "--pause", "0.2", "--wave-timeout", "60", "--data", str(data), "--json", input='{"v": 1}')
        assert started.returncode == 0, started.stderr
        rollout = json.loads(started.stdout)["id"]
        for _ in range(6):
            time.sleep(rng.uniform(0.1, 0.7))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if _check(data, rollout, devices, 1)["state"] == "completed":
                proc = _serve(data, port)
                break
            proc = _serve(data, port)
        deadline = time.monotonic() + 60
        while (ro := json.loads(henge_cli("rollout", "status", rollout, "--data", str(data), "--json").stdout)
               )["state"] == "running":
            assert time.monotonic() < deadline, ro
            time.sleep(0.2)
        assert ro["state"] == "completed", ro
        # A wave that went out while the devices were reconnecting to a restarted service passed with
        # none online; they get their versions retained when they connect, and report them. The
        # rollout's record keeps what each wave was when it was decided (issue 19).
        frozen = [(w["applied"], w["pending"]) for w in ro["waves"]]
        assert all(applied + pending == 4 for applied, pending in frozen), ro["waves"]
        while not all(r["sync"] == "in_sync" for r in json.loads(henge_cli(
                "status", "--data", str(data), "--json").stdout)):
            assert time.monotonic() < deadline, "the devices did not all apply the rollout's version"
            time.sleep(0.2)
        ro = json.loads(henge_cli("rollout", "status", rollout, "--data", str(data), "--json").stdout)
        assert [(w["applied"], w["pending"]) for w in ro["waves"]] == frozen

        # A rollout that halts: killed while it reverts (or before), it still reverts each device once.
        reporters.kill()
        reporters.wait()
        # The accepting devices gone, then every rejecting one connected: a wave whose devices are all
        # offline is done at once.
        wait_online(data, 0)
        reporters = subprocess.Popen([sys.executable, "-c", _REPORTERS, str(port), "reject", json.dumps(secrets)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_online(data, len(devices))
        started = henge_cli("rollout", "start", "-", "--all", "--wave-size", "8", "--max-rejected", "2",
                            "--data", str(data), "--json", input='{"v": 2}')
        rollout = json.loads(started.stdout)["id"]
        time.sleep(rng.uniform(0.2, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check(data, rollout, devices, 2)
        proc = _serve(data, port)
        deadline = time.monotonic() + 60
        while (ro := json.loads(henge_cli("rollout", "status", rollout, "--data", str(data), "--json").stdout)
               )["state"] in ("running", "reverting"):
            assert time.monotonic() < deadline, ro
            time.sleep(0.2)
        assert ro["state"] == "halted" and ro["waves"][0]["reverted"] == 8, ro
        assert all(w["published"] == 0 for w in ro["waves"][1:])
    finally:
        reporters.kill()
        reporters.wait()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    store = Store(data)
    try:
        for row in store.rollout_devices(rollout):
            history = store.history(row["device"])
            if row["wave"] == 0:
                assert [r.config for r in history][-2:] == [{"v": 2}, {"v": 1}]  # reverted exactly once
            else:
                assert history[-1].config == {"v": 1}
    finally:
        store.close()


async def test_a_layer_change_rolls_out_in_waves_and_comes_into_force_at_the_end(
        running: Running, devices: Devices) -> None:
    secrets = await add(running, 8)
    await devices.start(secrets, dict.fromkeys(secrets, accept))
    svc = running.service
    await svc.set_layer("fleet", {"ntp": "a"})
    status = await svc.start_rollout({}, layer={"name": "fleet", "content": {"ntp": "b"}, "labels": None,
                                                "priority": None}, wave_size=3, min_applied=100)
    assert status["target"] == {"layer": "fleet"} and status["devices"] == 8
    with pytest.raises(RolloutConflict, match=f"being rolled out by {status['id']}"):
        await svc.set_layer("fleet", {"ntp": "c"})
    done = await finished(running, status["id"])
    assert done["state"] == "completed"
    layer = await svc.get_layer("fleet")
    assert (layer["version"], layer["content"]) == (2, {"ntp": "b"})
    for device in secrets:
        row = await svc.get_version(device)
        assert row.config == {"ntp": "b", "v": 0}
        assert row.layers == [f"fleet@2 (rollout {status['id']})", "device"]
        assert [leaf["layer"] for leaf in await svc.explain(device) if leaf["pointer"] == "/ntp"] == [row.layers[0]]
    # After it, new devices simply get the layer in force.
    await svc.add_device("late")
    assert (await svc.get_version("late")).config == {"ntp": "b"}


async def test_a_halted_layer_rollout_never_puts_the_layer_in_force(running: Running, devices: Devices) -> None:
    secrets = await add(running, 6)

    async def no_b(config: dict[str, Any]) -> None:
        if config.get("ntp") == "b":
            raise ApplyFailed("ntp b unreachable")

    await devices.start(secrets, dict.fromkeys(secrets, no_b))
    svc = running.service
    await svc.set_layer("fleet", {"ntp": "a"})
    status = await svc.start_rollout({}, layer={"name": "fleet", "content": {"ntp": "b"}, "labels": None,
                                                "priority": None}, wave_size=2, max_rejected="0")
    done = await finished(running, status["id"])
    assert done["state"] == "halted" and done["waves"][0]["reverted"] == 2
    assert (await svc.get_layer("fleet"))["content"] == {"ntp": "a"}  # never came into force
    for device in secrets:
        assert (await svc.get_version(device)).config == {"ntp": "a", "v": 0}


async def test_a_rollout_is_previewed_before_it_starts(running: Running, tmp_path: Path) -> None:
    """`henge rollout start ... --dry-run` (op rollout.preview, POST /rollouts/preview): its devices,
    how many in each wave (as the start would cut them), the configs it changes with one diff, and
    the schemas checked, as the start would; nothing started, nothing stored."""
    svc = running.service
    for i in range(20):
        await svc.add_device(f"w{i:02d}", {"site": "a"})
    await svc.push("w00", {"port": 1})  # already what the rollout gives: unchanged
    cfg = tmp_path / "port.json"
    cfg.write_text('{"port": 1}')
    data = str(running.data_dir)
    result = await asyncio.to_thread(henge_cli, "rollout", "start", str(cfg), "--label", "site=a", "--waves",
                                     "5,50,100", "--dry-run", "--data", data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("would roll out to 20 devices in 3 waves (1, 9, 10), changing the config "
                                             "of 19 (1 unchanged); nothing was started")
    assert "+++ w01 v1" in result.stdout and '+  "port": 1' in result.stdout
    assert [len(w) for w in plan("any", [f"w{i:02d}" for i in range(20)], waves=[5, 50, 100])] == [1, 9, 10]
    sized = await asyncio.to_thread(henge_cli, "rollout", "start", str(cfg), "--all", "--wave-size", "8",
                                    "--dry-run", "--json", "--data", data)
    assert json.loads(sized.stdout)["waves"] == [8, 8, 4]
    await svc.set_schema({"site": "a"}, {"type": "object", "properties": {"port": {"type": "integer", "maximum": 100}}})
    async with HttpServer(svc, "127.0.0.1", 0) as server:
        viewer = (await svc.create_token("look", "viewer"))["token"]
        async with httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=10,
                                     headers={"Authorization": f"Bearer {viewer}"}) as http:
            bad = await http.post("/api/v1/rollouts/preview", json={"labels": {"site": "a"}, "config": {"port": 999}})
            assert bad.status_code == 422 and bad.json()["code"] == "schema_violation"  # as the start would say
            good = await http.post("/api/v1/rollouts/preview", json={"all": True, "config": {"port": 2},
                                                                     "waves": [50, 100]})
            assert good.status_code == 200 and good.json()["waves"] == [10, 10] and good.json()["change"] == 20
    assert await svc.list_rollouts() == [] and [r.version for r in svc.store.history("w01")] == []
