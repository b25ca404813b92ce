"""External mode at fleet size: henge in front of a real Mosquitto (or a 3-node NATS cluster), and the
broker alone in the same run.

    python bench/external.py [--n 10000] [--workers 2] [--broker mosquitto|nats]

With ``--broker nats``, ``henge broker-config nats`` writes a 3-node cluster (JetStream and MQTT on
each node, on loopback ports); the devices are spread over the three nodes and do not announce
themselves (presence comes from the cluster's connection events); henge publishes through node 1.

Mosquitto is configured by ``henge broker-config mosquitto`` (a password file and an ACL for every
device and the admin). The load generator's devices connect to Mosquitto, subscribe to their config
and announce themselves (a retained ``henge/devices/<id>/presence/device``, as the agent does).

- ``connect_s``: every device connected, subscribed and announced;
- ``online_seen_s``: from the first connect until ``henge status`` counts all N online;
- ``push_s``: ``henge push --all`` until every device holds the new version, against ``one_client_s``:
  one client publishing the same N retained messages to the same Mosquitto (the target: <= 2x);
- ``restart_online_s``: henge stopped and started again, from the start until it counts N online.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncio

import loadgen
import run

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("a condition never held")
        time.sleep(0.05)


class HengeExternal(run.Target):
    name = "henge-external"

    def make_store(self) -> None:
        """The data dir with every device and the admin identity; the devices get their secrets."""
        from henge_mqtt.service.auth import admin_secret
        from henge_mqtt.store import Store

        self.data = self.tmp / "data"
        self.data.mkdir(mode=0o700, exist_ok=True)  # (a PostgreSQL store makes no file in it)
        store = Store(self.data, url=self.store_url)
        secrets = store.add_devices([(d, {}) for d, _ in self.devices])
        self.admin_secret = admin_secret(self.data, "henge-admin")
        store.ensure_admin("henge-admin", self.admin_secret)
        store.close()
        self.devices = [(d, secrets[d]) for d, _ in self.devices]

    def start(self) -> None:
        from henge_mqtt.service.mosquitto import identities, write_mosquitto_config

        self.make_store()
        self.admin_port = run.free_port()
        hashes, *_ = identities(self.data, "henge-admin")
        conf = self.tmp / "mosquitto"
        write_mosquitto_config(conf, hashes, device_listener=f"127.0.0.1:{self.port}",
                               admin_listener=f"127.0.0.1:{self.admin_port}", topic_prefix="henge",
                               admin_name="henge-admin", run_as="root" if os.geteuid() == 0 else "mosquitto")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = subprocess.Popen([binary, "-c", str(conf / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        run.wait_port(self.port)
        run.wait_port(self.admin_port)
        self.start_service()

    def start_service(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "henge_mqtt", "serve", "--data", str(self.data), "--no-http",
             "--broker", f"mqtt://127.0.0.1:{self.admin_port}", "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def online(self, timeout: float = 5.0) -> int:
        where = ["--data", str(self.data)]
        env = None
        if self.store_url:  # two instances: whichever is active answers through the broker
            where = ["--broker", f"mqtt://127.0.0.1:{self.admin_port}"]
            env = {**os.environ, "HENGE_ADMIN_USER": "henge-admin", "HENGE_ADMIN_SECRET": self.admin_secret}
        out = subprocess.run([sys.executable, "-m", "henge_mqtt", "status", "--summary", "--json", *where,
                              "--timeout", str(timeout)], capture_output=True, text=True, cwd=ROOT, env=env)
        return int(json.loads(out.stdout)["online"]) if out.returncode == 0 else -1

    patience = 120.0  # seconds a push or a count may take
    store_url: str | None = None  # --failover: the store in PostgreSQL, shared by two instances
    standby: subprocess.Popen[bytes] | None = None  # --failover: the instance waiting for the lease

    def logged(self, event: str, log_name: str = "henge") -> float | None:
        """When the service's log last said ``event`` (a time.time()), if it logs at that level."""
        import datetime

        log = self.tmp / f"{log_name}.log"
        lines = [line for line in log.read_text().splitlines() if f" {event}" in line] if log.exists() else []
        if not lines:
            return None
        stamp = datetime.datetime.strptime(" ".join(lines[-1].split()[:2]), "%Y-%m-%d %H:%M:%S,%f")
        return stamp.timestamp()

    def wait_online(self, n: int, timeout: float | None = None) -> float:
        timeout = timeout or self.patience
        started = time.time()
        while self.online() < n:
            if time.time() - started > timeout:
                raise TimeoutError(f"henge never counted {n} online (last count: {self.online()})")
            time.sleep(0.1)
        return time.time()

    def push(self, marker: str) -> None:
        cfg = self.tmp / "fleet.json"
        cfg.write_text(json.dumps({"m": marker}))
        subprocess.run([sys.executable, "-m", "henge_mqtt", "push", "--all", str(cfg), "--data", str(self.data),
                        "--timeout", str(self.patience)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

    def one_client(self, marker: str) -> None:
        topics = [(run.TOPIC.format(device=d), json.dumps({"device": d, "version": 99, "config": {"m": marker}})
                   .encode()) for d, _ in self.devices]
        asyncio.run(loadgen.publish_all("127.0.0.1", self.admin_port, topics, "henge-admin", self.admin_secret,
                                        timeout=self.patience))

    def stop_all(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.broker.terminate()
        self.broker.wait(timeout=20)


class HengeNats(HengeExternal):
    name = "henge-nats"
    patience = 300.0  # NATS stores every retained message in JetStream before it acknowledges it

    def start(self) -> None:
        from henge_mqtt.natsconf import EVENTS_USER, nodes
        from henge_mqtt.paths import EVENTS_FILE
        from henge_mqtt.service.auth import admin_secret
        from henge_mqtt.service.mosquitto import identities
        from henge_mqtt.service.nats import write_nats_config

        self.make_store()
        ports = [run.free_port() for _ in range(9)]
        cluster = nodes([f"127.0.0.1:{ports[i]}:{ports[i + 3]}:{ports[i + 6]}" for i in range(3)])
        self.client_ports = [n.client_port for n in cluster]
        self.mqtt_ports = [n.mqtt_port for n in cluster]
        self.port = self.admin_port = self.mqtt_ports[0]
        hashes, *_ = identities(self.data, "henge-admin", kind="bcrypt", url=self.store_url)
        self.conf = self.tmp / "nats"
        write_nats_config(self.conf, hashes, cluster=cluster, admin_name="henge-admin", prefix="henge",
                          events_secret=admin_secret(self.data, EVENTS_USER, EVENTS_FILE))
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.brokers = []
        for n in cluster:
            with (self.conf / f"{n.name}.log").open("wb") as log:
                self.brokers.append(subprocess.Popen([binary, "-c", str(self.conf / f"{n.name}.conf")],
                                                     stdout=log, stderr=log))
        for port in self.mqtt_ports:
            run.wait_port(port, 60)
        time.sleep(5)  # JetStream elects its leaders (the first subscriptions are refused until it has)
        self.start_service()

    def start_service(self) -> None:
        if not self.store_url:
            self.proc = self.serve(self.data, "henge")
            return
        # --failover: instance a becomes active; b waits as its standby
        self.proc = self.serve(self.instance("a"), "a", "--store", self.store_url)
        wait_until(lambda: not json.loads((self.tmp / "a" / "service.json").read_text()).get("standby", False)
                       if (self.tmp / "a" / "service.json").exists() else False, 60)
        self.standby = self.serve(self.instance("b"), "b", "--store", self.store_url)
        wait_until(lambda: b"store.standby" in (self.tmp / "b.log").read_bytes(), 60)

    def instance(self, name: str) -> Path:
        """A data dir for one of two instances: the same identities on both machines."""
        from henge_mqtt.paths import EVENTS_FILE

        data = self.tmp / name
        data.mkdir(mode=0o700)
        for secret_file in ("admin.json", EVENTS_FILE):
            shutil.copy(self.data / secret_file, data / secret_file)
        return data

    def serve(self, data: Path, log_name: str, *extra: str) -> subprocess.Popen[bytes]:
        events = "nats://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)
        return subprocess.Popen(
            [sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--no-http",
             "--broker", f"mqtt://127.0.0.1:{self.admin_port}", "--broker-events", events,
             "--nats-accounts", str(self.conf / "accounts.conf"), "--nats-reload", str(self.conf / "reload"),
             "--log-level", "info", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=(self.tmp / f"{log_name}.log").open("ab"))

    def stop_all(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if self.standby is not None and self.standby.poll() is None:
            self.standby.terminate()
            self.standby.wait(timeout=30)
        for broker in self.brokers:
            broker.terminate()
        for broker in self.brokers:
            broker.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--broker", choices=["mosquitto", "nats"], default="mosquitto")
    parser.add_argument("--no-push", action="store_true", help="connect, count online, restart: no fleet pushes")
    parser.add_argument("--failover", action="store_true", help="NATS: two instances on a PostgreSQL store (a "
                        "throwaway cluster, as the tests start one); kill -9 the active one instead of a restart")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-external-{args.broker}-"))
    target = HengeNats(args.n, tmp) if args.broker == "nats" else HengeExternal(args.n, tmp)
    postgres = None
    if args.failover:
        if not isinstance(target, HengeNats):
            parser.error("--failover is measured with --broker nats")
        sys.path.insert(0, str(ROOT))
        from tests.pg import Cluster

        postgres = Cluster()
        target.store_url = postgres.new_database()
    target.start()
    if isinstance(target, HengeNats):
        fleet = run.LoadWorkers(target, args.workers, announce=False, ports=target.mqtt_ports)
    else:
        fleet = run.LoadWorkers(target, args.workers, announce=True)
    result: dict[str, Any] = {"n": args.n, "broker": args.broker}
    try:
        started = time.time()
        replies = fleet.connect()
        result["connect_failed"] = sum(r["failed"] for r in replies)
        if result["connect_failed"]:
            print("connect errors:", [r["errors"][:2] for r in replies], file=sys.stderr)
        result["connect_s"] = max(r["done_at"] for r in replies) - started - 0.5
        connected = args.n - result["connect_failed"]  # (NATS drops a connect in a storm now and then)
        result["online_seen_s"] = target.wait_online(connected) - started - 0.5

        def delivered(push: Any) -> float:
            marker = uuid.uuid4().hex
            for q in fleet.commands:
                q.put({"cmd": "await_push", "marker": marker, "timeout": target.patience, "ping": False})
            t0 = time.time()
            push(marker)
            replies = [fleet.results.get(timeout=target.patience + 180) for _ in fleet.commands]
            missing = sum(r["missing"] for r in replies)
            if missing:  # said, not hidden: the time is then that of the deliveries that came
                print(f"{missing} of {args.n} devices never got the push within {target.patience:.0f} s",
                      file=sys.stderr)
            return max(r["last"] for r in replies) - t0, missing

        if not args.no_push:
            result["one_client_s"], result["one_client_missing"] = delivered(target.one_client)
            result["push_s"], result["push_missing"] = delivered(target.push)
            result["push_ratio"] = result["push_s"] / result["one_client_s"]
        if args.failover:
            assert isinstance(target, HengeNats) and target.proc is not None
            killed = time.time()
            spy = None
            if os.environ.get("BENCH_PYSPY"):  # what the new active spends its first seconds on
                spy = subprocess.Popen(["py-spy", "record", "-d", "10", "-r", "50", "-p", str(target.standby.pid),
                                        "--threads", "--format", "raw", "-o", os.environ["BENCH_PYSPY"]],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target.proc.kill()
            target.proc.wait()
            # Polled as operators would: a `henge status --summary` started every 0.5 s, each given 5 s
            # (one after another, a request sent while no instance is active waits out its timeout,
            # and that wait, not the service, would be measured). The first that counts all N wins.
            from concurrent.futures import ThreadPoolExecutor

            polls: list[tuple[float, float, int]] = []

            def poll() -> None:
                asked = time.time()
                count = target.online(timeout=5.0)
                polls.append((asked, time.time(), count))

            with ThreadPoolExecutor(16) as pool:
                while not any(n >= connected for _, _, n in polls):
                    if time.time() - killed > target.patience:
                        raise TimeoutError(f"never {connected} online after the failover: {polls[-3:]}")
                    pool.submit(poll)
                    time.sleep(0.5)
            online = min(at for _, at, n in polls if n >= connected)
            polls = sorted(p for p in polls if p[1] <= online + 1)
            if spy is not None:
                spy.wait()
            active, known = target.logged("store.active", "b"), target.logged("external.presence_known", "b")
            assert active is not None and known is not None, "b's log does not say when it took over"
            result.update(failover_active_s=active - killed, failover_known_after_active_s=known - active,
                          failover_online_after_active_s=online - active, failover_online_after_kill_s=online - killed,
                          failover_polls=[(round(a - active, 2), round(b - active, 2), n) for a, b, n in polls[-6:]])
            target.proc, target.standby = target.standby, None
        else:
            target.stop()
            started = time.time()
            target.start_service()
            result["restart_online_s"] = target.wait_online(connected) - started
            # From henge's own log (NATS: --log-level info): when the restarted service had started, and
            # when it knew every connection; the CLI's count above is what a user sees.
            for key, line in (("restart_started_s", "service.started"),
                              ("restart_known_s", "external.presence_known")):
                at = target.logged(line)
                if at is not None:
                    result[key] = at - started
            if "restart_started_s" in result:
                result["online_after_started_s"] = result["restart_online_s"] - result["restart_started_s"]
    finally:
        fleet.close()
        target.stop_all()
        if postgres is not None:
            postgres.stop()
    run.save_result("external" if args.broker == "mosquitto" else
                    "external-nats-failover" if args.failover else "external-nats", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
