"""How long a fleet summary holds the event loop: the summary the service takes every minute (the
console's charts) and for every `henge status --summary` and console overview, measured as the
worst lag of a 1 ms ticker on the same loop while it runs.

    python bench/summary_lag.py [--n 18000] [--rounds 5]

The service runs in this process (no devices connected: the loop's share of a summary is per
stored device, connected or not) on a data dir of N devices made once in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from inprocess import service_on, stored_fleet


async def measure(data: Path, rounds: int) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    async with service_on(data) as service:
        lags: list[float] = []

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while True:
                at = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - at)

        async with asyncio.TaskGroup() as tasks:
            tick = tasks.create_task(ticker())
            for _ in range(rounds):
                await asyncio.sleep(0.05)
                lags.clear()
                started = time.perf_counter()
                await service.summary()
                out.append((time.perf_counter() - started, max(lags, default=0.0)))
            tick.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=18_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with stored_fleet(args.n) as data:
        results = asyncio.run(measure(data, args.rounds))
    took = [t * 1000 for t, _ in results]
    worst = [lag * 1000 for _, lag in results]
    print(f"{args.n} devices, {args.rounds} summaries: took {statistics.median(took):.0f} ms "
          f"[{min(took):.0f}-{max(took):.0f}], the loop's worst lag {statistics.median(worst):.0f} ms "
          f"[{min(worst):.0f}-{max(worst):.0f}]")


if __name__ == "__main__":
    main()
