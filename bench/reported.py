"""What device twins cost the gateway: N devices reporting their state every 10 s.

    python bench/reported.py --n 10000 [--interval 10] [--duration 60] [--change-every 6]
                             [--targets henge,mosquitto-auth] [--workers 2]

Each device connects (as in bench/run.py), then publishes a reported-state document
(``{"document": {...}}``, about 130 bytes, QoS 1) every ``--interval`` seconds, the fleet spread
evenly over the interval; one message in ``--change-every`` changes the document (the rest repeat
it, as a device that reports on a timer does). The first interval (every device's first document,
new to the broker) is a warm-up; the next ``--duration`` seconds are measured. Measured: the broker
process's CPU (user + system, from /proc) over the reporting window, as a share of one core, and
for henge how many devices' documents it stored; also the CPU of the same fleet connected and
silent for 15 s before (``idle_share``), and the difference (``reporting_share``: what reporting
itself costs). Mosquitto with a password file and an ACL, taking
the same messages (and delivering them to no one), is the reference.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, TARGETS, LoadWorkers


def cpu_seconds(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run(target_name: str, n: int, workers: int, interval: float, duration: float, change_every: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-reported-{target_name}-"))
    target = TARGETS[target_name](n, tmp)
    result: dict[str, Any] = {"target": target_name, "n": n, "interval_s": interval, "duration_s": duration}
    load = None
    try:
        target.start()
        assert target.proc is not None
        load = LoadWorkers(target, workers)
        replies = load.connect()
        result["connect_failed"] = sum(r["failed"] for r in replies)
        time.sleep(2.0)  # let the connect storm's own work settle
        # The same fleet connected and silent: what it costs before anyone reports (keep-alive sweeps).
        before, started = cpu_seconds(target.proc.pid), time.monotonic()
        time.sleep(15.0)
        after, wall = cpu_seconds(target.proc.pid), time.monotonic() - started
        result["idle_share"] = round((after[0] + after[1] - before[0] - before[1]) / wall, 3)
        # Reporting: one interval of warm-up first (every device's first document is new to henge), then
        # the steady state is measured: each device reporting every interval, one message in
        # change_every with something new.
        import threading

        window: list[tuple[tuple[float, float], float]] = []
        start_at = time.time() + 0.2

        def measure() -> None:
            time.sleep(max(0.0, start_at + interval - time.time()))
            window.append((cpu_seconds(target.proc.pid), time.monotonic()))
            time.sleep(max(0.0, start_at + interval + duration - time.time()))
            window.append((cpu_seconds(target.proc.pid), time.monotonic()))

        meter = threading.Thread(target=measure)
        meter.start()
        replies = load.broadcast({"cmd": "report_state", "start_at": start_at, "interval": interval,
                                  "duration": interval + duration, "change_every": change_every},
                                 timeout=interval + duration + 120)
        meter.join()
        (before, started), (after, ended) = window
        wall = ended - started
        user, system = after[0] - before[0], after[1] - before[1]
        result["sent"] = sum(r["sent"] for r in replies)
        result["cpu_s"] = round(user + system, 2)
        result["cpu_share_of_one_core"] = round((user + system) / wall, 3)
        # System time includes, on loopback, the kernel's delivery of every PUBACK to the load generator.
        result["user_share"], result["system_share"] = round(user / wall, 3), round(system / wall, 3)
        result["reporting_share"] = round(result["cpu_share_of_one_core"] - result["idle_share"], 3)
        if target_name == "henge":
            out = subprocess.run([sys.executable, "-m", "henge_mqtt", "status", "--json", "--where",
                                  'reported.fw == "2.4.1"', "--data", str(target.data)],  # type: ignore[attr-defined]
                                 capture_output=True, text=True, cwd=ROOT, timeout=120)
            result["devices_with_reported_state"] = len(json.loads(out.stdout)) if out.returncode == 0 else out.stderr
    finally:
        if load is not None:
            load.close()
        elif target.proc is not None:
            target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--change-every", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--targets", default="henge,mosquitto-auth")
    args = parser.parse_args()
    for name in args.targets.split(","):
        print(json.dumps(run(name, args.n, args.workers, args.interval, args.duration, args.change_every)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
