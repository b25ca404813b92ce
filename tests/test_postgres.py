"""The store on PostgreSQL (`henge serve --store postgresql://...`, docs/scaling.md#postgresql): the
same service, the same contract, a real PostgreSQL cluster (tests/pg.py), and `henge migrate`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from henge_mqtt.device import Agent
from henge_mqtt.errors import StoreError
from henge_mqtt.service import HengeService
from henge_mqtt.service.migrate import NOT_COPIED, TABLES
from henge_mqtt.store import ReportedMessage, Store

from .conftest import ROOT, Running, henge_cli, make_settings, wait_status, wait_until
from .ports import free_port as _free_port


async def accept(config: dict[str, Any]) -> None:
    return None


async def test_the_service_on_postgres_keeps_everything_across_instances(pg_url: str, tmp_path: Path) -> None:
    """Two service instances on different data dirs, one after the other, on one PostgreSQL store."""
    first = make_settings(tmp_path / "a", store=pg_url)
    async with HengeService(first) as svc:
        running = Running(svc, tmp_path / "a")
        secret = await svc.add_device("cam1", {"site": "berlin"})
        await svc.push("cam1", {"port": 80})
        stop = asyncio.Event()
        agent = asyncio.create_task(Agent("127.0.0.1", running.port, "cam1", secret, accept,
                                          tmp_path / "cam1.json").run(stop))
        try:
            await wait_status(running, "cam1", lambda r: r["online"] and r["sync"] == "in_sync")
            await svc.set_schema({}, {"properties": {"port": {"type": "integer"}}})
            await svc.set_layer("fleet", {"ntp": "a"})
            rollout = await svc.start_rollout({"port": 443}, all_devices=True, waves=[100], min_applied=100)

            async def done() -> bool:
                return (await svc.rollout_status(rollout["id"]))["state"] == "completed"

            await wait_until(done, 15)
            await wait_status(running, "cam1", lambda r: r["sync"] == "in_sync" and r["desired_version"] == 3)
        finally:
            stop.set()
            await agent
        token = (await svc.create_token("ops", "operator"))["token"]
    second = make_settings(tmp_path / "b", store=pg_url)
    async with HengeService(second) as svc:
        row = (await svc.status("cam1"))[0]
        assert (row["desired_version"], row["applied_version"], row["reason"]) == (3, 3, "server_start")
        assert (await svc.get_version("cam1")).config == {"ntp": "a", "port": 443}
        assert [v.version for v in await svc.history("cam1")] == [1, 2, 3]
        assert (await svc.list_schemas())[0]["schema"] == "fleet"
        assert (await svc.list_rollouts())[0]["state"] == "completed"
        assert svc.verify_token(token) == ("ops", "operator")
        actions = [e["action"] for e in await svc.audit()]
        assert actions[:2] == ["device.add", "push"] and "rollout.complete" in actions
        assert svc.store.verify_device("cam1", secret)


async def test_serve_with_store_and_the_cli(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", "0",
                             "--no-http", "--store", pg_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: (data / "service.json").exists() or proc.poll() is not None, 20)
        assert proc.poll() is None
        added = await asyncio.to_thread(henge_cli, "device", "add", "d1", "--data", str(data), "--json")
        assert added.returncode == 0, added.stderr
        pushed = await asyncio.to_thread(henge_cli, "push", "d1", "-", "--data", str(data), input='{"a": 1}')
        assert pushed.returncode == 0 and "version 1" in pushed.stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    store = Store(tmp_path / "elsewhere", url=pg_url)
    try:
        assert store.get_version("d1").config == {"a": 1}
    finally:
        store.close()
    bad = henge_cli("serve", "--data", str(tmp_path / "e"), "--port", "0", "--no-http", "--store",
                    "postgresql://henge:secret@127.0.0.1:1/nowhere", timeout=30)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot open the store at postgresql://henge:***@127.0.0.1:1/nowhere")
    assert "secret" not in bad.stderr


async def test_migrate_sqlite_to_postgres_and_back(pg_url: str, tmp_path: Path, postgres: Any) -> None:
    data = tmp_path / "sqlite"
    async with HengeService(make_settings(data)) as svc:
        for i in range(5):
            await svc.add_device(f"m{i}", {"site": "x" if i % 2 else "y"})
            await svc.push(f"m{i}", {"n": i})
            await svc.push(f"m{i}", {"n": i + 10})
        await svc.set_layer("site-x", {"tz": "UTC"}, labels={"site": "x"})
        await svc.create_token("t", "viewer")
        claim = await svc.create_claim("batch", {"site": "x"}, 3, 3600)
        before = {d: [v.model_dump() for v in await svc.history(d)] for d in (f"m{i}" for i in range(5))}
        audit_before = await svc.audit(limit=1000)
    # Every table of the schema is copied, or named as not copied (a table added later and
    # forgotten here would be lost on every migration: claims, reported state and presence
    # history were, until 2026-12-04).
    store = Store(data)
    try:
        tables = {name for (name,) in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                        "AND name NOT LIKE 'sqlite_%'")}
        store.save_sessions({}, {}, history=[("m1", 1000.0, "online", "connect", 3)])
        store.record_device_words([], [ReportedMessage("m2", {"fw": "2.1"}, patch=False, epoch=4)], 65536, 5)
    finally:
        store.close()
    assert tables == set(TABLES) | set(NOT_COPIED)
    moved = await asyncio.to_thread(henge_cli, "migrate", "--from", str(data), "--to", pg_url, "--json")
    assert moved.returncode == 0, moved.stderr
    counts = json.loads(moved.stdout)
    assert (counts["devices"], counts["config_versions"], counts["layers"], counts["api_tokens"]) == (5, 12, 1, 1)
    again = await asyncio.to_thread(henge_cli, "migrate", "--from", str(data), "--to", pg_url)
    assert again.returncode == 1 and "migrate into an empty store" in again.stderr
    assert counts["claims"] == 1 and counts["presence_history"] >= 1 and counts["reported"] == 1
    async with HengeService(make_settings(tmp_path / "pg-instance", store=pg_url)) as svc:
        after = {d: [v.model_dump() for v in await svc.history(d)] for d in before}
        assert after == before
        assert (await svc.audit(limit=1000)) == audit_before
        assert [c["name"] for c in await svc.list_claims()] == ["batch"] and claim["name"] == "batch"
        assert (await svc.reported("m2"))["document"] == {"fw": "2.1"}
        await svc.push("m0", {"n": 99})  # the audit sequence goes on after the copied ids
        assert (await svc.audit(limit=1))[0]["id"] == audit_before[-1]["id"] + 1
    back = await asyncio.to_thread(henge_cli, "migrate", "--from", pg_url, "--to", str(tmp_path / "back"), "--json")
    assert back.returncode == 0, back.stderr
    store = Store(tmp_path / "back")
    try:
        assert store.get_version("m0").config == {"n": 99} and len(store.history("m3")) == 3  # 2 pushes, 1 layer
        assert list(store.layers()) == ["site-x"]
    finally:
        store.close()


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
def test_a_storm_of_sessions_is_saved_in_one_transaction_on_either_store(where: str, postgres: Any,
                                                                         tmp_path: Path) -> None:
    """The group commit of 1,200 devices (more than one multi-row statement on PostgreSQL): epochs
    only rise, last-seen records with and without a remote, presence history of known devices, and
    a shutdown's devices written set-wise."""
    store = Store(tmp_path, url=postgres.new_database() if where == "postgres" else None)
    try:
        ids = [f"d{i:04}" for i in range(1200)]
        store.add_devices([(d, {}) for d in ids])
        store.save_sessions({d: 5 for d in ids}, {})
        store.save_sessions({d: 3 if i % 2 else 7 for i, d in enumerate(ids)},
                            {d: (1000.0 + i, None if i % 3 else f"10.0.0.{i % 250}:1", "takeover")
                             for i, d in enumerate(ids)},
                            history=[(d, 2000.0 + i, "online", None if i % 2 else "connect", i) for i, d in
                                     enumerate(ids)] + [("gone", 1.0, "online", None, 1)])
        epochs = store.epochs()
        assert all(epochs[d] == (5 if i % 2 else 7) for i, d in enumerate(ids))
        sessions = {d: (seen, remote) for d, _, seen, remote in store.sessions()}
        assert sessions["d0000"] == (1000.0, "10.0.0.0:1") and sessions["d0001"] == (1001.0, None)
        before, changes = store.presence_timeline("d0001", 0.0)
        assert before is None and changes == [(2001.0, "online", None, 1)]
        assert store.presence_timeline("d1199", 0.0)[1] == [(3199.0, "online", None, 1199)]
        # A shutdown: every device offline at once, one statement for all, on each one's epoch; the
        # address it was last seen at kept; a device removed meanwhile (or never known) is no row.
        store.save_sessions({"d0002": 9}, {}, shutdown={5000.0: [*ids[:1000], "gone"]})
        sessions = {d: (seen, remote) for d, _, seen, remote in store.sessions()}
        assert sessions["d0000"] == (5000.0, "10.0.0.0:1") and sessions["d0999"][0] == 5000.0
        assert sessions["d1000"] == (1000.0 + 1000, None if 1000 % 3 else "10.0.0.0:1")
        assert store.presence_timeline("d0002", 0.0)[1][-1] == (5000.0, "offline", "server_shutdown", 9)
        assert store.presence_timeline("d0999", 0.0)[1][-1] == (5000.0, "offline", "server_shutdown", 5)
        assert store.presence_timeline("d1000", 0.0)[1][-1] == (3000.0, "online", "connect", 1000)
        assert store.presence_timeline("gone", 0.0) == (None, [])
    finally:
        store.close()


