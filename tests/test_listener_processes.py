"""Listener processes (``listener_processes: N``): device sockets held beyond one process's
open-file limit, the core unchanged for every client (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from henge_mqtt import HengeService
from henge_mqtt.certs import make_dev_certs
from henge_mqtt.server.relay_wire import DATA, HEADER, HELLO, MAX_FRAME, TRUST, LinkError, cut, frame
from henge_mqtt.settings import ListenerConfig
from henge_mqtt.store import Store

from . import mqtt_raw as raw
from .conftest import ROOT, henge_cli, make_settings, next_message, payload_json, wait_until
from .test_tls import assert_config_over_tls, claim_over_tls, factory_context
from .test_tls import context as tls_context

FD_LIMIT = 200  # per process: 136 device sockets after the reserve
# More than one process could hold, with room for the kernel's spread, which ignores load: a
# process whose devices reconnect elsewhere leaves the others with a third more each.
DEVICES = 240


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _connect_all(port: int, secrets: dict[str, str], devices: list[str]) -> dict[str, raw.RawClient]:
    async def one(device: str) -> tuple[str, raw.RawClient]:
        client = await raw.RawClient.open(port)
        await client.send(raw.connect(device, device, secrets[device]))
        assert await client.connack(10) == 0, device
        await client.send(raw.subscribe(1, f"henge/devices/{device}/config"))
        kind, _ = await client.read_packet(10)
        assert kind == 9  # SUBACK
        return device, client

    return dict(await asyncio.gather(*(one(d) for d in devices)))


async def _config_version(client: raw.RawClient) -> int:
    while True:
        kind, body = await client.read_packet(10)
        if kind == 3:
            start = 2 + int.from_bytes(body[:2], "big")
            await client.send(bytes([0x40, 2]) + body[start:start + 2])  # PUBACK
            return int(json.loads(body[start + 2:])["version"])


async def _summary(data: Path) -> dict[str, int]:
    result = await asyncio.to_thread(henge_cli, "status", "--summary", "--json", "--data", str(data))
    assert result.returncode == 0, result.stderr
    summary: dict[str, int] = json.loads(result.stdout)
    return summary


async def _started(proc: subprocess.Popen[bytes], data: Path) -> int:
    """The MQTT port of ``henge serve`` once it has started."""
    deadline = time.monotonic() + 30
    while not (data / "service.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
        await asyncio.sleep(0.05)
    return int(json.loads((data / "service.json").read_text())["port"])


async def _wait_online(data: Path, count: int) -> None:
    deadline = time.monotonic() + 15
    while (summary := await _summary(data))["online"] != count:
        assert time.monotonic() < deadline, summary
        await asyncio.sleep(0.1)


async def test_devices_beyond_one_process_file_limit_and_a_listener_process_killed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    devices = [f"dev{i:03d}" for i in range(DEVICES)]
    secrets = store.add_devices([(d, {}) for d in devices])
    store.close()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0",
                             "--listener-processes", "3"], cwd=ROOT, stdout=log, stderr=log,
                            preexec_fn=_limit_files)
    try:
        port = await _started(proc, data)
        listeners = _children(proc.pid)
        assert len(listeners) == 3

        clients = await _connect_all(port, secrets, devices)  # 240 sockets: one process holds at most 136
        await _wait_online(data, DEVICES)
        config = tmp_path / "c.json"
        config.write_text('{"v": 1}')
        pushed = await asyncio.to_thread(henge_cli, "push", "--all", str(config), "--data", str(data))
        assert pushed.returncode == 0, pushed.stderr
        versions = await asyncio.gather(*(_config_version(c) for c in clients.values()))
        assert versions == [1] * DEVICES

        # A listener process killed: its devices lose their sockets (and only they), it is started
        # again, and they reconnect through the same port and get their config back.
        victim = listeners[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: not _alive(victim), 5, "the listener process killed")
        closed = await asyncio.gather(*(c.closed_within(1.0) for c in clients.values()))
        cut = [d for d, gone in zip(clients, closed, strict=True) if gone]
        assert 0 < len(cut) < DEVICES
        await wait_until(lambda: len([p for p in _children(proc.pid) if _alive(p)]) == 3, 10,
                         "the listener process started again")
        assert victim not in _children(proc.pid)
        for device in cut:
            clients[device].close()
        clients.update(await _connect_all(port, secrets, cut))
        assert await asyncio.gather(*(_config_version(clients[d]) for d in cut)) == [1] * len(cut)
        await _wait_online(data, DEVICES)

        # The service stops: every listener process ends with it, and every device is cut.
        listeners = _children(proc.pid)
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert not any(_alive(p) for p in listeners)
        closed = await asyncio.gather(*(c.closed_within(5) for c in clients.values()))
        assert all(closed)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "broker.listener_process_exited index=0" in text and "Traceback" not in text


async def test_takeover_across_listener_processes_and_a_library_stop(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", listener_processes=2)
    async with HengeService(settings) as service:
        port = service.address[1]
        secret = await service.add_device("dev1")
        await service.push("dev1", {"v": 1})
        stats = service.broker.stats()
        assert stats["listener_processes"] == 2
        # Many connections of one device: the kernel spreads them over both processes, and each new
        # one replaces the last wherever it lives (a 5.0 client is told why: 0x8E).
        olds: list[paho.Client] = []
        gone: list[int] = []
        for i in range(8):
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev1", protocol=paho.MQTTv5)
            client.username_pw_set("dev1", secret)
            client.on_disconnect = lambda c, u, flags, rc, props: gone.append(rc.value)
            client.connect("127.0.0.1", port)
            client.loop_start()
            olds.append(client)
            await wait_until(client.is_connected, 5, f"connection {i}")
        await wait_until(lambda: len(gone) == 7, 5, "seven takeovers")
        assert set(gone) == {0x8E}
        status = (await service.status("dev1"))[0]
        assert status["online"] is True
        async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", username="dev1", password=secret,
                                  timeout=5) as device:
            await device.subscribe("henge/devices/dev1/config", qos=1)
            assert payload_json(await next_message(device))["config"] == {"v": 1}
        for client in olds:
            client.loop_stop()
        pids = _children(os.getpid())
        listener_pids = [p for p in pids if "relay_process" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(listener_pids) == 2
    assert not any(_alive(p) for p in listener_pids)  # a library stop ends them too


async def test_tls_ends_in_the_listener_processes(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["dev1"])
    tls = ListenerConfig(bind="127.0.0.1:0", ssl=True, certfile=certs / "server.pem", keyfile=certs / "server.key")
    settings = make_settings(tmp_path / "data", listener_processes=2)
    settings = settings.model_copy(update={"listeners": {**settings.listeners, "tls": tls}})
    async with HengeService(settings) as service:
        plain_port, tls_port = (address[1] for address in service.broker.addresses())
        secret = await service.add_device("dev1")
        await service.push("dev1", {"tls": True})
        await assert_config_over_tls(tls_port, certs, secret)
        # Plaintext on the TLS port is no MQTT session; the plain port still serves.
        plain_on_tls = await raw.RawClient.open(tls_port)
        await plain_on_tls.send(raw.connect("dev1", "dev1", secret))
        with pytest.raises(EOFError):
            await plain_on_tls.connack()
        device = await raw.RawClient.open(plain_port)
        await device.send(raw.connect("dev1", "dev1", secret))
        assert await device.connack() == 0


async def test_a_listener_process_started_again_keeps_client_certificates_and_claim_cas(tmp_path: Path) -> None:
    """Client certificates end in the listener process: a device logs in with its certificate alone
    (``tls_cert_replaces_password``), a claim CA made while the service runs reaches the process, and
    a process started again after a kill -9 trusts both, as the core's own listener would."""
    certs, factory = tmp_path / "certs", tmp_path / "factory"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["dev1", "dev2"])
    make_dev_certs(factory, ["localhost"], ["SN-1", "SN-2"], ca_name="factory claim CA")
    tls = ListenerConfig(bind="127.0.0.1:0", ssl=True, certfile=certs / "server.pem", keyfile=certs / "server.key",
                         cafile=certs / "ca.pem")
    settings = make_settings(tmp_path / "data", listener_processes=1, tls_client_auth="optional",
                             tls_cert_replaces_password=True)
    settings = settings.model_copy(update={"listeners": {"tls": tls}})
    async with HengeService(settings) as service:
        port = service.address[1]
        await service.add_device("dev1")
        await service.push("dev1", {"mtls": 1})
        claim = await service.create_claim("factory", {}, 10, 3600, ca=(factory / "ca.pem").read_text())

        async def log_in_and_claim(serial: str) -> None:
            async with aiomqtt.Client("127.0.0.1", port, identifier="dev1", tls_context=tls_context(certs, "dev1"),
                                      timeout=5) as device:
                await device.subscribe("henge/devices/dev1/config", qos=1)
                assert payload_json(await next_message(device))["config"] == {"mtls": 1}
            # another device's certificate for dev1: refused by the core, which saw the certificate's CN
            with pytest.raises(aiomqtt.MqttCodeError):
                async with aiomqtt.Client("127.0.0.1", port, identifier="dev1",
                                          tls_context=tls_context(certs, "dev2"), timeout=5):
                    pass
            answer = await claim_over_tls(port, claim["id"], factory_context(certs, factory, serial), serial,
                                          nonce=f"nonce-{serial}-0123456789")
            assert answer["ok"] is True and answer["device"] == serial

        await log_in_and_claim("SN-1")
        [listener] = _children(os.getpid())
        os.kill(listener, signal.SIGKILL)
        await wait_until(lambda: service.broker.stats()["listener_process_restarts"] == 1
                         and service.broker.stats()["listener_processes"] == 1, 10, "the listener process again")
        # (a connection before the new process accepts waits in the port's backlog: the core holds the port)
        await log_in_and_claim("SN-2")


