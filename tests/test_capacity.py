"""At the open-file limit: new connections are refused at once, never a busy loop; the admin
socket keeps the CLI working; devices already connected keep their pushes (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from henge_mqtt.store import Store

from . import mqtt_raw as raw
from .conftest import ROOT, Running, henge_cli

FD_LIMIT = 200


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


async def test_file_limit_is_a_bound_not_a_cliff(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    secret = store.add_devices([("dev1", {})])["dev1"]
    store.close()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0"],
                            cwd=ROOT, stdout=log, stderr=log, preexec_fn=_limit_files)
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while not (data / "service.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            await asyncio.sleep(0.05)
        info = json.loads((data / "service.json").read_text())
        port = int(info["port"])
        admin_socket = Path(info["admin_socket"])
        assert stat.S_IMODE(admin_socket.stat().st_mode) == 0o600

        device = await raw.RawClient.open(port)
        await device.send(raw.connect("dev1", "dev1", secret))
        assert await device.connack() == 0
        await device.send(raw.subscribe(1, "henge/devices/dev1/config"))
        assert (await device.read_packet())[0] == 9

        for _ in range(400):  # twice the process's file limit
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            sockets.append(s)
        await asyncio.sleep(0.5)  # the burst is accepted (or refused) by now; from here on, measure idleness
        before = _cpu_seconds(proc.pid)
        await asyncio.sleep(1.0)  # what is measured: the CPU the server uses over this time
        assert _cpu_seconds(proc.pid) - before < 0.3, "the server spins after the burst"

        # The CLI reaches the service over its admin socket although the device listener is full.
        pushed = await asyncio.to_thread(henge_cli, "push", "dev1", "-", "--data", str(data), input='{"v": 1}')
        assert pushed.returncode == 0, pushed.stderr
        kind, body = await device.read_packet()  # and the device connected before still gets it
        assert kind == 3 and b'"version":1' in body
        status = await asyncio.to_thread(henge_cli, "status", "--data", str(data), "--json")
        assert status.returncode == 0 and json.loads(status.stdout)[0]["online"] is True
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert len(text) < 8_000, text[-2000:]
    assert "broker.max_connections" in text and "Traceback" not in text
    assert "serve.file_limit soft=200" in text


async def test_admin_socket_serves_admins_only(running: Running) -> None:
    secret = await running.add("dev1", {"v": 1})
    path = running.service.broker.admin_socket
    assert path is not None and stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    admin = running.service.settings.admin_name
    got = await asyncio.to_thread(subprocess.run, [
        "mosquitto_sub", "--unix", path, "-i", "ops-1", "-u", admin, "-P", running.service.admin_secret,
        "-t", "henge/devices/dev1/config", "-C", "1", "-W", "5"], capture_output=True, text=True, timeout=15)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["config"] == {"v": 1}
    denied = await asyncio.to_thread(subprocess.run, [
        "mosquitto_sub", "--unix", path, "-i", "dev1", "-u", "dev1", "-P", secret,
        "-t", "henge/devices/dev1/config", "-C", "1", "-W", "5"], capture_output=True, text=True, timeout=15)
    assert denied.returncode != 0 and "not authorised" in denied.stderr.lower()
    assert not (await running.service.status("dev1"))[0]["online"]  # a device never gets in this way


async def test_a_second_service_on_the_same_data_dir_is_refused(running: Running, tmp_path: Path) -> None:
    result = await asyncio.to_thread(henge_cli, "serve", "--data", str(running.data_dir), "--port", "0",
                                     timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "another henge service is running on this data dir" in last
    assert f"pid {os.getpid()}" in last and f"mqtt://127.0.0.1:{running.port}" in last  # who holds it
    # The first one is untouched: its admin socket still serves the CLI.
    status = await asyncio.to_thread(henge_cli, "status", "--data", str(running.data_dir), "--json")
    assert status.returncode == 0, status.stderr
