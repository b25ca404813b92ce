"""Onboarding by claim at scale: N new devices claim their identities at once.

    python bench/claims.py --n 1000 [--mqtt 3.1.1|5]

Starts ``henge serve`` (HTTP on, as deployed) on an empty store, creates one claim for N devices,
then N raw MQTT clients (3.1.1 by default; asyncio sockets, the load generator's packets) connect
with the claim credential and a random nonce each, subscribe to their response topic and publish
their request, all at once. Measured: from the first CONNECT to the last answer; how many got an
identity; then that each identity works (every device connects as itself). A claiming CONNECT
refused for the rate (``claim_rate``/``claim_burst``) is tried again after 0.5 s, as a device would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
from run import ROOT, free_port, wait_port


async def claim_one(port: int, claim: dict[str, Any], device: str, mqtt5: bool) -> tuple[str, int]:
    """``(secret, CONNECTs it took)``."""
    for attempt in range(1, 50):
        nonce = secrets.token_urlsafe(16)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(loadgen.connect_packet(nonce, f"claim:{claim['claim']}", claim["secret"], mqtt5=mqtt5))
            kind, _, body = await loadgen.read_packet(reader)
            if body[1] != 0:  # refused: the rate (3 / 0x9F) is worth another try
                await asyncio.sleep(0.5)
                continue
            writer.write(loadgen.subscribe_packet(1, f"henge/claim/{nonce}/response", mqtt5=mqtt5))
            topic = f"henge/claim/{nonce}/request".encode()
            body = len(topic).to_bytes(2, "big") + topic + (2).to_bytes(2, "big") + (b"\x00" if mqtt5 else b"") \
                + json.dumps({"device": device}).encode()
            writer.write(bytes([0x32]) + loadgen._remaining(len(body)) + body)  # PUBLISH, QoS 1
            while True:
                kind, flags, body = await loadgen.read_packet(reader)
                if kind != 3:
                    continue
                topic_len = int.from_bytes(body[:2], "big")
                offset = 2 + topic_len + (2 if (flags >> 1) & 3 else 0)
                if mqtt5:
                    offset = loadgen._skip_properties(body, offset)
                answer = json.loads(body[offset:])
                if not answer["ok"]:
                    raise RuntimeError(f"{device}: {answer}")
                return str(answer["secret"]), attempt
        finally:
            writer.transport.abort()
    raise RuntimeError(f"{device}: no answer after 50 attempts")


async def connect_as(port: int, device: str, secret: str) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(loadgen.connect_packet(device, device, secret))
        _, _, body = await loadgen.read_packet(reader)
        return body[1] == 0
    finally:
        writer.transport.abort()


async def run(n: int, mqtt5: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    port, http = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "henge_mqtt", "serve", "--data", str(tmp / "data"), "--port",
                             str(port), "--http", f"127.0.0.1:{http}", "--log-level", "error"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        made = subprocess.run([sys.executable, "-m", "henge_mqtt", "claim", "create", "bench", "--uses", str(n),
                               "--expires", "1h", "--label", "batch=bench", "--json", "--data", str(tmp / "data")],
                              capture_output=True, text=True, cwd=ROOT, check=True)
        claim = json.loads(made.stdout)["credential"]
        started = time.monotonic()
        results = await asyncio.gather(*(claim_one(port, claim, f"dev{i:05}", mqtt5) for i in range(n)),
                                       return_exceptions=True)
        took = time.monotonic() - started
        ok = [r for r in results if not isinstance(r, BaseException)]
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        works = await asyncio.gather(*(connect_as(port, f"dev{i:05}", r[0]) for i, r in enumerate(results)
                                       if not isinstance(r, BaseException)))
        return {"n": n, "mqtt": "5" if mqtt5 else "3.1.1", "all_answered_s": round(took, 2), "claimed": len(ok),
                "retries": sum(r[1] - 1 for r in ok), "identities_work": sum(works), "errors": errors[:3]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--mqtt", choices=("3.1.1", "5"), default="3.1.1")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.n, args.mqtt == "5"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
