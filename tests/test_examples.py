"""Every example runs against a real service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, Running


async def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(cmd), capture_output=True, text=True, timeout=30, cwd=ROOT)


async def test_aiomqtt_device_example(running: Running, tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text(running.add("sensor-1", {"interval": 5}))
    result = await run(sys.executable, "examples/aiomqtt_device.py", "--port", str(running.port),
                       "--device", "sensor-1", "--secret-file", str(secret_file), "--once")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"version": 1, "verified": True, "config": {"interval": 5}}


async def test_mosquitto_sub_shell_example(running: Running, tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text(running.add("sensor-2", {"mode": "eco"}))
    running.service.push("sensor-2", {"mode": "boost"})
    result = await run("bash", "examples/mosquitto_sub_device.sh", "127.0.0.1", str(running.port), "sensor-2",
                       str(secret_file))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"version": 2, "config": {"mode": "boost"}}


async def test_embed_example(tmp_path: Path) -> None:
    result = await run(sys.executable, "examples/embed.py", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "pushed version 1; the device received version 1: {'rpm_max': 1800}" in result.stdout
    assert "config_published:pump-7" in result.stdout and "connected:pump-7" in result.stdout