def test_a_bad_url_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape("cannot open the store at postgresql://u:***@127.0.0.1:1/x")):
        Store(tmp_path, url="postgresql://u:pw@127.0.0.1:1/x")


def test_the_lease_fences_a_stale_writer(pg_url: str, tmp_path: Path) -> None:
    """Store level: one holder at a time; a takeover bumps the token; the old holder writes nothing."""
    from henge_mqtt.errors import Fenced
    from henge_mqtt.store.pg import Lease

    a, b = Store(tmp_path / "a", url=pg_url), Store(tmp_path / "b", url=pg_url)
    lease_a, lease_b = Lease(pg_url), Lease(pg_url)
    try:
        token, _ = lease_a.take("A", 3.0)
        assert token == 1
        assert lease_b.take("B", 3.0) == (None, "A")
        a.fence = ("A", token)
        a.add_device("d1")
        b._db.execute("UPDATE lease SET expires = 0 WHERE id = 1")  # A stalled past its TTL
        taken, _ = lease_b.take("B", 3.0)
        assert taken == 2
        b.fence = ("B", taken)
        b.reload()  # as the service does on taking over
        with pytest.raises(Fenced, match="lost the store's lease"):
            a.push("d1", {"x": 1}, actor="zombie")
        assert not lease_a.renew("A", token, 3.0)
        b.push("d1", {"x": 2}, actor="active")
        assert [v.config for v in b.history("d1")] == [{"x": 2}]
    finally:
        for closable in (a, b, lease_a, lease_b):
            closable.close()


