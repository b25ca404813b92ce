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
import tempfile
import time
from pathlib import Path


async def measure(data: Path, rounds: int) -> list[tuple[float, float]]:
    from henge_mqtt.service import HengeService
    from henge_mqtt.settings import Settings

    settings = Settings(data_dir=data, listeners={"default": {"bind": "127.0.0.1:0"}}, http=None)
    out: list[tuple[float, float]] = []
    async with HengeService(settings) as service:
        await service.summary()  # the start's own point is taken meanwhile: one round to settle
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
    from henge_mqtt.store import Store

    with tempfile.TemporaryDirectory(prefix="bench-summary-") as tmp:
        data = Path(tmp) / "data"
        store = Store(data)
        store.add_devices([(f"dev{i:05}", {}) for i in range(args.n)])
        store.close()
        results = asyncio.run(measure(data, args.rounds))
    took = [t * 1000 for t, _ in results]
    worst = [lag * 1000 for _, lag in results]
    print(f"{args.n} devices, {args.rounds} summaries: took {statistics.median(took):.0f} ms "
          f"[{min(took):.0f}-{max(took):.0f}], the loop's worst lag {statistics.median(worst):.0f} ms "
          f"[{min(worst):.0f}-{max(worst):.0f}]")


if __name__ == "__main__":
    main()
