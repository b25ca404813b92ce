"""Takeover latency: a second CONNECT with the same id until the old socket is closed (50 rounds)."""

import asyncio
import statistics
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from henge_mqtt.service import HengeService
from henge_mqtt.settings import Settings
from tests import mqtt_raw as raw


async def main():
    import pathlib
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp())
    s = Settings(data_dir=d).with_listener("127.0.0.1", 0)
    s = s.model_copy(update={"sessions": s.sessions.model_copy(update={"connect_burst": 1000.0, "conflict_takeovers": 1000})})
    async with HengeService(s) as svc:
        secret = svc.add_device("dev1")
        port = svc.address[1]
        lat = []
        for _ in range(50):
            old = await raw.RawClient.open(port)
            await old.send(raw.connect("dev1", "dev1", secret, clean=True))
            await old.connack()
            new = await raw.RawClient.open(port)
            t0 = time.perf_counter()
            await new.send(raw.connect("dev1", "dev1", secret, clean=False))
            closed = await old.closed_within(2)
            lat.append(time.perf_counter() - t0)
            assert closed
            old.close(); new.close()
            await asyncio.sleep(0.01)
        print(f"takeover: old connection closed after median {statistics.median(lat)*1000:.1f} ms, max {max(lat)*1000:.1f} ms (n={len(lat)})")
asyncio.run(main())
