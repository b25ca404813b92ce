"""Takeover latency: from a second CONNECT with a device's id until its first connection is closed."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from henge_mqtt.service import HengeService
from henge_mqtt.settings import Settings
from tests import mqtt_raw as raw

ROUNDS = 50


async def main() -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp())).with_listener("127.0.0.1", 0)
    no_limits = settings.sessions.model_copy(update={"connect_burst": 1000.0, "conflict_takeovers": 1000})
    async with HengeService(settings.model_copy(update={"sessions": no_limits})) as service:
        secret = await service.add_device("dev1")
        port = service.address[1]
        latencies = []
        for _ in range(ROUNDS):
            old = await raw.RawClient.open(port)
            await old.send(raw.connect("dev1", "dev1", secret, clean=True))
            await old.connack()
            new = await raw.RawClient.open(port)
            started = time.perf_counter()
            await new.send(raw.connect("dev1", "dev1", secret, clean=False))
            assert await old.closed_within(2)
            latencies.append((time.perf_counter() - started) * 1000)
            old.close()
            new.close()
            await asyncio.sleep(0.01)
    print(f"takeover: old connection closed after median {statistics.median(latencies):.1f} ms, "
          f"max {max(latencies):.1f} ms (n={ROUNDS})")


if __name__ == "__main__":
    asyncio.run(main())
