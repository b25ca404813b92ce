"""henge in front of a real Mosquitto (Debian's package, started here on loopback ports)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from henge_mqtt.service import HengeService
from henge_mqtt.service.mosquitto import find_plugin, write_mosquitto_config
from henge_mqtt.settings import Settings
from henge_mqtt.store import Store

from . import mqtt_raw as raw
from .conftest import henge_cli, make_settings, next_message, payload_json, wait_until
from .conftest import wait_status as _wait_status
from .ports import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"




@dataclass
class Fleet:
    """One way of running henge, as devices and tests see it: the same contract in both modes."""

    mode: str
    service: HengeService
    device_port: int
    data_dir: Path
    reload_broker: Any = None

    async def add(self, device: str, config: dict[str, Any] | None = None) -> str:
        secret = await self.service.add_device(device)
        if self.reload_broker is not None:
            self.reload_broker()  # as an operator would: broker-config again, then SIGHUP
        if config is not None:
            row = await self.service.push(device, config)
            if self.mode != "embedded":
                await self.broker_has(device, secret, row.version)
        return secret

    async def broker_has(self, device: str, secret: str, version: int) -> None:
        """Until the external broker accepts the device's new credentials and retains this version."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with self.device_client(device, secret, timeout=2) as probe:
                    await probe.subscribe(f"henge/devices/{device}/config", qos=1)
                    if payload_json(await next_message(probe, 1.0))["version"] == version:
                        return
            assert loop.time() < deadline, f"the broker never served {device} version {version}"
            await asyncio.sleep(0.05)

    def retained(self, topic: str) -> bytes | None:
        retained: Any = self.service.broker.retained  # type: ignore[attr-defined]
        found = retained.get(topic)
        return found[0] if found else None

    def device_client(self, device: str, secret: str, **kwargs: Any) -> aiomqtt.Client:
        kwargs.setdefault("timeout", 5)
        return aiomqtt.Client("127.0.0.1", self.device_port, identifier=device, username=device,
                              password=secret, **kwargs)


class Mosquitto:
    def __init__(self, conf_dir: Path) -> None:
        self.conf_dir = conf_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            assert self.proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def external_fleet(tmp_path: Path, devices: dict[str, dict[str, Any]], *, identities: str = "password-file",
                         events: str | None = None) -> AsyncIterator[tuple[Fleet, Mosquitto, dict[str, str]]]:
    """Mosquitto configured by henge, henge in front of it. ``identities``: ``password-file`` (an
    operator reloads the broker after each change, as ``Fleet.add`` does) or ``dynamic-security``
    (the broker learns every change from henge at once: nothing to reload)."""
    data = tmp_path / "data"
    store = Store(data)
    secrets = store.add_devices([(d, {}) for d in devices])
    admin_secret = "admin-secret-for-tests-0123456789"
    store.ensure_admin("henge-admin", admin_secret)
    hashes, _ = store.broker_hashes()
    store.close()
    (data / "admin.json").write_text(json.dumps({"name": "henge-admin", "secret": admin_secret}))
    device_port, admin_port = free_port(), free_port()
    conf = tmp_path / "mosquitto"

    def configure(hashes: dict[str, str]) -> None:
        plugin = None
        if identities == "dynamic-security":
            plugin = find_plugin()
            assert plugin is not None, "Debian's mosquitto ships mosquitto_dynamic_security.so"
        write_mosquitto_config(conf, hashes, device_listener=f"127.0.0.1:{device_port}",
                               admin_listener=f"127.0.0.1:{admin_port}", topic_prefix="henge",
                               admin_name="henge-admin", run_as="root", plugin=plugin)  # the tests run as root

    configure(hashes)
    broker = Mosquitto(conf)
    broker.start(device_port)
    settings = Settings(data_dir=data, external_broker=f"mqtt://127.0.0.1:{admin_port}", external_events=events)
    try:
        async with HengeService(settings) as service:
            await service.broker.wait_connected(10)  # type: ignore[union-attr]
            for device, config in devices.items():
                if config:
                    await service.push(device, config)
            def reload() -> None:
                configure(service.store.broker_hashes()[0])
                assert broker.proc is not None
                broker.proc.send_signal(signal.SIGHUP)  # Fleet.add then waits until it took effect

            if identities == "dynamic-security":
                yield Fleet("mosquitto-dynsec", service, device_port, data), broker, secrets
            else:
                yield Fleet("mosquitto", service, device_port, data, reload), broker, secrets
    finally:
        broker.stop()


async def wait_status(fleet: Any, device: str, check: Callable[[dict[str, Any]], Any], timeout: float | None = None
                      ) -> dict[str, Any]:
    """conftest's, with the cluster's patience in front of NATS (``nats_cluster.PATIENCE``)."""
    from .nats_cluster import PATIENCE

    patience = timeout if timeout is not None else PATIENCE if getattr(fleet, "mode", None) == "nats" else 10.0
    return await _wait_status(fleet, device, check, patience)


