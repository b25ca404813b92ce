"""Benchmark harness: the same scenarios against henge, Mosquitto (with and without auth) and amqtt.

    python bench/run.py --sizes 1000,3000,10000 [--targets henge,mosquitto-auth,mosquitto,amqtt]
                        [--workers 2] [--filter exact|wildcard] [--mqtt 3.1.1|5] [--session clean|persistent]

Scenarios per fleet size N: connect + subscribe all N; broker memory after connect (and per
device, against the idle process); a fleet-wide push delivered to all N (QoS 1, acknowledged),
with the first delivery and the worst PINGRESP of one device during it; a takeover storm
(min(N, 1000) devices reconnect at once with their own ids while their old sockets stay open);
clean shutdown with N connected. ``--filter wildcard`` subscribes every device to its own
``henge/devices/<id>/#`` instead of its config topic. Prints one table with ratios against
Mosquitto with a password file and an ACL (as a user deploys it) and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "henge/devices/{device}/config"
FILTERS = {"exact": "", "wildcard": "henge/devices/{device}/#"}
PHASE_TIMEOUT = 120.0
IDLE_WINDOW = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """The process and its descendants (henge's listener processes count as the broker's)."""
    pids, i = [pid], 0
    while i < len(pids):
        with contextlib.suppress(FileNotFoundError):  # it ended meanwhile
            pids += [int(c) for c in Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()]
        i += 1
    return pids


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds the process (and its children alive) has used so far."""
    user = system = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
        system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (and its children alive) has used so far."""
    return sum(cpu_times(pid))


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Target:
    name = ""

    def __init__(self, n: int, tmp: Path) -> None:
        self.n = n
        self.tmp = tmp
        self.port = free_port()
        self.devices: list[tuple[str, str | None]] = [(f"dev{i:05}", None) for i in range(n)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def push(self, marker: str) -> None:
        topics = [(TOPIC.format(device=d), json.dumps({"device": d, "version": 1, "config": {"m": marker}}).encode())
                  for d, _ in self.devices]
        asyncio.run(loadgen.publish_all("127.0.0.1", self.port, topics, None, None))

    def stop(self) -> float | None:
        assert self.proc is not None
        started = time.monotonic()
        if os.environ.get("BENCH_HENGE_LOG"):
            with open(os.environ["BENCH_HENGE_LOG"], "a") as log:
                log.write(f"bench: SIGTERM at {time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}\n")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        return time.monotonic() - started


class Henge(Target):
    name = "henge"
    listener_processes = 0
    loop = "auto"  # henge serve's default: uvloop where it is installed

    def start(self) -> None:
        from henge_mqtt.store import Store

        data = self.tmp / "data"
        store = Store(data)
        secrets = store.add_devices([(d, {}) for d, _ in self.devices])
        store.close()
        self.devices = [(d, secrets[d]) for d, _ in self.devices]
        self.data = data
        self.http_port = free_port()  # as deployed: the HTTP API and console on (on a free port here)
        http = ["--no-http"] if os.environ.get("BENCH_HENGE_NO_HTTP") else ["--http", f"127.0.0.1:{self.http_port}"]
        # BENCH_HENGE_LOG=FILE: the service's log at info level (timestamps of each step), appended.
        log_file = os.environ.get("BENCH_HENGE_LOG")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "henge_mqtt", "serve", "--data", str(data), "--port", str(self.port),
             "--log-level", "info" if log_file else "warning", *http,
             "--listener-processes", str(self.listener_processes), "--loop", self.loop],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log_file, "a") if log_file else subprocess.DEVNULL,  # noqa: SIM115
        )
        # The MQTT port only: a connection to the HTTP port would load its stack (FastAPI, uvicorn), which
        # henge loads for its first HTTP client; RSS is measured as deployed with nobody on the console,
        # then again after one page of it (``open_console``).
        wait_port(self.port)
        self.http = "--no-http" not in http

    def open_console(self) -> bool:
        """One GET of the console's page, as an operator opening it once; False with --no-http."""
        if not self.http:
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=30) as answer:
            answer.read()
        return True

    def push(self, marker: str) -> None:
        cfg = self.tmp / "fleet.json"
        cfg.write_text(json.dumps({"m": marker}))
        done = subprocess.run([sys.executable, "-m", "henge_mqtt", "push", "--all", str(cfg), "--data", str(self.data),
                               "--timeout", str(PHASE_TIMEOUT), "--json"], check=True, cwd=ROOT, capture_output=True)
        self.timings = json.loads(done.stdout).get("timings_ms")  # inside the service, from the request


