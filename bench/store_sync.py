"""The cost of the store's durability setting: ``store_synchronous`` full (default) vs normal.

    python bench/store_sync.py [--pushes 500] [--fleet 10000]

Measures, for each mode, on the data dir's file system: single-device pushes (one transaction
each, as `henge push` does), a 10,000-device fleet push (chunked transactions), and a burst of
1,000 epoch group commits (what a reconnect storm costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from henge_mqtt.service.configs import FIRST_CHUNK, MAX_CHUNK
from henge_mqtt.store import Store


def run(mode: str, pushes: int, fleet: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        store = Store(Path(tmp), synchronous=mode)  # type: ignore[arg-type]
        devices = [f"d{i:05}" for i in range(fleet)]
        store.add_devices([(d, {}) for d in devices])
        times = []
        for i in range(pushes):
            started = time.perf_counter()
            store.push(devices[i % fleet], {"n": i}, actor="bench")
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        size, at = FIRST_CHUNK, 0
        while at < fleet:
            store.push_many(devices[at:at + size], {"fleet": 1}, actor="bench")
            at += size
            size = min(size * 4, MAX_CHUNK)
        fleet_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(1000):
            store.save_sessions({devices[i % fleet]: i + 1}, {})
        epochs_s = time.perf_counter() - started
        store.close()
    return {"push_median_ms": statistics.median(times) * 1000, "push_p99_ms": sorted(times)[int(len(times) * .99)]
            * 1000, "fleet_push_s": fleet_s, "epoch_commit_ms": epochs_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--fleet", type=int, default=10_000)
    args = parser.parse_args()
    print("| store_synchronous | single push median (ms) | p99 (ms) | 10k fleet push (s) | one epoch commit (ms) |")
    print("|---|---|---|---|---|")
    for mode in ("full", "normal"):
        r = run(mode, args.pushes, args.fleet)
        print(f"| {mode} | {r['push_median_ms']:.2f} | {r['push_p99_ms']:.2f} | {r['fleet_push_s']:.3f} | "
              f"{r['epoch_commit_ms']:.3f} |")


if __name__ == "__main__":
    main()
