"""A minimal device in Python with aiomqtt: apply each new config version and report it.

    python examples/aiomqtt_device.py --port 1883 --device sensor-1 --secret-file sensor-1.secret

Checks each snapshot's device and sha256 before trusting it, ignores versions it has already
seen, prints what it applies and reports ``applied``. ``--once`` exits after the first one.
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
    base = f"{args.prefix}/devices/{args.device}"
    last = 0
    async with aiomqtt.Client(args.host, args.port, identifier=args.device, username=args.device,
                              password=secret) as client:
        await client.subscribe(f"{base}/config", qos=1)
        async for message in client.messages:
            if not message.payload:
                continue  # the device was removed: its retained config was cleared
            snap = json.loads(message.payload)  # type: ignore[arg-type]
            verified = (snap["device"] == args.device
                        and snap["sha256"] == hashlib.sha256(canonical(snap["config"])).hexdigest())
            if not verified or snap["version"] <= last:
                continue
            last = snap["version"]
            print(json.dumps({"version": last, "config": snap["config"]}), flush=True)
            await client.publish(f"{base}/report", json.dumps({"version": last, "status": "applied"}), qos=1)
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
