"""What the benches that run the service in their own process share: a data dir of N stored
devices, and the service on it (``summary_lag.py``, ``layer_change.py``)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def stored_fleet(n: int) -> Iterator[Path]:
    """A data dir in a temporary directory with devices ``dev00000``... (no configs), made once."""
    from henge_mqtt.store import Store

    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as tmp:
        data = Path(tmp) / "data"
        store = Store(data)
        store.add_devices([(f"dev{i:05}", {}) for i in range(n)])
        store.close()
        yield data


@contextlib.asynccontextmanager
async def service_on(data: Path) -> AsyncIterator[Any]:
    """The service on ``data`` (devices on a free loopback port, no HTTP), the fleet point its start
    takes already taken (it would run into the first measurement)."""
    from henge_mqtt.service import HengeService
    from henge_mqtt.settings import Settings

    settings = Settings(data_dir=data, listeners={"default": {"bind": "127.0.0.1:0"}}, http=None)
    async with HengeService(settings) as service:
        await service.summary()
        yield service
