"""What the kernel spends closing a process's sockets when it exits, with no broker at all: a bare
server holds N accepted loopback connections (a client process reads them), then ends with
``os._exit``, or first shuts every socket down or closes it in a loop; timed from the signal to go
to the moment its parent sees it exit. Part of every broker's clean shutdown at N devices (henge
leaves its devices' sockets to the kernel at exit; Mosquitto closes its own before it exits).

    python bench/socket_exit.py [--n 10000] [--variants exit,shutdown,close] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
from typing import Any


def _files() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def client(port: int, n: int, ready: Any) -> None:
    _files()

    async def main() -> None:
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
        ready.set()

        async def drain(reader: asyncio.StreamReader) -> None:
            try:
                while await reader.read(1024):
                    pass
            except OSError:
                pass

        await asyncio.gather(*(drain(reader) for reader, _ in streams))

    asyncio.run(main())


def server(ports: Any, n: int, variant: str, go: Any, spent: Any) -> None:
    _files()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    ports.put(listener.getsockname()[1])
    conns = [listener.accept()[0] for _ in range(n)]
    go.wait()
    started = time.monotonic()
    for conn in conns if variant != "exit" else ():
        if variant == "shutdown":
            conn.shutdown(socket.SHUT_RDWR)
        else:
            conn.close()
    spent.put(time.monotonic() - started)
    spent.close()
    spent.join_thread()
    os._exit(0)


def once(n: int, variant: str) -> tuple[float, float]:
    """(seconds in the server's own loop, seconds from go to its exit)."""
    ctx = mp.get_context("fork")
    ports, spent, go, ready = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    held = ctx.Process(target=server, args=(ports, n, variant, go, spent))
    held.start()
    reader = ctx.Process(target=client, args=(ports.get(timeout=30), n, ready))
    reader.start()
    try:
        if not ready.wait(timeout=120):
            raise SystemExit("the client did not connect")
        time.sleep(1.0)  # the connections settled
        started = time.monotonic()
        go.set()
        loop_s = spent.get(timeout=60)
        held.join(timeout=60)
        return loop_s, time.monotonic() - started
    finally:
        reader.kill()
        reader.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--variants", default="exit,shutdown,close")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeat):
        for variant in results:
            results[variant].append(once(args.n, variant))
    print(f"| {args.n:,} sockets | in the process' own loop (ms) | from go to exit (ms) |\n|---|---|---|")
    for variant, runs in results.items():
        loops, totals = sorted(r[0] * 1000 for r in runs), sorted(r[1] * 1000 for r in runs)
        print(f"| {variant} | {statistics.median(loops):.0f} [{loops[0]:.0f}-{loops[-1]:.0f}] | "
              f"{statistics.median(totals):.0f} [{totals[0]:.0f}-{totals[-1]:.0f}] |")


if __name__ == "__main__":
    main()