class HaPair:
    """One PostgreSQL store, one Mosquitto configured from it, and `henge serve --broker ... --store ...`
    instances started on data dirs of their own sharing one admin secret (docs/scaling.md#high-availability)."""

    SECRET = "admin-secret-shared-by-both-instances"

    def __init__(self, pg_url: str, tmp_path: Path, devices: list[str]) -> None:
        import os
        import shutil

        from henge_mqtt.service.mosquitto import write_mosquitto_config

        self.pg_url, self.tmp_path = pg_url, tmp_path
        store = Store(tmp_path / "setup", url=pg_url)
        self.secrets = {device: store.add_device(device) for device in devices}
        store.ensure_admin("henge-admin", self.SECRET)
        hashes, _ = store.broker_hashes()
        store.close()
        self.device_port, self.admin_port = _free_port(), _free_port()
        write_mosquitto_config(tmp_path / "mosq", hashes, device_listener=f"127.0.0.1:{self.device_port}",
                               admin_listener=f"127.0.0.1:{self.admin_port}", topic_prefix="henge",
                               admin_name="henge-admin", run_as="root" if os.geteuid() == 0 else "mosquitto")
        self.mosquitto = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                           str(tmp_path / "mosq" / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        self.instances: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        import os

        data = self.tmp_path / name
        data.mkdir(mode=0o700)
        (data / "admin.json").write_text(json.dumps({"name": "henge-admin", "secret": self.SECRET}))
        os.chmod(data / "admin.json", 0o600)
        with self.log(name).open("wb") as log:
            self.instances[name] = subprocess.Popen(
                [sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--no-http", "--store",
                 self.pg_url, "--broker", f"mqtt://127.0.0.1:{self.admin_port}"], cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=log)

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def active(self, name: str) -> bool:
        return _active(self.tmp_path / name)

    def kill(self, name: str) -> None:
        import signal

        self.instances[name].send_signal(signal.SIGKILL)
        self.instances[name].wait()

    def close(self) -> None:
        for proc in self.instances.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)
        self.mosquitto.terminate()
        self.mosquitto.wait(timeout=20)




