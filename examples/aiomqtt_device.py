"""A minimal device in Python with aiomqtt: print each config version this device is sent.

    python examples/aiomqtt_device.py --port 1883 --device sensor-1 --secret-file sensor-1.secret

Checks each snapshot's sha256 before trusting it. ``--once`` exits after the first snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from pathlib import Path

import aiomqtt


def canonical(config: dict) -> bytes:  # type: ignore[type-arg]
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def run(args: argparse.Namespace) -> None:
    secret = Path(args.secret_file).read_text().strip()
    topic = f"{args.prefix}/devices/{args.device}/config"
    async with aiomqtt.Client(args.host, args.port, identifier=args.device, username=args.device,
                              password=secret) as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            if not message.payload:
                continue  # the device was removed: its retained config was cleared
            snap = json.loads(message.payload)  # type: ignore[arg-type]
            ok = snap["device"] == args.device and snap["sha256"] == hashlib.sha256(canonical(snap["config"])).hexdigest()
            print(json.dumps({"version": snap["version"], "verified": ok, "config": snap["config"]}), flush=True)
            if args.once:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device", required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--prefix", default="henge")
    parser.add_argument("--once", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