@pytest.fixture(params=["embedded", "mosquitto", "mosquitto-dynsec",
                        pytest.param("nats", marks=pytest.mark.xdist_group("nats"))])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    if request.param == "embedded":
        async with HengeService(make_settings(tmp_path / "data")) as service:
            yield Fleet("embedded", service, service.address[1], tmp_path / "data")
    elif request.param == "nats":  # a 3-node cluster: henge through node 1, devices on node 2
        from .nats_cluster import nats_service

        async with nats_service(tmp_path, []) as (service, cluster, _):
            yield Fleet("nats", service, cluster.mqtt_ports[1], tmp_path / "data")
    else:
        identities = "dynamic-security" if request.param == "mosquitto-dynsec" else "password-file"
        async with external_fleet(tmp_path, {}, identities=identities) as (f, _, _):
            yield f


# ---- the same contract, both modes ----------------------------------------------------------------


async def test_contract_snapshot_on_connect_and_live_updates(fleet: Fleet) -> None:
    secret = await fleet.add("dev1", {"v": 1})
    async with fleet.device_client("dev1", secret) as client:
        await client.subscribe("henge/devices/dev1/config", qos=1)
        first = await next_message(client)
        assert first.retain and payload_json(first)["config"] == {"v": 1}
        await fleet.service.push("dev1", {"v": 2})
        assert payload_json(await next_message(client))["version"] == 2


async def test_contract_acl_no_cross_device_reads(fleet: Fleet) -> None:
    s1 = await fleet.add("dev1", {"mine": 1})
    await fleet.add("dev2", {"theirs": 1})
    async with fleet.device_client("dev1", s1) as client:
        await client.subscribe("henge/devices/dev2/config", qos=1)
        await client.subscribe("henge/devices/+/config", qos=1)
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(payload_json(await next_message(client, 1.0))["device"])
        assert "dev2" not in got