async def test_a_listener_process_that_cannot_load_its_tls_files_says_so_in_one_line(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file gone (rotated badly) when a listener process starts again: it ends at once with
    one line (no traceback), the core says so without waiting out the start timeout and tries again,
    and the process starts as soon as the file is back."""
    from henge_mqtt.server import relay

    monkeypatch.setattr(relay, "RESTART_AFTER", (0.1, 0.3))
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["dev1"])
    tls = ListenerConfig(bind="127.0.0.1:0", ssl=True, certfile=certs / "server.pem", keyfile=certs / "server.key")
    settings = make_settings(tmp_path / "data", listener_processes=1)
    settings = settings.model_copy(update={"listeners": {"tls": tls}})
    async with HengeService(settings) as service:
        port = service.address[1]
        secret = await service.add_device("dev1")
        await service.push("dev1", {"tls": True})
        key = (certs / "server.key").read_bytes()
        (certs / "server.key").unlink()
        [listener] = _children(os.getpid())
        os.kill(listener, signal.SIGKILL)
        await wait_until(lambda: "broker.listener_process_start_failed" in caplog.text, 10, "a failed start, said")
        assert "ended as it started" in caplog.text
        (certs / "server.key").write_bytes(key)
        await wait_until(lambda: service.broker.stats()["listener_processes"] == 1
                         and _children(os.getpid()) not in ([], [listener]), 10, "started again")
        await assert_config_over_tls(port, certs, secret)
    err = capfd.readouterr().err
    assert "relay.tls_failed" in err and "Traceback" not in err


async def test_a_device_that_does_not_read_is_cut_by_its_listener_process(tmp_path: Path) -> None:
    """The core cannot see a relayed socket's buffer: the listener process bounds it (4 MiB), and the
    device goes offline as a slow consumer while another device keeps every push."""
    settings = make_settings(tmp_path / "data", listener_processes=1, max_inflight=1000)
    async with HengeService(settings) as service:
        port = service.address[1]
        slow_secret = await service.add_device("slow")
        fast_secret = await service.add_device("fast")
        slow = await raw.RawClient.open(port)
        await slow.send(raw.connect("slow", "slow", slow_secret))
        assert await slow.connack() == 0
        await slow.send(raw.subscribe(1, "henge/devices/slow/config"))
        # ... and from now on never reads its socket, never acknowledges
        async with aiomqtt.Client("127.0.0.1", port, identifier="fast", username="fast", password=fast_secret,
                                  timeout=5) as fast:
            await fast.subscribe("henge/devices/fast/config", qos=1)
            blob = {"pad": "x" * 200_000}
            n = 0
            while (await service.status("slow"))[0]["online"]:
                n += 1
                assert n <= 100, "40 MB unread and still connected"
                await service.push("slow", blob | {"n": n})
                await service.push("fast", {"n": n})
                assert payload_json(await next_message(fast, 5))["config"] == {"n": n}
        status = (await service.status("slow"))[0]
        assert status["reason"] == "slow_consumer"
        assert n > 20  # what the kernel's and the process's buffers hold first: 4 MiB and more
        slow.close()


@given(st.lists(st.tuples(st.integers(HELLO, TRUST), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
                max_size=20), st.lists(st.integers(1, 64), max_size=40))
def test_link_frames_survive_any_split(frames: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(frame(*f) for f in frames)
    got: list[tuple[int, int, bytes]] = []
    held, offset = b"", 0
    for size in [*cuts, len(stream)]:
        some, held = cut(held, stream[offset:offset + size])
        got += some
        offset += size
    assert got == frames and held == b""


def test_a_corrupt_link_is_an_error_not_a_huge_buffer() -> None:
    with pytest.raises(LinkError):
        cut(b"", HEADER.pack(DATA, 1, MAX_FRAME + 1))
    with pytest.raises(LinkError):
        cut(b"", HEADER.pack(99, 1, 0))


@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos_across_listener_processes_ends_with_presence_equal_to_the_truth(tmp_path: Path,
                                                                                     seed: int) -> None:
    """Random connects, clones (a second connection of a device: a takeover, wherever the kernel put
    each), abrupt drops, clean disconnects and pushes over 2 listener processes; then presence must
    equal which devices' last connection is open, and each of those has its latest config."""
    rng = random.Random(seed)
    settings = make_settings(tmp_path / "data", listener_processes=2, sessions={"connect_burst": 100})
    async with HengeService(settings) as service:
        port = service.address[1]
        devices = [f"d{i:02d}" for i in range(20)]
        secrets = {d: await service.add_device(d) for d in devices}
        current: dict[str, raw.RawClient | None] = dict.fromkeys(devices)
        latest: dict[str, int] = {}
        for _ in range(150):
            device = rng.choice(devices)
            op = rng.choice(["connect", "connect", "drop", "disconnect", "push"])
            client = current[device]
            if op == "connect":  # with a connection open already: a clone, which takes over
                new = await raw.RawClient.open(port)
                await new.send(raw.connect(device, device, secrets[device]))
                assert await new.connack() == 0
                await new.send(raw.subscribe(1, f"henge/devices/{device}/config"))
                current[device] = new
            elif op == "drop" and client is not None:
                client.writer.transport.abort()  # a reset: no DISCONNECT
                current[device] = None
            elif op == "disconnect" and client is not None:
                await client.send(raw.DISCONNECT)
                client.close()
                current[device] = None
            elif op == "push":
                latest[device] = (await service.push(device, {"n": rng.randrange(1000)})).version
        truth = {d for d, c in current.items() if c is not None}

        async def online() -> set[str]:
            return {s["device"] for s in await service.status() if s["online"]}

        deadline = time.monotonic() + 10
        while (seen := await online()) != truth:
            assert time.monotonic() < deadline, f"online {sorted(seen)} but connected {sorted(truth)}"
            await asyncio.sleep(0.05)
        for device in truth:
            client = current[device]
            assert client is not None
            if device in latest:
                version = 0
                while version != latest[device]:
                    version = await _config_version(client)


async def test_listener_processes_end_when_the_core_is_killed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    secret = store.add_devices([("dev1", {})])["dev1"]
    store.close()
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0",
                             "--no-http", "--listener-processes", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        port = await _started(proc, data)
        device = await raw.RawClient.open(port)
        await device.send(raw.connect("dev1", "dev1", secret))
        assert await device.connack() == 0
        listeners = _children(proc.pid)
        assert len(listeners) == 2
        proc.kill()  # no goodbye: the links close with the process
        proc.wait()
        await wait_until(lambda: not any(_alive(p) for p in listeners), 5, "the listener processes ended")
        assert await device.closed_within(5)  # and the kernel closed the device's socket with them
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