class HengeListenerProcesses(Henge):
    """henge with its device sockets in listener processes (``BENCH_LISTENER_PROCESSES``, default 4)."""

    name = "henge-lp"
    listener_processes = int(os.environ.get("BENCH_LISTENER_PROCESSES", "4"))


class HengeAsyncio(Henge):
    """henge on asyncio's own event loop (``--loop asyncio``): what uvloop changes, in the same run."""

    name = "henge-asyncio"
    loop = "asyncio"


class StockAmqtt(Target):
    name = "amqtt"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "stock_amqtt.py"), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)


class Mosquitto(Target):
    name = "mosquitto"

    def start(self) -> None:
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                        "max_inflight_messages 0\npersistence false\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)


class MosquittoAuth(Target):
    """Mosquitto as a user would deploy it for this job: a password file and an ACL, no anonymous."""

    name = "mosquitto-auth"
    publisher = "bench-publisher"

    def start(self) -> None:
        import secrets as random_secrets

        from henge_mqtt.store import mosquitto_hash  # the same $7$ PBKDF2 hash mosquitto_passwd writes

        self.devices = [(d, random_secrets.token_urlsafe(24)) for d, _ in self.devices]
        self.publisher_secret = random_secrets.token_urlsafe(24)
        passwd = self.tmp / "passwd"
        passwd.write_text("".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in
                                  [*self.devices, (self.publisher, self.publisher_secret)]))
        acl = self.tmp / "acl"
        acl.write_text(f"user {self.publisher}\ntopic readwrite henge/#\n\npattern readwrite henge/devices/%u/#\n")
        conf = self.tmp / "mosquitto.conf"
        # As root, Mosquitto drops to the `mosquitto` user, which cannot read our private temp dir.
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                        f"acl_file {acl}\nmax_queued_messages 0\nmax_inflight_messages 0\npersistence false\n{user}")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def push(self, marker: str) -> None:
        topics = [(TOPIC.format(device=d), json.dumps({"device": d, "version": 1, "config": {"m": marker}}).encode())
                  for d, _ in self.devices]
        asyncio.run(loadgen.publish_all("127.0.0.1", self.port, topics, self.publisher, self.publisher_secret))


TARGETS = {"henge": Henge, "henge-asyncio": HengeAsyncio, "henge-lp": HengeListenerProcesses,
           "mosquitto-auth": MosquittoAuth, "mosquitto": Mosquitto, "amqtt": StockAmqtt}


def save_result(name: str, result: dict[str, Any]) -> None:
    """Print a bench script's result and keep it in bench/results/NAME-<time>.json."""
    text = json.dumps(result, indent=2)
    print(text)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}-{int(time.time())}.json").write_text(text)


