"""Every example runs against a real service (the MicroPython sketch: syntax only)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, Running, henge_cli, wait_status, wait_until


async def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(cmd), capture_output=True, text=True, timeout=60, cwd=ROOT,
                                   env={**os.environ, **(env or {})})


async def test_aiomqtt_device_example_applies_and_reports(running: Running, tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text(await running.add("sensor-1", {"interval": 5}))
    result = await run(sys.executable, "examples/aiomqtt_device.py", "--port", str(running.port),
                       "--device", "sensor-1", "--secret-file", str(secret_file), "--once")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"version": 1, "config": {"interval": 5}}
    await wait_status(running, "sensor-1", lambda r: r["sync"] == "in_sync")


async def test_mosquitto_sub_shell_device_applies_and_reports(running: Running, tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text(await running.add("sensor-2", {"mode": "eco"}))
    out = tmp_path / "config.json"
    proc = await asyncio.create_subprocess_exec(
        "bash", "examples/mosquitto_sub_device.sh", "127.0.0.1", str(running.port), "sensor-2", str(secret_file),
        env={**os.environ, "MAX_VERSIONS": "2", "CONFIG_OUT": str(out)}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await wait_status(running, "sensor-2", lambda r: r["applied_version"] == 1, timeout=15)
    # The script's connections: read v1, report it, read v1 again, then (the 4th) wait for a live
    # update. Push once that one has subscribed, or the update falls between two connections.
    def waiting_for_live_update() -> bool:
        conn = running.broker.conns.get("sensor-2")
        return conn is not None and conn.epoch >= 4 and bool(conn.subs)

    await wait_until(waiting_for_live_update, 15, "the script's live-update subscription")
    await running.service.push("sensor-2", {"mode": "boost"})
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, stderr.decode()
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert lines == [{"version": 1, "config": {"mode": "eco"}}, {"version": 2, "config": {"mode": "boost"}}]
    assert json.loads(out.read_text()) == {"mode": "boost"}
    # The report is acknowledged when received and recorded right after: wait for the record.
    status = await wait_status(running, "sensor-2", lambda r: r["applied_version"] == 2)
    assert (status["applied_version"], status["sync"], status["conflict"]) == (2, "in_sync", False)


async def test_embed_example(tmp_path: Path) -> None:
    result = await run(sys.executable, "examples/embed.py", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    again = await run(sys.executable, "examples/embed.py", str(tmp_path / "data"))  # the same data dir
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "pushed version 1; the device received version 1: {'rpm_max': 1800}" in result.stdout
    assert "config_published:pump-7" in result.stdout and "connected:pump-7" in result.stdout


def test_micropython_sketch_is_valid_python_syntax() -> None:
    source = (ROOT / "examples" / "micropython" / "main.py").read_text()
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "MQTTClient" in imported
    assert "henge/devices/%s/report" in source


def test_systemd_unit_uses_real_agent_flags() -> None:
    unit = (ROOT / "examples" / "agent" / "henge-agent.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n\n")[0].split("StateDirectory")[0]
    flags = set(re.findall(r"--[a-z-]+", exec_start))
    help_text = henge_cli("agent", "--help", env={"COLUMNS": "200"}).stdout
    assert flags and all(flag in help_text for flag in flags), flags
