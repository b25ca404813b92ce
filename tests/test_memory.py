"""Memory per connected device, measured with tracemalloc: a bound on bytes, not a timing.

The service runs in this process (traced); 1,000 devices connect and subscribe from another
process, so only the server's side of each connection is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from henge_mqtt.service import HengeService

from .conftest import make_settings, wait_until

DEVICES = 1000
BYTES_PER_DEVICE = 4096  # issue "Lean and bounded": <= 4 KB per connected device

_CLIENTS = r"""
import asyncio, json, struct, sys
def s(v): b = v.encode(); return struct.pack("!H", len(b)) + b
def pkt(first, body):
    n, out = len(body), bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n: break
    return bytes([first]) + bytes(out) + body
FLAGS = int(sys.argv[2]) if len(sys.argv) > 2 else 0xC2  # user name, password, CleanSession (0xC0: kept)
async def one(port, device, secret, held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(pkt(0x10, s("MQTT") + bytes([4, FLAGS]) + struct.pack("!H", 300) + s(device) + s(device) + s(secret)))
    await r.readexactly(4)
    topic = f"henge/devices/{device}/config"
    w.write(pkt(0x82, struct.pack("!H", 1) + s(topic) + b"\x01"))
    await r.readexactly(5)
    held.append(w)
async def main():
    port, devices = int(sys.argv[1]), json.loads(sys.stdin.readline())
    held = []
    sem = asyncio.Semaphore(200)
    async def bounded(d, sec):
        async with sem:
            await one(port, d, sec, held)
    await asyncio.gather(*(bounded(d, sec) for d, sec in devices.items()))
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def connected_fleet(service: HengeService, prefix: str, flags: int) -> AsyncIterator[Any]:
    """DEVICES devices connected and subscribed from another process (CONNECT ``flags``: 0xC2 a clean
    session, 0xC0 a persistent one), with tracemalloc started before the first one: yields the
    snapshot taken before them and the client process (a line on its stdin disconnects them all)."""
    secrets = await service.import_devices([(f"{prefix}{i:04}", {}) for i in range(DEVICES)])
    clients = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENTS, str(service.address[1]), str(flags), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE)
    assert clients.stdin is not None and clients.stdout is not None
    try:
        # Warm up the paths a connection takes (first-use caches are not per-connection cost).
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        clients.stdin.write((json.dumps(secrets) + "\n").encode())
        await clients.stdin.drain()
        assert (await asyncio.wait_for(clients.stdout.readline(), 60)).strip() == b"connected"
        await wait_until(lambda: len(service.broker.online_devices()) == DEVICES, 30, "all connected")
        await asyncio.sleep(0)  # the connection tasks have finished
        yield before, clients
    finally:
        tracemalloc.stop()
        if clients.returncode is None:
            clients.stdin.write(b"\n")
            await clients.stdin.drain()
            await asyncio.wait_for(clients.wait(), 30)


def assert_per_device(what: str, after: tracemalloc.Snapshot, before: tracemalloc.Snapshot) -> None:
    stats = after.compare_to(before, "lineno")
    per_device = sum(stat.size_diff for stat in stats) / DEVICES
    top = "\n".join(str(stat) for stat in stats[:8])
    print(f"{what}: {per_device:.0f} bytes per device")
    assert per_device <= BYTES_PER_DEVICE, f"{what}: {per_device:.0f} bytes per device:\n{top}"


async def test_memory_per_connected_device_is_bounded(tmp_path: Path) -> None:
    async with HengeService(make_settings(tmp_path / "data")) as service, \
            connected_fleet(service, "m", 0xC2) as (before, _):
        gc.collect()
        after = tracemalloc.take_snapshot()
        # Every presence record keeps the same 5.0 properties (content type): one object for them all.
        broker: Any = service.broker
        kept = [extra for _, _, _, extra in broker.retained.matching("henge/devices/+/presence")]
        assert len(kept) == DEVICES and len({id(extra) for extra in kept}) == 1
    assert_per_device("clean sessions, connected", after, before)


async def test_memory_per_persistent_session_is_bounded_connected_and_away(tmp_path: Path) -> None:
    """Issue "Any MQTT client": a persistent session (CleanSession 0) costs what a connected device
    costs or less: <= 4 KB per device while connected, and <= 4 KB once its connection is gone (the
    session alone: its subscription, waiting for the device)."""
    async with HengeService(make_settings(tmp_path / "data")) as service:
        broker: Any = service.broker
        async with connected_fleet(service, "p", 0xC0) as (before, clients):
            assert len(broker.sessions) == DEVICES
            gc.collect()
            connected = tracemalloc.take_snapshot()
            clients.stdin.write(b"\n")  # every device goes away; its session stays
            await clients.stdin.drain()
            await asyncio.wait_for(clients.wait(), 30)
            await wait_until(lambda: not service.broker.online_devices(), 30, "all gone")
            assert len(broker.sessions) == DEVICES and len(broker.index) == DEVICES
            gc.collect()
            away = tracemalloc.take_snapshot()
    assert_per_device("persistent sessions, connected", connected, before)
    assert_per_device("persistent sessions, away", away, before)