async def test_contract_reports_and_presence(fleet: Fleet, tmp_path: Path) -> None:
    from henge_mqtt.device import Agent

    secret = await fleet.add("dev1", {"v": 1})
    applied: list[dict[str, Any]] = []

    async def record(config: dict[str, Any]) -> None:
        applied.append(config)

    agent = Agent("127.0.0.1", fleet.device_port, "dev1", secret, record, tmp_path / "state.json")
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_status(fleet, "dev1", lambda r: r["sync"] == "in_sync" and r["online"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    row = await wait_status(fleet, "dev1", lambda r: not r["online"])
    # NATS reports a DISCONNECT and a closed socket alike (its presence comes from its events)
    assert row["reason"] == ("connection_closed" if fleet.mode == "nats" else "client_disconnect")


async def test_contract_reported_state_through_any_broker(fleet: Fleet) -> None:
    """A plain client reports its state through the broker (its ACL lets a device write only its own
    reported topic) and henge keeps it, filters by it, and targets by it."""
    s1 = await fleet.add("dev1", {"v": 1})
    s2 = await fleet.add("dev2", {"v": 1})
    async with fleet.device_client("dev1", s1) as one, fleet.device_client("dev2", s2) as two:
        await one.publish("henge/devices/dev1/reported", b'{"document": {"fw": "2.4.1"}}', qos=1)
        await two.publish("henge/devices/dev1/reported", b'{"document": {"fw": "forged"}}', qos=1)
        await two.publish("henge/devices/dev2/reported", b'{"document": {"fw": "2.3"}}', qos=1)
        from .nats_cluster import PATIENCE

        patience = PATIENCE if fleet.mode == "nats" else 10.0
        await wait_until(lambda: _reported_seq(fleet, "dev2"), timeout=patience, what="dev2's report")
        await wait_until(lambda: _reported_seq(fleet, "dev1"), timeout=patience, what="dev1's report")
    state = await fleet.service.reported("dev1")
    assert state["document"] == {"fw": "2.4.1"} and state["seq"] == 1
    assert [r["device"] for r in await fleet.service.status(where='reported.fw >= "2.4"')] == ["dev1"]


async def _reported_seq(fleet: Fleet, device: str) -> bool:
    return bool((await fleet.service.reported(device))["seq"])


async def test_contract_fleet_push_is_answered_in_devices(fleet: Fleet, tmp_path: Path) -> None:
    """Counted per device, from the devices' reports: not broker acknowledgements (issue: in external
    mode 3 devices with 1 online once answered `online: 3, acknowledged: 3`)."""
    from henge_mqtt.device import Agent, ApplyFailed

    secrets = {d: await fleet.add(d, {"v": 0}) for d in ("good", "bad", "away")}

    async def accept(config: dict[str, Any]) -> None:
        return None

    async def refuse(config: dict[str, Any]) -> None:
        if config.get("v") == 1:
            raise ApplyFailed("v=1 is not supported here")

    stop = asyncio.Event()
    tasks = [asyncio.create_task(Agent("127.0.0.1", fleet.device_port, d, secrets[d], apply,
                                       tmp_path / f"{d}.json").run(stop))
             for d, apply in (("good", accept), ("bad", refuse))]
    try:
        for device in ("good", "bad"):
            await wait_status(fleet, device, lambda r: r["online"] and r["sync"] == "in_sync")
        # "away" never reports, so the answer comes after the whole wait: NATS stores each retained
        # config in JetStream before it delivers it, slow when the machine is busy (two test workers).
        result = await fleet.service.fleet_push({"v": 1}, all_devices=True, wait=12 if fleet.mode == "nats" else 3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    counts = {k: result[k] for k in ("targeted", "devices", "online", "offline", "applied", "rejected", "pending")}
    assert counts == {"targeted": 3, "devices": 3, "online": 2, "offline": 1, "applied": 1, "rejected": 1,
                      "pending": 1}
    assert result["delivered"] == (2 if fleet.mode == "embedded" else None)
    assert result["listed"] == {"rejected": ["bad"], "offline": ["away"], "silent": []}
    assert result["errors"] == {"v=1 is not supported here": 1}
    assert result["per_device"]["good"] | {} == {"version": 2, "online": True, "report": "applied", "error": None,
                                                 "delivered": True if fleet.mode == "embedded" else None}


# ---- external mode only ---------------------------------------------------------------------------


async def _announce(client: aiomqtt.Client, device: str, state: str, session: str) -> None:
    await client.publish(f"henge/devices/{device}/presence/device", json.dumps({"state": state, "session": session}),
                         qos=1)


async def test_broker_takeover_with_a_late_will_keeps_the_device_online(tmp_path: Path) -> None:
    async with external_fleet(tmp_path, {"dev1": {"v": 1}}) as (fleet, _, secrets):
        def client(session: str) -> aiomqtt.Client:
            will = aiomqtt.Will("henge/devices/dev1/presence/device",
                                json.dumps({"state": "offline", "session": session}), qos=1)
            return fleet.device_client("dev1", secrets["dev1"], will=will)

        first = client("S1")
        await first.__aenter__()
        await _announce(first, "dev1", "online", "S1")
        async with client("S2") as second:  # Mosquitto closes the first and publishes its will
            await _announce(second, "dev1", "online", "S2")
            await wait_status(fleet, "dev1", lambda r: r["online"] and r["epoch"] == 2)
            # Mosquitto publishes the displaced will at takeover, usually before S2 announces itself;
            # a will delayed past S2 (another broker, a slow bridge) must change nothing either.
            await _announce(second, "dev1", "offline", "S1")
            # A report behind the stale will, from the same client: once recorded, the will was handled.
            await second.publish("henge/devices/dev1/report", b'{"version":1,"status":"applied"}', qos=1)
            status = await wait_status(fleet, "dev1", lambda r: r["applied_version"] == 1)
            assert status["online"] and status["epoch"] == 2
            presence = json.loads(fleet.retained("henge/devices/dev1/presence"))
            assert (presence["state"], presence["epoch"]) == ("online", 2)
        with contextlib.suppress(Exception):
            await first.__aexit__(None, None, None)


async def test_broker_restart_without_persistence_gets_everything_republished(tmp_path: Path) -> None:
    async with external_fleet(tmp_path, {"dev1": {"v": 7}}) as (fleet, broker, secrets):
        broker.stop()
        broker.start(fleet.device_port)
        deadline = time.monotonic() + 20
        got = None
        while got is None:
            assert time.monotonic() < deadline, "snapshot not republished after the broker restarted"
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with fleet.device_client("dev1", secrets["dev1"]) as client:
                    await client.subscribe("henge/devices/dev1/config", qos=1)
                    got = payload_json(await next_message(client, 1.0))
            await asyncio.sleep(0.2)
        assert got["config"] == {"v": 7}


async def test_service_restart_loses_nothing_and_cli_works(tmp_path: Path) -> None:
    async with external_fleet(tmp_path, {"dev1": {"v": 1}}) as (fleet, _, secrets):
        result = await asyncio.to_thread(henge_cli, "push", "dev1", "-", "--data", str(fleet.data_dir),
                                         input='{"v": 2}')
        assert result.returncode == 0, result.stderr
        settings = fleet.service.settings
        await fleet.service.stop()
        async with HengeService(settings) as again:
            await again.broker.wait_connected(10)  # type: ignore[union-attr]
            assert [r.version for r in again.store.history("dev1")] == [1, 2]
            async with fleet.device_client("dev1", secrets["dev1"]) as client:
                await client.subscribe("henge/devices/dev1/config", qos=1)
                assert payload_json(await next_message(client))["version"] == 2


async def _closed(client: aiomqtt.Client, within: float = 5.0) -> None:
    """Until the broker closes ``client``'s connection (a MqttError from the message stream)."""
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(within):
            async for _ in client.messages:
                pass


async def _refused(fleet: Fleet, device: str, secret: str, *, client_id: str | None = None) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", fleet.device_port, identifier=client_id or device, username=device,
                                  password=secret, timeout=5):
            pass


async def test_dynamic_security_device_add_rotate_remove_reach_the_broker_at_once(tmp_path: Path) -> None:
    """Issue 22: behind Mosquitto with its dynamic security plugin, no broker-config again and no
    SIGHUP: a new device connects at once, a new secret closes the old connection and refuses the old
    secret, a removed device is disconnected at once and refused; the answers say what the broker did."""
    from henge_mqtt.ports import IdentitySync

    async with external_fleet(tmp_path, {"dev0": {"v": 0}}, identities="dynamic-security") as (fleet, _, _):
        svc = fleet.service
        said: list[IdentitySync] = []
        secret = await svc.add_device("new1", broker=said)
        assert said == [IdentitySync(applied=True, how="dynamic-security")]
        await svc.push("new1", {"v": 1})
        async with fleet.device_client("new1", secret) as device:
            await device.subscribe("henge/devices/new1/config", qos=1)
            assert payload_json(await next_message(device))["config"] == {"v": 1}
            await _refused(fleet, "new1", secret, client_id="intruder")  # the client id is bound to the user
            rotated: list[IdentitySync] = []
            new_secret = await svc.rotate_secret("new1", broker=rotated)
            assert rotated[0].applied
            await _closed(device)
        await _refused(fleet, "new1", secret)
        async with fleet.device_client("new1", new_secret) as device:
            await device.subscribe("henge/devices/new1/config", qos=1)
            assert payload_json(await next_message(device))["config"] == {"v": 1}
            removed: list[IdentitySync] = []
            await svc.remove_device("new1", broker=removed)
            assert removed[0].applied
            await _closed(device)
        await _refused(fleet, "new1", new_secret)
        # Many at once (an import is several messages to the broker, in order: 600 commands here).
        imported: list[IdentitySync] = []
        secrets = await svc.import_devices([(f"bulk{i:04d}", {}) for i in range(300)], broker=imported)
        assert imported[0].applied
        async with fleet.device_client("bulk0299", secrets["bulk0299"]) as device:
            await device.subscribe("henge/devices/bulk0299/config", qos=1)


async def test_an_import_the_broker_takes_slowly_answers_at_once_and_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto's dynamic security rewrites its whole file for every command, so 2,000 devices took
    80 s and the import timed out (the CLI, waiting 60 s, lost the new secrets). Now the answer comes
    after IDENTITY_WAIT (here none) with the secrets and a note that the broker is still taking them;
    they go on in the background, in messages sized to the broker's pace, and an event says when
    they are all in (every device then connects)."""
    import henge_mqtt.service.api as service_api
    from henge_mqtt.ports import IdentitySync

    monkeypatch.setattr(service_api, "IDENTITY_WAIT", 0.0)
    async with external_fleet(tmp_path, {"dev0": {"v": 0}}, identities="dynamic-security") as (fleet, _, _):
        svc = fleet.service
        said: list[str] = []
        svc.events.add_listener(lambda e: said.append(e.type) if e.type.startswith("broker_identities") else None)
        imported: list[IdentitySync] = []
        secrets = await svc.import_devices([(f"bulk{i:04d}", {}) for i in range(300)], broker=imported)
        assert len(secrets) == 300
        assert imported == [IdentitySync(applied=False, how="dynamic-security", detail=(
            "the broker is still taking the changes after 0 s (Mosquitto's dynamic security rewrites its file for "
            "each): they go on in the background; the event broker_identities_synced (henge events) says when "
            "they are all in, broker_identities_stale if they fail"))]
        await wait_until(lambda: said, timeout=30, what="the broker has every identity")
        assert said == ["broker_identities_synced"]
        for device in ("bulk0000", "bulk0299"):
            async with fleet.device_client(device, secrets[device]) as client:
                await client.subscribe(f"henge/devices/{device}/config", qos=1)


async def test_identities_still_going_when_the_service_stops_are_said_to_be_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service stops while the broker is still taking an import's identities: never silence, a
    broker_identities_stale event (and a warning in the log) says the store has them and what to run."""
    import henge_mqtt.service.api as service_api

    monkeypatch.setattr(service_api, "IDENTITY_WAIT", 0.0)
    said: list[tuple[str, str]] = []
    async with external_fleet(tmp_path, {}, identities="dynamic-security") as (fleet, _, _):
        fleet.service.events.add_listener(
            lambda e: said.append((e.type, e.data.get("detail", ""))) if e.type.startswith("broker_ident") else None)
        await fleet.service.import_devices([(f"bulk{i:04d}", {}) for i in range(300)])
    assert len(said) == 1 and said[0][0] == "broker_identities_stale", said
    assert "the store has" in said[0][1] and "henge device rotate-secret ID" in said[0][1]


async def test_the_cli_says_what_the_broker_did_with_a_new_device(tmp_path: Path) -> None:
    """`henge device add` behind a broker: with dynamic security a line says the broker has it; with
    password files a warning says what to run (never silence)."""
    for identities in ("dynamic-security", "password-file"):
        async with external_fleet(tmp_path / identities, {}, identities=identities) as (fleet, _, _):
            result = await asyncio.to_thread(henge_cli, "device", "add", "cli1", "--data", str(fleet.data_dir))
            assert result.returncode == 0, result.stderr
            answer = await asyncio.to_thread(henge_cli, "device", "add", "cli2", "--data", str(fleet.data_dir),
                                             "--json")
            note = json.loads(answer.stdout)["broker"]
            if identities == "dynamic-security":
                assert "broker: updated at once (Mosquitto dynamic security)" in result.stdout
                assert result.stderr == ""
                assert note == {"applied": True, "how": "dynamic-security", "detail": ""}
            else:
                assert result.stderr.startswith("warning: the broker does not know this yet: the broker does not "
                                                "run Mosquitto's dynamic security for henge: if it reads a password "
                                                "file, run henge broker-config mosquitto --identities password-file")
                assert len(result.stderr.splitlines()) == 1
                assert note["applied"] is False and note["how"] == "password-file"


def test_broker_config_dynamic_security_is_what_mosquitto_accepts(tmp_path: Path) -> None:
    """The default `broker-config mosquitto`: the plugin's state with every device, its client id
    bound and its own role; Mosquitto accepts the device's real secret under its own id only."""
    data = tmp_path / "data"
    store = Store(data)
    secret = store.add_device("dev1")
    store.close()
    result = henge_cli("broker-config", "mosquitto", "--out", str(tmp_path / "mq"), "--data", str(data),
                       "--user", "root", "--device-listener", f"127.0.0.1:{(port := free_port())}",
                       "--admin-listener", f"127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "mq" / "dynamic-security.json").read_text())
    device = next(c for c in state["clients"] if c["username"] == "dev1")
    assert device["clientid"] == "dev1" and device["roles"] == [{"rolename": "henge-device-dev1"}]
    assert oct((tmp_path / "mq" / "dynamic-security.json").stat().st_mode & 0o777) == "0o600"
    assert "plugin_opt_config_file" in (tmp_path / "mq" / "mosquitto.conf").read_text()
    broker = Mosquitto(tmp_path / "mq")
    broker.start(port)
    try:
        def publish(password: str, client_id: str) -> int:
            return subprocess.run(["mosquitto_pub", "-p", str(port), "-u", "dev1", "-P", password, "-i", client_id,
                                   "-t", "henge/devices/dev1/report", "-m", "{}"], capture_output=True,
                                  timeout=10).returncode

        assert publish(secret, "dev1") == 0
        assert publish("wrong", "dev1") != 0
        assert publish(secret, "not-dev1") != 0
    finally:
        broker.stop()


def test_broker_config_command_matches_mosquitto_passwd(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    secret = store.add_device("dev1")
    store.close()
    result = henge_cli("broker-config", "mosquitto", "--out", str(tmp_path / "mq"), "--data", str(data),
                       "--user", "root", "--identities", "password-file")
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "mq" / "passwd").read_text()
    assert passwd.startswith("dev1:$7$101$")
    assert oct((tmp_path / "mq" / "passwd").stat().st_mode & 0o777) == "0o600"
    conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
    assert "use_username_as_clientid true" in conf and "per_listener_settings true" in conf
    acl = (tmp_path / "mq" / "acl").read_text()
    assert "pattern read henge/devices/%u/config" in acl and "pattern write henge/devices/%u/report" in acl
    # Mosquitto itself accepts the generated hash for the real secret, and refuses a wrong one.
    port = free_port()
    conf_file = tmp_path / "mq" / "mosquitto.conf"
    conf_file.write_text(conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1"))
    broker = Mosquitto(tmp_path / "mq")
    broker.start(port)
    try:
        ok = subprocess.run(["mosquitto_pub", "-p", str(port), "-u", "dev1", "-P", secret, "-t",
                             "henge/devices/dev1/report", "-m", "{}"], capture_output=True, text=True, timeout=10)
        bad = subprocess.run(["mosquitto_pub", "-p", str(port), "-u", "dev1", "-P", "wrong", "-t",
                              "henge/devices/dev1/report", "-m", "{}"], capture_output=True, text=True, timeout=10)
    finally:
        broker.stop()
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0




async def test_takeovers_behind_mosquitto_never_show_offline_and_make_a_conflict(tmp_path: Path) -> None:
    """Mosquitto publishes the displaced session's will before the new session announces itself:
    presence must stay online through takeovers, count them, and flag ping-pong as a conflict."""
    async with external_fleet(tmp_path, {"dev1": {"v": 1}}) as (fleet, _, secrets):
        await _ping_pong_behind_mosquitto(fleet, secrets)


async def _ping_pong_behind_mosquitto(fleet: Fleet, secrets: dict[str, str]) -> None:
    async with aiomqtt.Client("127.0.0.1", fleet.service.broker.port,  # type: ignore[attr-defined]
                              identifier="watcher", username="henge-admin",
                              password=fleet.service.admin_secret, timeout=5) as watcher:
        await watcher.subscribe("henge/devices/dev1/presence", qos=1)
        assert payload_json(await next_message(watcher))["reason"] == "server_start"  # the retained one
        clients = []
        for i in range(6):  # two "devices" with one identity, taking it from each other
            session = f"S{i}"
            will = aiomqtt.Will("henge/devices/dev1/presence/device",
                                json.dumps({"state": "offline", "session": session}), qos=1)
            client = fleet.device_client("dev1", secrets["dev1"], will=will)
            await client.__aenter__()
            await _announce(client, "dev1", "online", session)
            clients.append(client)
            await wait_status(fleet, "dev1", lambda r, n=i: r["online"] and r["epoch"] == n + 1)
        states = []
        with contextlib.suppress(TimeoutError):
            while True:
                states.append(payload_json(await next_message(watcher, 2.5))["state"])
        assert "offline" not in states, states  # past the grace: no will was believed
        row = (await fleet.service.status("dev1"))[0]
        assert row["online"] and row["takeovers"] >= 5 and row["conflict"] is True
        # A real loss (the current connection dies without a goodbye) shows within grace + 1 s.
        dead = await raw.RawClient.open(fleet.device_port)
        will = json.dumps({"state": "offline", "session": "S-dead"}).encode()
        await dead.send(raw.connect("dev1", "dev1", secrets["dev1"], will=("henge/devices/dev1/presence/device",
                                                                         will)))
        assert await dead.connack() == 0
        await dead.send(raw.publish("henge/devices/dev1/presence/device",
                                    json.dumps({"state": "online", "session": "S-dead"}).encode(), qos=1))
        await wait_status(fleet, "dev1", lambda r: r["epoch"] == 7)
        dead.writer.transport.abort()  # a dead link, not a DISCONNECT: Mosquitto publishes the will
        started = time.monotonic()
        row = await wait_status(fleet, "dev1", lambda r: not r["online"], timeout=10)
        assert row["reason"] == "connection_lost" and time.monotonic() - started < 2.0 + 1.0 + 1.5
        for client in clients:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)


async def test_service_restart_remembers_who_is_connected(tmp_path: Path) -> None:
    """Announcements are retained: a restarted service reads who is connected now from the broker."""
    from henge_mqtt.device import Agent

    async with external_fleet(tmp_path, {"dev1": {"v": 1}, "dev2": {"v": 1}}) as (fleet, _, secrets):
        async def noop(config: dict[str, Any]) -> None:
            return None

        agent = Agent("127.0.0.1", fleet.device_port, "dev1", secrets["dev1"], noop, tmp_path / "a.json")
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            before = await wait_status(fleet, "dev1", lambda r: r["online"])
            settings = fleet.service.settings
            await fleet.service.stop()
            async with HengeService(settings) as again:
                started = time.monotonic()
                row = await wait_status(Fleet("mosquitto", again, fleet.device_port, fleet.data_dir), "dev1",
                                        lambda r: r["online"], timeout=5)
                assert time.monotonic() - started < 5 and row["epoch"] > before["epoch"]
                assert not (await again.status("dev2"))[0]["online"]  # never connected: offline
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)


async def test_bad_messages_through_mosquitto_never_stop_the_service(tmp_path: Path) -> None:
    async with external_fleet(tmp_path, {"dev1": {"v": 1}, "gone": {"v": 1}}) as (fleet, _, secrets):
        async with fleet.device_client("gone", secrets["gone"]) as ghost, \
                fleet.device_client("dev1", secrets["dev1"]) as device:
            await fleet.service.remove_device("gone")  # Mosquitto's password file still lists it
            await ghost.publish("henge/devices/gone/report", b'{"version": 1, "status": "applied"}', qos=1)
            for payload in (b"not json", b"[]", b'{"state": "online"}', b'{"state": 7, "session": []}', b""):
                await device.publish("henge/devices/dev1/presence/device", payload, qos=1)
            for payload in (b"not json", b'{"version": "x"}', b"\xff\xfe"):
                await device.publish("henge/devices/dev1/report", payload, qos=1)
            await device.publish("henge/devices/dev1/report", b'{"version": 1, "status": "applied"}', qos=1)
            await wait_status(fleet, "dev1", lambda r: r["sync"] == "in_sync")  # handled in order, after them
        result = await asyncio.to_thread(henge_cli, "status", "--data", str(fleet.data_dir), "--json")
        assert result.returncode == 0, result.stderr  # the admin protocol still answers
        assert [r["device"] for r in json.loads(result.stdout)] == ["dev1"]
        assert fleet.service.broker.stats()["dropped"] == 0  # each was refused by design, none crashed a hook


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_scaling_md_commands_work_in_order_on_a_fresh_data_dir(tmp_path: Path) -> None:
    """docs/scaling.md's first block, run as written (only the paths moved under a temp dir and the
    ports made free): broker-config before the first serve, Mosquitto started as root dropping to
    its own user (which must read and write the dynamic security state), henge serve in front of it;
    then a device added with the CLI connects at once (no broker-config again, no SIGHUP)."""
    import os
    import re
    import shlex
    import sys
    import tempfile

    from .conftest import ROOT

    block = re.search(r"```sh\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(), re.S)
    assert block is not None
    base = Path(tempfile.mkdtemp(prefix="henge-scaling-", dir="/tmp"))
    os.chmod(base, 0o755)  # mosquitto, as its own user, must reach its config below here
    device_port, admin_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for line in block.group(1).strip().splitlines():
            command = line.split("#")[0].strip()
            command = (command.replace("/etc/mosquitto/henge", str(base / "etc"))
                       .replace("/var/lib/henge", str(base / "data"))
                       .replace("127.0.0.1:1884", f"127.0.0.1:{admin_port}"))
            argv = shlex.split(command)
            if argv[:2] == ["henge", "broker-config"]:
                argv += ["--device-listener", f"127.0.0.1:{device_port}", "--admin-listener", f"127.0.0.1:{admin_port}"]
            if argv[0] == "henge":
                argv = [sys.executable, "-m", "henge_mqtt", *argv[1:]]
            if argv[0] == "mosquitto":
                argv[0] = MOSQUITTO
            if "serve" in argv or argv[0] == MOSQUITTO:
                log = base / f"{len(procs)}.log"
                with log.open("wb") as out:
                    procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out))
                deadline = time.monotonic() + 15
                ready = (lambda: _listening(device_port)) if argv[0] == MOSQUITTO else (
                    lambda: (base / "data" / "service.json").exists())
                while not ready():
                    assert procs[-1].poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                continue
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (command, done.stderr)
        state = base / "etc" / "dynamic-security.json"
        assert state.stat().st_uid != 0 and (state.stat().st_mode & 0o777) == 0o600  # mosquitto's, nobody else's
        added = henge_cli("device", "add", "cam1", "--data", str(base / "data"), "--json", timeout=30)
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["broker"] == {"applied": True, "how": "dynamic-security", "detail": ""}
        secret = json.loads(added.stdout)["secret"]
        pushed = henge_cli("push", "cam1", "-", "--data", str(base / "data"), input='{"v": 1}', timeout=30)
        assert pushed.returncode == 0, pushed.stderr

        async def fetch() -> dict[str, Any]:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    async with aiomqtt.Client("127.0.0.1", device_port, identifier="cam1", username="cam1",
                                              password=secret, timeout=3) as device:
                        await device.subscribe("henge/devices/cam1/config", qos=1)
                        return payload_json(await next_message(device, 3))
                assert time.monotonic() < deadline, "the device never got its config through Mosquitto"
                await asyncio.sleep(0.1)

        assert asyncio.run(fetch())["config"] == {"v": 1}
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=20)
        shutil.rmtree(base, ignore_errors=True)


