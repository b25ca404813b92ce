"""Connect N devices to an already-running henge and hold them (for profiling the broker)."""

from __future__ import annotations

import csv
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

TOPIC = "henge/devices/{device}/config"


def main() -> None:
    port, secrets_file, workers = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rows = list(csv.DictReader(secrets_file.open()))
    devices = [(r["id"], r["secret"]) for r in rows]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    qs, procs = [], []
    for i in range(workers):
        q = ctx.Queue()
        spec = {"host": "127.0.0.1", "port": port, "devices": devices[i::workers], "topic": TOPIC}
        p = ctx.Process(target=loadgen.worker_main, args=(spec, q, results))
        p.start()
        qs.append(q)
        procs.append(p)
    start = time.time() + 1
    for q in qs:
        q.put({"cmd": "connect", "start_at": start})
    replies = [results.get() for _ in qs]
    print("connect_s", max(r["done_at"] for r in replies) - start, "failed", sum(r["failed"] for r in replies),
          flush=True)
    if len(sys.argv) > 4:  # hold the connections for this many seconds
        time.sleep(float(sys.argv[4]))
    for q in qs:
        q.put({"cmd": "stop"})
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
