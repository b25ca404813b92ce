"""What a fleet push costs the broker's CPU, per device: henge (its event loop's thread and the
store's apart) against Mosquitto with auth, each with N devices connected by the load generator.

bench/run.py times a push from the command to the last device's PUBACK on a machine whose two
cores the broker shares with the load generator, so the broker's CPU per device is what decides
how far behind Mosquitto the wall time falls; this measures that CPU directly (user and system
time of the broker's process tree, and of its event loop's thread apart, from /proc), push after push.

    python bench/push_cpu.py [--n 18000] [--pushes 4] [--targets henge,mosquitto-auth]

The first push of a run gives every device its first config (a new retained topic each); the
others replace one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench


def threads(pid: int) -> dict[str, float]:
    """CPU seconds of the process's main thread (``loop``: the event loop) and of all its others
    (``threads``: henge's store thread, nearly all of it; Python does not name threads for /proc)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        key = "loop" if task.name == str(pid) else "threads"
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def measure(target_cls: type[bench.Target], n: int, pushes: int, workers: int) -> list[dict[str, float]]:
    target = target_cls(n, Path(tempfile.mkdtemp(prefix=f"push-cpu-{target_cls.name}-")))
    target.start()
    load = bench.LoadWorkers(target, workers)
    rows = []
    try:
        if sum(r["failed"] for r in load.connect()):
            raise SystemExit("some devices did not connect")
        assert target.proc is not None
        pid = target.proc.pid
        for _ in range(pushes):
            marker = uuid.uuid4().hex
            for q in load.commands:
                q.put({"cmd": "await_push", "marker": marker, "timeout": bench.PHASE_TIMEOUT, "ping": False})
            (user0, sys0), threads0, started = bench.cpu_times(pid), threads(pid), time.time()
            target.push(marker)
            replies = [load.results.get(timeout=bench.PHASE_TIMEOUT + 30) for _ in load.commands]
            if sum(r["missing"] for r in replies) or sum(r["wrong"] for r in replies):
                raise SystemExit("a device missed the push")
            wall = max(r["last"] for r in replies) - started
            time.sleep(0.3)  # the broker's last acknowledgements and the push's answer
            (user1, sys1), threads1 = bench.cpu_times(pid), threads(pid)
            row = {"wall_s": wall, "user_us": (user1 - user0) * 1e6 / n, "system_us": (sys1 - sys0) * 1e6 / n}
            for name, seconds in threads1.items():  # "loop" and "threads"
                row[f"{name}_us"] = (seconds - threads0.get(name, 0.0)) * 1e6 / n
            rows.append(row)
            said = " ".join(f"{k}={v:.3f}" for k, v in row.items())
            print(f"bench: push_cpu {target.name} N={n} {said}", flush=True)
    finally:
        load.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=18000)
    parser.add_argument("--pushes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--targets", default="henge,mosquitto-auth")
    args = parser.parse_args()
    targets = {"henge": bench.Henge, "henge-asyncio": bench.HengeAsyncio, "mosquitto-auth": bench.MosquittoAuth}
    print("| target | pushes | wall (s) | CPU user + system per device (us) | the event loop's thread "
          "| other threads (the store's) |\n|---|---|---|---|---|---|")
    for name in args.targets.split(","):
        rows = measure(targets[name], args.n, args.pushes, args.workers)

        def med(key: str, rows: list[dict[str, float]] = rows) -> str:
            values = [r[key] for r in rows if key in r]
            return f"{statistics.median(values):.0f}" if values else "-"

        total = [r["user_us"] + r["system_us"] for r in rows]
        walls = sorted(r["wall_s"] for r in rows)
        print(f"| {name} | {len(rows)} | {statistics.median(walls):.2f} [{walls[0]:.2f}-{walls[-1]:.2f}] | "
              f"{statistics.median(total):.0f} ({med('user_us')} + {med('system_us')}) | {med('loop_us')} | "
              f"{med('threads_us')} |", flush=True)


if __name__ == "__main__":
    main()