async def test_two_agents_on_one_identity_behind_mosquitto_back_off(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: Mosquitto closes a displaced 5.0 client with 0x80, not henge's 0x8E; the agent backs off
    on any connection closed within seconds of connecting, whatever the code, so two agents sharing an
    identity stop swapping the connection (35 swaps in 17 s before). Jitter fixed at its middle."""
    import logging

    from henge_mqtt.backoff import Backoff
    from henge_mqtt.device import Agent

    async def accept(config: dict[str, Any]) -> None:
        return None

    caplog.set_level(logging.INFO, logger="henge_mqtt.device")
    async with external_fleet(tmp_path, {"twin": {"v": 1}}) as (fleet, _, secrets):
        stop = asyncio.Event()
        agents = [asyncio.create_task(Agent("127.0.0.1", fleet.device_port, "twin", secrets["twin"], accept,
                                            tmp_path / f"twin-{i}.json", backoff=Backoff(base=0.5, rand=lambda: 0.5))
                                      .run(stop)) for i in range(2)]
        await asyncio.sleep(6.0)  # what is measured: how often they swap over this time
        stop.set()
        await asyncio.gather(*agents)
    connects = sum("agent.connected" in r.getMessage() for r in caplog.records)
    early = sum("agent.closed_early" in r.getMessage() for r in caplog.records)
    assert early >= 1, "they never displaced each other"
    assert connects <= 8, f"{connects} connections in 6 s: the agents did not back off"


def test_serve_in_front_of_a_broker_says_where_devices_connect(tmp_path: Path) -> None:
    """Issue 19: `serve --broker` printed only the admin address."""
    data = tmp_path / "data"
    out = tmp_path / "etc"
    device_port, admin_port = free_port(), free_port()
    done = henge_cli("broker-config", "mosquitto", "--out", str(out), "--data", str(data), "--init", "--user", "root",
                     "--device-listener", f"127.0.0.1:{device_port}", "--admin-listener", f"127.0.0.1:{admin_port}")
    assert done.returncode == 0, done.stderr
    broker = Mosquitto(out)
    broker.start(device_port)
    log = tmp_path / "serve.log"
    try:
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--no-http",
                                     "--broker", f"mqtt://127.0.0.1:{admin_port}"], stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            deadline = time.monotonic() + 20
            while "henge: serving" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            banner = next(line for line in log.read_text().splitlines() if line.startswith("henge: serving"))
            assert f"serving through the broker at mqtt://127.0.0.1:{admin_port}" in banner
            assert f"devices connect to the broker at mqtt://127.0.0.1:{device_port}" in banner
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    finally:
        broker.stop()


async def test_emqx_client_events_give_presence_in_either_order(tmp_path: Path) -> None:
    """EMQX's `$SYS/brokers/{node}/clients/{clientid}/connected|disconnected` (its documented format),
    fed to the service's connection as EMQX would send them. (No EMQX runs here, and Mosquitto does
    not let a client publish to `$SYS`, so the messages enter where the broker's would.)"""
    async with external_fleet(tmp_path, {"dev1": {"v": 1}, "dev2": {"v": 1}}, events="emqx") as (fleet, _, _):
        broker: Any = fleet.service.broker

        def event(what: str, client_id: str, **body: Any) -> None:
            broker._on_message(f"$SYS/brokers/emqx@10.0.0.1/clients/{client_id}/{what}", json.dumps(body).encode())

        event("connected", "dev1", username="dev1", ipaddress="10.0.0.7", connected_at=1000, proto_ver=4)
        first = await wait_status(fleet, "dev1", lambda r: r["online"])
        # a takeover reported new-first, then old-first: the device never goes offline
        event("connected", "dev1", username="dev1", ipaddress="10.0.0.8", connected_at=2000)
        event("disconnected", "dev1", username="dev1", reason="takenover", disconnected_at=2001)
        await wait_status(fleet, "dev1", lambda r: r["online"] and r["epoch"] == first["epoch"] + 1)
        event("disconnected", "dev1", username="dev1", reason="takenover", disconnected_at=3000)
        event("connected", "dev1", username="dev1", ipaddress="10.0.0.9", connected_at=3001)
        row = await wait_status(fleet, "dev1", lambda r: r["online"] and r["epoch"] == first["epoch"] + 2)
        assert row["remote"] == "10.0.0.9"
        await asyncio.sleep(fleet.service.broker.will_grace + 0.2)  # the deferred end is stale by then
        assert (await fleet.service.status("dev1"))[0]["online"]
        event("disconnected", "dev1", username="dev1", reason="normal", disconnected_at=4000)
        row = await wait_status(fleet, "dev1", lambda r: not r["online"])
        assert row["reason"] == "client_disconnect"
        # someone with dev2's credentials and another client id: dev2, flagged
        flagged: list[Any] = []
        stop = fleet.service.events.add_listener(lambda e: flagged.append(e) if e.type == "identity_mismatch" else None)
        try:
            event("connected", "not-dev2", username="dev2", ipaddress="10.0.0.5", connected_at=5000)
            await wait_status(fleet, "dev2", lambda r: r["online"])
            assert flagged and flagged[0].data["client_id"] == "not-dev2"
        finally:
            stop()
        event("disconnected", "not-dev2", username="dev2", reason="keepalive_timeout", disconnected_at=6000)
        row = await wait_status(fleet, "dev2", lambda r: not r["online"])
        assert row["reason"] == "keepalive_timeout"
        event("connected", "henge-admin", username="henge-admin", connected_at=1)  # not a device
        event("connected", "x", username="dev1")  # no connected_at: still a connection
        await wait_status(fleet, "dev1", lambda r: r["online"])
        broker._on_message("$SYS/brokers/n/clients/dev1/connected", b"{not json")  # logged, nothing else
        assert fleet.service.broker.stats()["connected_to_broker"] == 1