def _active(data: Path) -> bool:
    """An instance that is active (a standby writes service.json too, marked ``standby``)."""
    try:
        return not json.loads((data / "service.json").read_text()).get("standby")
    except (OSError, ValueError):
        return False


def test_failover_kill_minus_nine_the_active_instance_during_pushes(pg_url: str, tmp_path: Path) -> None:
    """Two `henge serve --broker ... --store postgresql://...` on different data dirs, one Mosquitto:
    one is active, the other waits; kill -9 the active one during a stream of pushes through the
    broker: the standby takes over within 5 s and serves the CLI; no push that succeeded is lost or
    stored twice."""
    import os
    import time

    ha = HaPair(pg_url, tmp_path, ["d1"])
    env = {**os.environ, "HENGE_ADMIN_USER": "henge-admin", "HENGE_ADMIN_SECRET": ha.SECRET}

    def push(n: int) -> bool:
        done = subprocess.run([sys.executable, "-m", "henge_mqtt", "push", "d1", "-", "--broker",
                               f"mqtt://127.0.0.1:{ha.admin_port}", "--timeout", "3"], input=json.dumps({"n": n}),
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
        return done.returncode == 0

    def wait_for(check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    succeeded: list[int] = []
    try:
        ha.start("a")
        wait_for(lambda: ha.active("a"), 20, "the first instance never became active")
        ha.start("b")
        wait_for(lambda: b"store.standby" in ha.log("b").read_bytes(), 20, "b never said it waits")
        assert not ha.active("b")
        n = 0
        for _ in range(4):
            n += 1
            assert push(n)
            succeeded.append(n)
        ha.kill("a")
        killed = time.monotonic()
        wait_for(lambda: ha.active("b"), 10, "the standby never took over")
        took_over = time.monotonic() - killed
        print(f"failover: standby active {took_over:.2f} s after the kill")
        assert took_over < 5, took_over
        first_after = None
        while len(succeeded) < 8:
            n += 1
            if push(n):
                succeeded.append(n)
                first_after = first_after or time.monotonic() - killed
            assert time.monotonic() - killed < 30, "the CLI never reached the new active instance"
        assert first_after is not None and first_after < 10
    finally:
        ha.close()
    store = Store(tmp_path / "check", url=pg_url)
    try:
        history = store.history("d1")
        assert [v.version for v in history] == list(range(1, len(history) + 1))  # none lost, none twice
        stored = [v.config["n"] for v in history]
        assert len(stored) == len(set(stored))
        assert set(succeeded) <= set(stored)
    finally:
        store.close()


async def test_failover_keeps_presence_and_a_standby_dir_leads_the_cli_to_the_active_one(
        pg_url: str, tmp_path: Path) -> None:
    """Issue 19: kill -9 of the active instance with 12 devices connected behind Mosquitto: the new
    active one reads the retained announcements before it publishes any presence, so no connected
    device is ever shown offline; and `henge ... --data STANDBY_DIR` reaches the active instance."""
    import time

    import aiomqtt

    from henge_mqtt.backoff import Backoff

    ha = HaPair(pg_url, tmp_path, [f"p{i:02d}" for i in range(12)])
    seen: list[tuple[float, str, str]] = []  # (when, device, state) of every retained presence record

    async def watch_presence(ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", ha.admin_port, username="henge-admin", password=ha.SECRET,
                                  identifier="presence-watcher") as client:
            await client.subscribe("henge/devices/+/presence", qos=1)
            ready.set()
            async for message in client.messages:
                if isinstance(message.payload, bytes) and message.payload:
                    body = json.loads(message.payload)
                    seen.append((time.monotonic(), body["device"], body["state"]))

    def online_now() -> set[str]:
        state: dict[str, str] = {}
        for _, device, what in seen:
            state[device] = what
        return {d for d, what in state.items() if what == "online"}

    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        ha.start("a")
        await wait_until(lambda: ha.active("a"), 20, "the first instance to become active")
        ha.start("b")
        await wait_until(lambda: b"store.standby" in ha.log("b").read_bytes(), 20, "b to wait")
        standby = json.loads((tmp_path / "b" / "service.json").read_text())
        assert standby["standby"] is True and standby["port"] == ha.admin_port
        # The CLI on the standby's data dir: answered by the active instance, through the broker.
        listed = await asyncio.to_thread(henge_cli, "status", "--data", str(tmp_path / "b"), "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(r["device"] for r in json.loads(listed.stdout)) == sorted(ha.secrets)
        for device, device_secret in ha.secrets.items():
            tasks.append(asyncio.create_task(Agent(
                "127.0.0.1", ha.device_port, device, device_secret, accept, tmp_path / f"{device}.json",
                backoff=Backoff(base=0.05, cap=0.5), mqtt5=False).run(stop)))
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(watch_presence(ready)))
        await asyncio.wait_for(ready.wait(), 10)
        await wait_until(lambda: online_now() == set(ha.secrets), 20, "every device online")
        ha.kill("a")
        killed = time.monotonic()
        await wait_until(lambda: ha.active("b"), 10, "the standby to take over")
        await wait_until(lambda: b"external.presence_known online=12" in ha.log("b").read_bytes(), 20,
                         "the new active instance to read the announcements")
        await wait_until(lambda: any(t > killed and what == "online" for t, _, what in seen), 20,
                         "the new active instance to publish presence")
        await asyncio.sleep(0.5)  # let any presence it published at that moment arrive (none may be offline)
        flipped = [(device, round(t - killed, 2)) for t, device, what in seen if t > killed and what == "offline"]
        assert flipped == [], f"connected devices shown offline after the failover: {flipped}"
        assert online_now() == set(ha.secrets)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ha.close()


def test_scaling_md_high_availability_block_runs_on_a_fresh_data_dir(pg_url: str, tmp_path: Path) -> None:
    """docs/scaling.md's high-availability block as written (paths, URL and ports substituted): its
    broker-config on a data dir that does not exist yet creates it (issue 19: it failed with
    FileNotFoundError), Mosquitto takes the result, and `henge serve` in front of it answers the CLI."""
    import os
    import shlex
    import shutil
    import tempfile
    import time

    text = (ROOT / "docs" / "scaling.md").read_text()
    block = text[text.index("## High availability"):]
    lines = [line.split("  #")[0].strip() for line in
             re.search(r"```sh\n(.*?)```", block, re.S).group(1).splitlines()]  # type: ignore[union-attr]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert [c.split()[:2] for c in commands] == [["henge", "broker-config"], ["henge", "serve"]]
    base = Path(tempfile.mkdtemp(prefix="henge-ha-", dir="/tmp"))
    os.chmod(base, 0o755)  # mosquitto, as its own user, must reach its config below here
    device_port, admin_port = _free_port(), _free_port()

    def argv(command: str) -> list[str]:
        command = (command.replace("/etc/mosquitto/henge", str(base / "etc"))
                   .replace("/var/lib/henge", str(base / "data")).replace("postgresql://henge@db/henge", pg_url)
                   .replace("mqtt://broker:1884", f"mqtt://127.0.0.1:{admin_port}"))
        return [sys.executable, "-m", "henge_mqtt", *shlex.split(command)[1:]]

    assert not (base / "data").exists()
    configured = subprocess.run([*argv(commands[0]), "--device-listener", f"127.0.0.1:{device_port}",
                                 "--admin-listener", f"127.0.0.1:{admin_port}"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert configured.returncode == 0, configured.stderr
    assert (base / "data" / "admin.json").exists() and (base / "etc" / "mosquitto.conf").exists()
    mosquitto = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                  str(base / "etc" / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    log = base / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([*argv(commands[1]), "--no-http"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 30
        said = f"devices connect to the broker at mqtt://127.0.0.1:{device_port} (from broker-config)"
        # The banner comes just after the service is active (service.json first): wait for both.
        while not (_active(base / "data") and said in log.read_text()):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        added = henge_cli("device", "add", "ha1", "--data", str(base / "data"), timeout=30)
        assert added.returncode == 0, added.stderr
    finally:
        serve.terminate()
        serve.wait(timeout=20)
        mosquitto.terminate()
        mosquitto.wait(timeout=20)
        shutil.rmtree(base, ignore_errors=True)


def test_scaling_md_postgresql_block_runs_as_written(postgres: Any, tmp_path: Path) -> None:
    """docs/scaling.md's PostgreSQL block in order (createdb pointed at the test cluster, paths and
    ports substituted): a SQLite data dir with a device is moved into a new database, and `henge
    serve --store` in front of Mosquitto serves it."""
    import shlex
    import shutil
    import time

    from henge_mqtt.service.mosquitto import write_mosquitto_config

    text = (ROOT / "docs" / "scaling.md").read_text()
    block = text[text.index("## PostgreSQL"):]
    commands = [line.split("  #")[0].strip() for line in
                re.search(r"```sh\n(.*?)```", block, re.S).group(1).splitlines()]  # type: ignore[union-attr]
    assert [c.split()[0] for c in commands] == ["createdb", "henge", "henge"]
    data = tmp_path / "data"
    store = Store(data)
    store.add_device("moved1")
    store.ensure_admin("henge-admin", "admin-secret-of-the-docs-test")
    hashes, _ = store.broker_hashes()
    store.close()
    (data / "admin.json").write_text(json.dumps({"name": "henge-admin", "secret": "admin-secret-of-the-docs-test"}))
    device_port, admin_port = _free_port(), _free_port()
    write_mosquitto_config(tmp_path / "mosq", hashes, device_listener=f"127.0.0.1:{device_port}",
                           admin_listener=f"127.0.0.1:{admin_port}", topic_prefix="henge", admin_name="henge-admin",
                           run_as="root")
    mosquitto = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                  str(tmp_path / "mosq" / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    url = f"postgresql://henge@127.0.0.1:{postgres.port}/henge_docs"
    serve: subprocess.Popen[bytes] | None = None
    try:
        for command in commands:
            argv = shlex.split(command.replace("/var/lib/henge", str(data))
                               .replace("postgresql://henge@db/henge", url)
                               .replace("mqtt://127.0.0.1:1884", f"mqtt://127.0.0.1:{admin_port}"))
            if argv[0] == "createdb":
                argv = [argv[0], "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "henge", *argv[1:-1], "henge_docs"]
            else:
                argv = [sys.executable, "-m", "henge_mqtt", *argv[1:]]
            if "serve" in argv:
                log = tmp_path / "serve.log"
                with log.open("wb") as out:
                    serve = subprocess.Popen([*argv, "--no-http"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)
                deadline = time.monotonic() + 30
                while not _active(data):
                    assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                continue
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode == 0, (command, done.stderr)
        listed = henge_cli("device", "list", "--data", str(data), "--json", timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert [d["id"] for d in json.loads(listed.stdout)] == ["moved1"]
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=20)
        mosquitto.terminate()
        mosquitto.wait(timeout=20)


async def test_a_persistent_mqtt_session_survives_a_restart_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """Issue "Any MQTT client": the session (expiry, subscriptions) is in the PostgreSQL store too."""
    from . import mqtt_raw as raw

    async with HengeService(make_settings(tmp_path / "a", store=pg_url)) as svc:
        secret = await svc.add_device("s1")
        await svc.push("s1", {"v": 1})
        client = await raw.RawClient.open(svc.address[1])
        await client.send(raw.connect("s1", "s1", secret, clean=False))
        assert await client.connack() == 0
        await client.send(raw.subscribe(1, "henge/devices/s1/config"))
        assert (await client.read_packet())[0] == 9
        await client.send(raw.DISCONNECT)
        assert await client.closed_within(2)
        await wait_status(Running(svc, tmp_path / "a"), "s1", lambda r: not r["online"])
    async with HengeService(make_settings(tmp_path / "b", store=pg_url)) as svc:  # another instance, same store
        assert (await svc.status("s1"))[0]["session"]["persistent"]
        await svc.push("s1", {"v": 2})
        client = await raw.RawClient.open(svc.address[1])
        await client.send(raw.connect("s1", "s1", secret, clean=False))
        kind, body = await client.read_packet()
        assert (kind, body) == (2, b"\x01\x00")  # session present
        while True:  # without a SUBSCRIBE: the newest snapshot waited in the session
            first, payload = await client.read_frame()
            if first >> 4 == 3:
                break
        assert b'"v":2' in payload.replace(b" ", b"")
