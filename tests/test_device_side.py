"""Reports, ``push --wait`` and the device agent, against the real service and broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from henge_mqtt.backoff import Backoff
from henge_mqtt.device import Agent, exec_applier
from henge_mqtt.models import Snapshot, config_sha256, rfc3339, utc_now

from . import mqtt_raw as raw
from .conftest import ROOT, Running, henge_cli, next_message, wait_status, wait_until

APPLY = str(ROOT / "examples" / "agent" / "apply.sh")


async def cli(*args: str, input: str | None = None) -> Any:
    return await asyncio.to_thread(henge_cli, *args, input=input, timeout=60)



@contextlib.asynccontextmanager
async def agent_process(
    running: Running, device: str, secret: str, tmp: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    secret_file = tmp / f"{device}.secret"
    secret_file.write_text(secret)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "henge_mqtt", "agent", "--broker", f"mqtt://127.0.0.1:{running.port}",
        "--device", device, "--secret-file", str(secret_file), "--exec", f"bash {APPLY}",
        "--state", str(tmp / f"{device}.state.json"),
        env={"APPLY_TARGET": str(tmp / f"{device}.applied.json"), "APPLY_LOG": str(tmp / f"{device}.log"),
             "PATH": "/usr/bin:/bin:/usr/local/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def applied_count(tmp: Path, device: str) -> int:
    log = tmp / f"{device}.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


async def test_push_wait_applied_then_rejected_never_resent(running: Running, tmp_path: Path) -> None:
    secret = await running.add("dev1")
    data = str(running.data_dir)
    async with agent_process(running, "dev1", secret, tmp_path) as proc:
        await wait_status(running, "dev1", lambda r: r["online"])
        ok = await cli("push", "dev1", "-", "--wait", "--timeout", "20", "--data", data, input='{"interval": 5}')
        assert ok.returncode == 0, ok.stderr
        assert "applied by the device" in ok.stdout
        assert json.loads((tmp_path / "dev1.applied.json").read_text()) == {"interval": 5}
        row = (await running.service.status("dev1"))[0]
        assert (row["applied_version"], row["sync"], row["error"]) == (1, "in_sync", None)

        async with running.admin_client() as watcher:
            await watcher.subscribe("henge/devices/dev1/config", qos=1)
            await next_message(watcher)  # the retained v1
            bad = await cli("push", "dev1", "-", "--wait", "--timeout", "20", "--data", data,
                            input='{"interval": "often"}')
            assert bad.returncode == 3
            assert bad.stderr.strip() == "error: dev1 rejected version 2: interval must be a number"
            assert json.loads((await next_message(watcher)).payload)["version"] == 2  # published once
            row = (await running.service.status("dev1"))[0]
            assert (row["applied_version"], row["sync"], row["error"]) == (1, "rejected", "interval must be a number")
            # No retry loop: the rejected version is not sent again, and the agent does not retry it.
            with pytest.raises(TimeoutError):
                await next_message(watcher, 1.5)
            assert applied_count(tmp_path, "dev1") == 1

        # a rollback is a new version the device may apply
        rolled = await cli("rollback", "dev1", "1", "--wait", "--timeout", "20", "--data", data)
        assert rolled.returncode == 0, rolled.stderr
        assert (await running.service.status("dev1"))[0]["sync"] == "in_sync"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0


async def test_push_wait_times_out_for_offline_device(running: Running) -> None:
    await running.add("dev1")
    result = await cli("push", "dev1", "-", "--wait", "--timeout", "1", "--data", str(running.data_dir), input="{}")
    assert result.returncode == 4
    assert "did not report version 1 within 1 s: the device is offline" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_restarted_agent_does_not_reapply(running: Running, tmp_path: Path) -> None:
    secret = await running.add("dev1", {"interval": 1})
    async with agent_process(running, "dev1", secret, tmp_path):
        await wait_status(running, "dev1", lambda r: r["sync"] == "in_sync")
    assert applied_count(tmp_path, "dev1") == 1
    async with agent_process(running, "dev1", secret, tmp_path):
        await wait_status(running, "dev1", lambda r: r["online"])
        # The retained v1 reaches the agent before the live v2 on the same connection, so once v2 is
        # applied, v1 was either skipped or applied again: the count below tells which.
        await running.service.push("dev1", {"interval": 2})
        await wait_status(running, "dev1", lambda r: r["applied_version"] == 2)
    assert applied_count(tmp_path, "dev1") == 2
    assert json.loads((tmp_path / "dev1.state.json").read_text()) == {"applied_version": 2, "rejected_version": 0}


def snapshot(device: str, version: int, config: dict[str, Any], sha: str | None = None) -> bytes:
    return Snapshot(device=device, version=version, sha256=sha or config_sha256(config),
                    issued_at=rfc3339(utc_now()), config=config).to_payload()


async def test_out_of_order_duplicate_and_forged_snapshots_are_ignored(running: Running, tmp_path: Path) -> None:
    secret = await running.add("dev1", {"n": 1})
    await running.service.push("dev1", {"n": 2})
    await running.service.push("dev1", {"n": 3})
    applied: list[dict[str, Any]] = []

    async def record(config: dict[str, Any]) -> None:
        applied.append(config)

    agent = Agent("127.0.0.1", running.port, "dev1", secret, record, tmp_path / "state.json")
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_until(lambda: applied == [{"n": 3}])
        async with running.admin_client() as admin:
            topic = "henge/devices/dev1/config"
            await admin.publish(topic, snapshot("dev1", 2, {"n": 2}), qos=1)  # out of order
            await admin.publish(topic, snapshot("dev1", 3, {"n": 3}), qos=1)  # duplicate
            await admin.publish(topic, snapshot("dev1", 9, {"n": 9}, sha="0" * 64), qos=1)  # bad sha256
            await admin.publish(topic, snapshot("dev2", 9, {"n": 9}), qos=1)  # another device's
            await admin.publish(topic, b"{not json", qos=1)
            # v4 goes out after all of the above on the same path: once it is applied, each of them
            # has been seen and (the list below proves) ignored.
            await running.service.push("dev1", {"n": 4})
            await wait_until(lambda: applied == [{"n": 3}, {"n": 4}])
            await wait_status(running, "dev1", lambda r: r["applied_version"] == 4)  # and reported
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert applied == [{"n": 3}, {"n": 4}]


async def test_malformed_reports_change_nothing(running: Running) -> None:
    secret = await running.add("dev1", {"a": 1})
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect("dev1", "dev1", secret))
    assert await client.connack() == 0
    topic = "henge/devices/dev1/report"
    bad = [b"not json", b"[]", b'{"version": 1}', b'{"version": 1, "status": "maybe"}',
           b'{"version": 0, "status": "applied"}', b'{"version": 7, "status": "applied"}',
           b'{"version": 1, "status": "applied", "pad": "' + b"x" * 20000 + b'"}']
    for payload in bad:
        await client.send(raw.publish(topic, payload))
    await wait_until(lambda: running.service.counters.get("reports_invalid", 0) == len(bad))
    row = (await running.service.status("dev1"))[0]
    assert (row["applied_version"], row["sync"]) == (None, "unknown")
    await client.send(raw.publish(topic, b'{"version": 1, "status": "applied"}'))
    await wait_status(running, "dev1", lambda r: r["sync"] == "in_sync")
    # an older applied report never lowers the applied version
    await running.service.push("dev1", {"a": 2})
    await client.send(raw.publish(topic, b'{"version": 2, "status": "applied"}'))
    await client.send(raw.publish(topic, b'{"version": 1, "status": "applied"}'))
    # A marker report behind it on the same connection: once recorded, the stale one was handled.
    await client.send(raw.publish(topic, b'{"version": 2, "status": "rejected", "error": "marker"}'))
    row = await wait_status(running, "dev1", lambda r: r["rejected_version"] == 2)
    assert row["applied_version"] == 2
    client.close()


async def test_agent_backs_off_harder_when_its_identity_is_taken(
    running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = await running.add("dev1", {"a": 1})

    async def noop(config: dict[str, Any]) -> None:
        return None

    caplog.set_level(logging.INFO, logger="henge_mqtt.device")
    agent = Agent("127.0.0.1", running.port, "dev1", secret, noop, tmp_path / "s.json",
                  backoff=Backoff(base=0.2, cap=5.0, penalty=3, rand=lambda: 1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        # Applied and reported: nothing of the agent's is in flight when its connection is taken.
        await wait_status(running, "dev1", lambda r: r["online"] and r["sync"] == "in_sync")
        twin = await raw.RawClient.open(running.port)  # a second device with the same identity
        await twin.send(raw.connect("dev1", "dev1", secret))
        assert await twin.connack() == 0
        await wait_until(lambda: "agent.closed_early" in caplog.text)
        assert "another client may be using the identity dev1" in caplog.text
        assert agent.backoff.attempt >= 3
        twin.close()
        await wait_status(running, "dev1", lambda r: r["online"], timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def test_backoff_is_bounded_and_jittered() -> None:
    draws = iter([0.5, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    b = Backoff(base=1.0, cap=8.0, penalty=3, rand=lambda: next(draws))
    assert [b.next_delay() for _ in range(3)] == [0.5, 2.0, 0.0]  # full jitter over 1, 2, 4
    assert [b.next_delay() for _ in range(3)] == [8.0, 8.0, 8.0]  # capped
    b.reset()
    assert b.next_delay() == 1.0
    b.reset()
    assert b.failed_hard() == 4.0  # a penalty of 3 attempts at once: ceiling 2**2
    assert b.attempt == 3
    real = Backoff(base=1.0, cap=30.0)
    delays = [real.next_delay() for _ in range(200)]
    assert all(0 <= d <= 30.0 for d in delays) and len(set(delays)) > 150


async def test_exec_applier_rejects_with_stderr(tmp_path: Path) -> None:
    from henge_mqtt.device import ApplyFailed

    apply = exec_applier(["bash", "-c", "cat > /dev/null; echo 'bad value' >&2; exit 2"])
    with pytest.raises(ApplyFailed, match="bad value"):
        await apply({"a": 1})
    missing = exec_applier([str(tmp_path / "nope")])
    with pytest.raises(ApplyFailed, match="cannot run"):
        await missing({})


def test_agent_command_usage_errors(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    ok = ["--secret-file", str(secret), "--write", "f"]
    cases = [
        (["--broker", "mqtt://h:1", "--device", "d", "--secret-file", str(secret)], "exactly one of"),
        (["--broker", "http://h", "--device", "d", *ok], "invalid broker URL"),
        (["--broker", "mqtt://h:1", "--device", "a/b", *ok], "invalid device id"),
        (["--broker", "mqtt://h:1", "--device", "d", "--secret-file", str(tmp_path / "no"), "--write", "f"],
         "cannot read the secret file"),
    ]
    for args, expected in cases:
        result = henge_cli("agent", *args)
        assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mqtt5", [True, False], ids=["5.0", "3.1.1"])
async def test_agent_under_a_twin_that_takes_every_connection_back(
    running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture, mqtt5: bool
) -> None:
    """A twin takes the identity back right after each connect: the agent never hangs on a dead
    connection, never blames its secret, and backs off harder each time (5.0: because the server
    said 0x8E; 3.1.1: because its connections are short-lived)."""
    secret = await running.add("dev1", {"a": 1})

    async def noop(config: dict[str, Any]) -> None:
        return None

    caplog.set_level(logging.INFO, logger="henge_mqtt.device")
    agent = Agent("127.0.0.1", running.port, "dev1", secret, noop, tmp_path / "s.json", mqtt5=mqtt5,
                  backoff=Backoff(base=0.1, cap=1.0, penalty=3, rand=lambda: 1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    twins: list[raw.RawClient] = []
    try:
        seen = 0
        for _ in range(3):  # each time the agent gets the identity, the twin takes it back at once
            await wait_until(lambda n=seen: caplog.text.count("agent.connected") > n, 10, "the agent reconnecting")
            seen = caplog.text.count("agent.connected")
            twin = await raw.RawClient.open(running.port)
            await twin.send(raw.connect("dev1", "dev1", secret))
            assert await twin.connack() == 0
            twins.append(twin)
        await wait_until(lambda: caplog.text.count("agent.closed_early") >= 3, 10, "three early closes")
        assert agent.backoff.attempt >= 3
        assert "bad_credentials" not in caplog.text
        if mqtt5:
            assert "session taken over" in caplog.text
            assert agent.last_disconnect is not None and agent.last_disconnect.reason == 0x8E
            assert "took over" in str(agent.last_disconnect.text)
    finally:
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 1.5  # a stop is prompt, whatever the agent was waiting for


async def test_agent_blames_its_secret_only_for_a_refusal(running: Running, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    await running.add("dev1", {"a": 1})

    async def noop(config: dict[str, Any]) -> None:
        return None

    caplog.set_level(logging.INFO, logger="henge_mqtt.device")
    agent = Agent("127.0.0.1", running.port, "dev1", "wrong-secret", noop, tmp_path / "s.json",
                  backoff=Backoff(base=0.1, cap=0.2, rand=lambda: 1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_until(lambda: "agent.bad_credentials" in caplog.text, 10, "the refusal")
        assert "bad user name or password" in caplog.text  # the server's reason string
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_agent_process_stops_promptly_on_sigterm(running: Running, tmp_path: Path) -> None:
    secret = await running.add("dev1", {"interval": 1})
    async with agent_process(running, "dev1", secret, tmp_path) as proc:
        await wait_status(running, "dev1", lambda r: r["sync"] == "in_sync" and r["online"])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert time.monotonic() - started < 1.5
    row = await wait_status(running, "dev1", lambda r: not r["online"])
    assert row["reason"] == "client_disconnect"


async def test_reports_never_lower_and_long_errors_are_kept(running: Running) -> None:
    secret = await running.add("dev1", {"n": 1})
    await running.service.push("dev1", {"n": 2})
    await running.service.push("dev1", {"n": 3})
    client = await raw.RawClient.open(running.port)
    await client.send(raw.connect("dev1", "dev1", secret))
    assert await client.connack() == 0
    topic = "henge/devices/dev1/report"
    long_error = "e" * 6000
    rejected = {"version": 3, "status": "rejected", "error": long_error}
    await client.send(raw.publish(topic, json.dumps(rejected).encode()))
    await client.send(raw.publish(topic, b'{"version": 2, "status": "rejected", "error": "late and older"}'))
    await client.send(raw.publish(topic, b'{"version": 1, "status": "applied"}'))  # a marker behind them
    row = await wait_status(running, "dev1", lambda r: r["applied_version"] == 1)
    assert (row["sync"], row["rejected_version"]) == ("rejected", 3)  # the late v2 did not lower it
    assert row["error"].startswith("eeee") and len(row["error"]) == 4096
