"""What a fleet push costs the store's thread per device: ``Store.push_many`` in the service's
chunks of 2,000 (plus the snapshots' payloads the same thread serializes), on a fresh SQLite store
of N devices, each push a new config for all of them. This thread shares the GIL with the event
loop that delivers, so every microsecond here is one the loop waits for.

    python bench/store_push.py [--n 10000] [--repeat 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from henge_mqtt.service.configs import MAX_CHUNK, _fleet_payloads
from henge_mqtt.store import Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    store = Store(Path(tempfile.mkdtemp()) / "data")
    devices = [f"dev{i:05}" for i in range(args.n)]
    store.add_devices([(d, {}) for d in devices])

    def push(marker: str) -> None:
        for start in range(0, len(devices), MAX_CHUNK):
            _fleet_payloads(store.push_many(devices[start:start + MAX_CHUNK], {"m": marker}, actor="bench",
                                            skip_unchanged=True))

    push("warm-up")
    per_row = []
    for rep in range(args.repeat):
        started = time.perf_counter()
        push(f"m{rep}")
        per_row.append((time.perf_counter() - started) * 1e6 / args.n)
    store.close()
    print(f"store_push: {args.n} devices, {args.repeat} pushes: {statistics.median(per_row):.1f} us a device "
          f"(median; min {min(per_row):.1f}, max {max(per_row):.1f})")


if __name__ == "__main__":
    main()
