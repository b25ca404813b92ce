"""Embed henge in your own asyncio application (see docs/library.md).

    python examples/embed.py [DATA_DIR]

Starts the service on a free loopback port, registers a device, pushes a config, lets a device
client receive it, and stops: everything a gateway application does, in one script.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import aiomqtt

from henge_mqtt import HengeService, Settings
from henge_mqtt.errors import DuplicateDevice


async def main(data_dir: Path) -> None:
    settings = Settings.load(data_dir=data_dir, host="127.0.0.1", port=0)
    async with HengeService(settings) as service:
        host, port = service.address
        events: list[str] = []
        service.add_event_listener(lambda event: events.append(f"{event.type}:{event.device}"))

        try:
            secret = await service.add_device("pump-7", {"site": "plant-2"})
        except DuplicateDevice:  # run before on this data dir: a fresh secret for this run
            secret = await service.rotate_secret("pump-7")
        row = await service.push("pump-7", {"rpm_max": 1800}, message="initial limits")

        async with aiomqtt.Client(host, port, identifier="pump-7", username="pump-7", password=secret) as device:
            await device.subscribe("henge/devices/pump-7/config", qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(device.messages))
        snapshot = json.loads(message.payload)  # type: ignore[arg-type]
        print(f"pushed version {row.version}; the device received version {snapshot['version']}: {snapshot['config']}")
        print("status:", (await service.status("pump-7"))[0]["reason"])
        print("events:", ", ".join(events))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(Path(sys.argv[1])))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp)))
