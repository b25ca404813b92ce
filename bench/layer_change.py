"""How soon a layer change reaches its first device, and how long until all are published: the
fleet layer set N times on a fleet of N devices (none connected: what is measured is the store and
the publishing loop, from the call to the first and the last ``publish``).

    python bench/layer_change.py [--n 18000] [--rounds 4]

The service runs in this process on a data dir of N devices made once in a temporary directory;
the first change after the start is left out (it pays for what a start leaves cold).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from inprocess import service_on, stored_fleet


async def measure(data: Path, rounds: int) -> list[tuple[float, float, int]]:
    out: list[tuple[float, float, int]] = []
    async with service_on(data) as service:
        configs = service.configs
        publish = configs.publish
        first: list[float] = []

        def timed(row: Any, payload: bytes | None = None) -> Any:
            if not first:
                first.append(time.perf_counter())
            return publish(row, payload)

        configs.publish = timed  # type: ignore[method-assign]
        for k in range(rounds + 1):
            first.clear()
            started = time.perf_counter()
            change = await service.set_layer("fleet", {"round": k})
            if k:
                out.append((first[0] - started, time.perf_counter() - started, change["devices"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=18_000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with stored_fleet(args.n) as data:
        results = asyncio.run(measure(data, args.rounds))
    first = [f * 1000 for f, _, _ in results]
    whole = [w * 1000 for _, w, _ in results]
    print(f"{args.n} devices, {args.rounds} fleet layer changes ({results[0][2]} devices each): first published "
          f"{statistics.median(first):.0f} ms [{min(first):.0f}-{max(first):.0f}], all published "
          f"{statistics.median(whole):.0f} ms [{min(whole):.0f}-{max(whole):.0f}]")


if __name__ == "__main__":
    main()