class LoadWorkers:
    """The load generator's processes for a started target: ``commands`` (one queue each) and the
    shared ``results`` queue; ``close()`` stops them and the target."""

    def __init__(self, target: Target, workers: int, **spec: Any) -> None:
        self.target = target
        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.commands: list[Any] = []
        self.procs: list[Any] = []
        for share in [target.devices[i::workers] for i in range(workers)]:
            q = ctx.Queue()
            full = {"host": "127.0.0.1", "port": target.port, "devices": share, "topic": TOPIC, "filter": "",
                    "mqtt5": False} | spec
            p = ctx.Process(target=loadgen.worker_main, args=(full, q, self.results))
            p.start()
            self.procs.append(p)
            self.commands.append(q)

    def broadcast(self, command: dict[str, Any], timeout: float = 300) -> list[dict[str, Any]]:
        for q in self.commands:
            q.put(command)
        return [self.results.get(timeout=timeout) for _ in self.commands]

    def connect(self) -> list[dict[str, Any]]:
        return self.broadcast({"cmd": "connect", "start_at": time.time() + 0.5})

    def close(self) -> None:
        for q in self.commands:
            q.put({"cmd": "stop"})
        if self.target.proc is not None:
            self.target.stop()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def spy_on(pid: int, phase: str) -> subprocess.Popen[bytes] | None:
    """``BENCH_PYSPY=FILE`` and ``BENCH_PYSPY_PHASE`` (``push``, ``storm`` or ``stop``): py-spy's raw stacks of
    the broker during that phase, 200 a second, every thread."""
    if not os.environ.get("BENCH_PYSPY") or os.environ.get("BENCH_PYSPY_PHASE", "push") != phase:
        return None
    spy = subprocess.Popen(["py-spy", "record", "-r", "200", "-p", str(pid), "--threads", "--format", "raw",
                            "-o", os.environ["BENCH_PYSPY"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return spy


def spy_stop(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


def run_one(target_cls: type[Target], n: int, workers: int, storm: int, sub_filter: str = "exact",
            mqtt: str = "3.1.1", session: str = "clean") -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{target_cls.name}-"))
    target = target_cls(n, tmp)
    result: dict[str, Any] = {"target": target.name, "n": n, "filter": sub_filter, "mqtt": mqtt, "session": session}
    ctx = mp.get_context("spawn")
    procs, commands, results = [], [], ctx.Queue()
    try:
        target.start()
        assert target.proc is not None
        time.sleep(0.5)
        result["rss_idle_mb"] = rss_mb(target.proc.pid)
        shares = [target.devices[i::workers] for i in range(workers)]
        for share in shares:
            q = ctx.Queue()
            spec = {"host": "127.0.0.1", "port": target.port, "devices": share, "topic": TOPIC,
                    "filter": FILTERS[sub_filter], "mqtt5": mqtt == "5", "persistent": session == "persistent",
                    # Each worker from its own loopback address: 28,000 ephemeral ports are per address.
                    "source_host": f"127.0.0.{2 + len(procs)}" if n > 20_000 else None}
            p = ctx.Process(target=loadgen.worker_main, args=(spec, q, results))
            p.start()
            procs.append(p)
            commands.append(q)

        def broadcast(command: dict[str, Any]) -> list[dict[str, Any]]:
            for q in commands:
                q.put(command)
            return [results.get(timeout=PHASE_TIMEOUT + 30) for _ in commands]

        wall_started = time.monotonic()
        start_at = time.time() + 1.0
        replies = broadcast({"cmd": "connect", "start_at": start_at})
        result["connect_s"] = max(r["done_at"] for r in replies) - start_at
        result["connect_failed"] = sum(r["failed"] for r in replies)
        time.sleep(0.5)
        result["rss_mb"] = rss_mb(target.proc.pid)
        result["kb_per_device"] = (result["rss_mb"] - result["rss_idle_mb"]) * 1024 / n
        # What N idle devices cost the gateway's CPU (keep-alive bookkeeping; the load generator
        # sends nothing in these seconds).
        cpu0, idle0 = cpu_seconds(target.proc.pid), time.monotonic()
        time.sleep(IDLE_WINDOW)
        result["idle_cpu_pct"] = 100 * (cpu_seconds(target.proc.pid) - cpu0) / (time.monotonic() - idle0)
        if isinstance(target, Henge) and target.open_console():
            time.sleep(0.5)
            result["rss_console_mb"] = rss_mb(target.proc.pid)

        marker = uuid.uuid4().hex
        for i, q in enumerate(commands):
            q.put({"cmd": "await_push", "marker": marker, "timeout": PHASE_TIMEOUT, "ping": i == 0})
        spy = spy_on(target.proc.pid, "push")
        t0 = time.time()
        target.push(marker)
        replies = [results.get(timeout=PHASE_TIMEOUT + 30) for _ in commands]
        result["push_s"] = max(r["last"] for r in replies) - t0
        result["push_first_s"] = min(r["first"] for r in replies if r["first"]) - t0
        if getattr(target, "timings", None):
            result["push_service_ms"] = target.timings
        result["ping_max_ms"] = max(r["ping_max"] for r in replies if r["ping_max"] is not None) * 1000
        result["push_missing"] = sum(r["missing"] for r in replies)
        result["wrong_deliveries"] = sum(r["wrong"] for r in replies)
        spy_stop(spy)

        k = min(storm, n)
        start_at = time.time() + 0.5
        per = [len(s) for s in shares]
        counts = [k // workers + (1 if i < k % workers else 0) for i in range(workers)]
        spy = spy_on(target.proc.pid, "storm")
        for q, c, size in zip(commands, counts, per, strict=True):
            q.put({"cmd": "storm", "count": min(c, size), "start_at": start_at, "timeout": PHASE_TIMEOUT})
        replies = [results.get(timeout=PHASE_TIMEOUT + 30) for _ in commands]
        spy_stop(spy)
        result["storm_n"] = k
        current = [r["current_at"] for r in replies]
        # Not all current again (some never got their config): the storm has no finishing time.
        result["storm_s"] = (max(current) - start_at) if all(current) and not any(
            r["without_config"] for r in replies) else None
        result["storm_failed"] = sum(r["failed"] for r in replies)
        result["storm_without_config"] = sum(r["without_config"] for r in replies)
        result["storm_old_still_open"] = sum(r["old_still_open"] for r in replies)
        result["wrong_deliveries"] += sum(r["wrong"] for r in replies)
        result["rss_after_mb"] = rss_mb(target.proc.pid)

        spy = spy_on(target.proc.pid, "stop")
        result["shutdown_s"] = target.stop()
        spy_stop(spy)
        wall = time.monotonic() - wall_started
        for q in commands:
            q.put({"cmd": "stop"})
        replies = [results.get(timeout=30) for _ in range(2 * len(commands))]
        cpu = [r["cpu"] for r in replies if r["cmd"] == "cpu"]
        result["loadgen_cpu_share"] = max(cpu) / wall if wall else 0.0
    except queue.Empty:
        result["error"] = f"a phase did not finish within {PHASE_TIMEOUT + 30:.0f} s"
    except Exception as exc:  # a broker that falls over is a result too
        result["error"] = repr(exc)
    finally:
        if target.proc is not None and target.proc.poll() is None:
            target.proc.kill()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


METRICS = [
    ("connect_s", "connect + subscribe all (s)"),
    ("rss_mb", "broker RSS after connect (MB)"),
    ("kb_per_device", "RSS per connected device (KB)"),
    ("rss_console_mb", "broker RSS after connect, console opened once (MB)"),
    ("idle_cpu_pct", "CPU with all connected and idle (% of a core)"),
    ("push_s", "fleet push, all acked (s)"),
    ("push_first_s", "fleet push, first delivery (s)"),
    ("ping_max_ms", "worst PINGRESP during the push (ms)"),
    ("storm_s", "takeover storm, all current (s)"),
    ("shutdown_s", "clean shutdown (s)"),
]
COLUMNS = ("henge", "henge-asyncio", "henge-lp", "mosquitto-auth", "mosquitto", "amqtt")


def table(results: list[dict[str, Any]]) -> str:
    def sub(r: dict[str, Any]) -> str:
        mqtt = r.get("mqtt", "3.1.1")
        return r.get("filter", "exact") + ("" if mqtt == "3.1.1" else f", MQTT {mqtt}") + (
            ", persistent sessions" if r.get("session") == "persistent" else "")

    by = {(r["target"], r["n"], sub(r)): r for r in results}
    keys = sorted({(r["n"], sub(r)) for r in results})
    lines = ["| N | subscription | metric | henge | henge, asyncio loop | henge, listener processes "
             "| mosquitto + auth/ACL | mosquitto anonymous | amqtt 0.12.1 | henge / mosquitto+auth "
             "| henge-asyncio / mosquitto+auth | henge-lp / mosquitto+auth |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")

    for n, subscription in keys:
        for key, label in METRICS:
            values = [by.get((t, n, subscription), {}).get(key) for t in COLUMNS]
            ref = values[COLUMNS.index("mosquitto-auth")]
            ratios = [f"{h / ref:.2f}x" if h is not None and ref else "-" for h in values[:3]]
            lines.append(f"| {n} | {subscription} | {label} | " + " | ".join(fmt(v) for v in values)
                         + f" | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--targets", default="henge,mosquitto-auth,mosquitto,amqtt")
    parser.add_argument("--filter", default="exact", help="exact, wildcard, or both (comma-separated)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of every target")
    parser.add_argument("--mqtt", default="3.1.1", help="the devices' protocol: 3.1.1, 5, or both (comma-separated)")
    parser.add_argument("--session", default="clean", help="clean, persistent (CleanSession 0), or both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storm", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    # henge's bytecode written, as `pip install .` does: run from a checkout with PYTHONDONTWRITEBYTECODE
    # set, every start compiled every module again (about 3 MB more RSS, and time at every CLI start).
    compileall.compile_dir(ROOT / "henge_mqtt", quiet=1)
    results = []
    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):  # a CPU calibration: shared machines vary; compare runs by this too
        total += i
    calibration = time.perf_counter() - started
    print(f"bench: cpu calibration (5M-iteration loop) {calibration:.2f} s", file=sys.stderr, flush=True)
    for n in [int(s) for s in args.sizes.split(",")]:
        for mqtt in args.mqtt.split(","):
            for sub in args.filter.split(","):
                for _ in range(args.repeat):
                    for session in args.session.split(","):
                        for name in args.targets.split(","):
                            if name == "amqtt" and (sub != "exact" or mqtt != "3.1.1"):
                                continue  # amqtt 0.12.1 has no MQTT 5.0
                            print(f"bench: {name} N={n} filter={sub} mqtt={mqtt} session={session} ...",
                                  file=sys.stderr, flush=True)
                            r = run_one(TARGETS[name], n, args.workers, args.storm, sub, mqtt, session)
                            print(f"bench: {json.dumps(r)}", file=sys.stderr, flush=True)
                            results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"cpus": os.cpu_count(), "cpu_calibration_s": calibration, "results": results},
                               indent=2))
    print(table(results))
    print(f"\nresults: {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
