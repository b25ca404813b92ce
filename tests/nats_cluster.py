"""A real NATS cluster (Debian's nats-server: JetStream and MQTT on every node) on loopback ports this
test chose, configured by ``henge broker-config nats`` exactly as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from henge_mqtt.mqtt_client import MqttClient, MqttClientError
from henge_mqtt.service import HengeService
from henge_mqtt.settings import Settings
from henge_mqtt.store import Store

from .conftest import henge_cli
from .ports import free_ports

NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
ADMIN_SECRET = "admin-secret-for-tests-0123456789"
# Waits in front of a cluster: 30 s where the rest of the suite waits 10 (JetStream on two busy cores
# once took more than 10 s to deliver a retained config to a new subscriber).
PATIENCE = 30.0



class NatsCluster:
    """Three nodes written by broker-config nats into ``conf``; start, kill -9, restart them."""

    def __init__(self, conf: Path, ports: list[tuple[int, int, int]]) -> None:
        self.conf = conf
        self.ports = ports  # (client, cluster, mqtt) per node
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def mqtt_ports(self) -> list[int]:
        return [p[2] for p in self.ports]

    @property
    def events_url(self) -> str:
        return "nats://" + ",".join(f"127.0.0.1:{p[0]}" for p in self.ports)

    def start(self, *nodes: int) -> None:
        for i in nodes or range(len(self.ports)):
            log = open(self.conf / f"henge-{i + 1}.log", "ab")  # noqa: SIM115 (the process owns it)
            self.procs[i] = subprocess.Popen([NATS, "-c", str(self.conf / f"henge-{i + 1}.conf")],
                                             stdout=log, stderr=log)
            log.close()

    def kill(self, node: int) -> None:
        proc = self.procs.pop(node)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    async def ready(self, admin: str, secret: str, *nodes: int, timeout: float = 60.0) -> None:
        """Until every node takes an MQTT connection and a QoS 1 subscription (JetStream answers:
        after a start or a node loss it says "temporarily unavailable" for a while)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for i in nodes or range(len(self.ports)):
            while True:
                proc = self.procs.get(i)
                assert proc is not None and proc.poll() is None, f"nats node {i + 1} exited: see {self.conf}"
                try:
                    client = await MqttClient.connect("127.0.0.1", self.mqtt_ports[i], client_id=f"probe-{i}",
                                                      username=admin, password=secret, on_message=lambda t, p: None,
                                                      timeout=5)
                    try:
                        codes = await client.subscribe([(f"henge/probe/{i}", 1)], timeout=5)
                        if codes and codes[0] < 0x80:
                            break
                    finally:
                        client.close()
                except (MqttClientError, OSError, TimeoutError):
                    pass
                assert loop.time() < deadline, f"nats node {i + 1} never became ready"
                await asyncio.sleep(0.2)


def configure(data: Path, conf: Path, ports: list[tuple[int, int, int]], *extra: str
              ) -> subprocess.CompletedProcess[str]:
    nodes = [arg for c, r, m in ports for arg in ("--node", f"127.0.0.1:{c}:{r}:{m}")]
    return henge_cli("broker-config", "nats", "--data", str(data), "--out", str(conf), *nodes, *extra)


def cluster_ports() -> list[tuple[int, int, int]]:
    flat = free_ports(9)
    return [(flat[i], flat[i + 3], flat[i + 6]) for i in range(3)]


@contextlib.asynccontextmanager
async def nats_cluster(tmp_path: Path, devices: list[str]) -> AsyncIterator[tuple[NatsCluster, dict[str, str]]]:
    """The store with ``devices`` (their secrets returned), the cluster configured from it and running."""
    data = tmp_path / "data"
    store = Store(data)
    secrets = store.add_devices([(d, {}) for d in devices])
    store.ensure_admin("henge-admin", ADMIN_SECRET)
    store.close()
    (data / "admin.json").write_text(json.dumps({"name": "henge-admin", "secret": ADMIN_SECRET}))
    ports = cluster_ports()
    conf = tmp_path / "nats"
    done = configure(data, conf, ports)
    assert done.returncode == 0, done.stderr
    cluster = NatsCluster(conf, ports)
    cluster.start()
    try:
        await cluster.ready("henge-admin", ADMIN_SECRET)
        yield cluster, secrets
    finally:
        cluster.stop()


def nats_settings(data: Path, cluster: NatsCluster, **extra: Any) -> Settings:
    """henge in front of the cluster: MQTT through node 1, events from any node, identities through
    the accounts file and the reload script broker-config wrote."""
    values: dict[str, Any] = {
        "data_dir": data, "external_broker": f"mqtt://127.0.0.1:{cluster.mqtt_ports[0]}",
        "external_events": cluster.events_url, "external_events_resync": 1.0,
        "nats_accounts": cluster.conf / "accounts.conf", "nats_reload": str(cluster.conf / "reload"),
        "http": None,
    } | extra
    return Settings(**values)


@contextlib.asynccontextmanager
async def nats_service(tmp_path: Path, devices: list[str], **extra: Any
                       ) -> AsyncIterator[tuple[HengeService, NatsCluster, dict[str, str]]]:
    async with nats_cluster(tmp_path, devices) as (cluster, secrets), \
            HengeService(nats_settings(tmp_path / "data", cluster, **extra)) as service:
        await service.broker.wait_connected(10)  # type: ignore[attr-defined]
        await wait_events(service)
        yield service, cluster, secrets


async def wait_events(service: HengeService, timeout: float = 20.0) -> None:
    """Until the service has read one snapshot of the cluster's connections (presence is known)."""
    events = service.broker._events  # type: ignore[attr-defined]
    start = events.snapshots
    deadline = time.monotonic() + timeout
    while events.snapshots <= start:
        assert time.monotonic() < deadline, "no snapshot of the cluster's connections"
        await asyncio.sleep(0.05)
