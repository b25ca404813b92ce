"""The HTTP API and console at fleet size: status, pages, the console's first render, and what 50
live event streams cost a fleet push.

    python bench/http_api.py [--n 10000] [--offline 0] [--workers 2] [--sse 50] [--rounds 3]

A real ``henge serve`` (HTTP on, as deployed) with N devices connected by the raw-socket load
generator (bench/loadgen.py, other processes). Measured:

- ``GET /api/v1/devices?limit=N`` (every status row) and a 500-row page, from another process;
- the console's first render in Debian's Chromium: from navigation to its first rows, to every
  row loaded and counted, and a search typed until the table answers (with ``--offline M`` more
  devices in the store, never connected: 100,000 in the store and 10,000 connected is
  ``--n 10000 --offline 90000``);
- the fleet push (``henge push --all``, all N delivered and acknowledged) with no event stream
  open, then with ``--sse`` clients (another process) streaming every event, interleaved
  ``--rounds`` times; the ratio of the medians is the cost of the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import run


def timed_gets(url: str, token: str, path: str, repeat: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        c.get(path).raise_for_status()  # warm
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = c.get(path)
            out.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
    return out


def sse_clients(url: str, token: str, count: int, ready: Any, stop: Any, counts: Any) -> None:
    async def one(i: int, started: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=None) as c, \
                c.stream("GET", "/api/v1/events") as r:
            started.set()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    counts[i] += 1

    async def main() -> None:
        flags = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(one(i, f)) for i, f in enumerate(flags)]
        await asyncio.gather(*(f.wait() for f in flags))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def console(url: str, token: str, n: int, storm: Any, total: int | None = None,
                  trace: str | None = None) -> dict[str, float]:
    """First render with N devices, then the page's responsiveness while ``storm()`` (in a thread)
    reconnects the fleet: the worst delay of a 50 ms heartbeat evaluated in the page, and how long
    after the storm the page shows every device online again."""
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = await browser.new_page()
        await page.goto(url)
        await page.evaluate("t => sessionStorage.setItem('henge-token', t)", token)
        if trace:
            await browser.start_tracing(page=page, path=trace + ".load.json", categories=[
                "devtools.timeline", "disabled-by-default-devtools.timeline", "v8.execute", "blink", "loading"])
        t0 = time.perf_counter()
        await page.reload()
        await expect(page.locator("#devices tbody tr").first).to_be_visible(timeout=30_000)
        first_rows = time.perf_counter() - t0
        if trace:
            await browser.stop_tracing()
        everyone = total or n
        await expect(page.locator("#shown")).to_contain_text(
            re.compile(f"(of {everyone} devices|{everyone} in all)"), timeout=60_000)
        await expect(page.locator("#live")).to_have_text("live")
        out = {"console_first_rows_s": first_rows, "console_first_render_s": time.perf_counter() - t0}
        searches = []
        for probe in ("dev00042", "dev0999", "dev00"):
            await page.locator("#f-q").fill("")
            await expect(page.locator("#shown")).to_contain_text(f"of {everyone} matching")
            t1 = time.perf_counter()
            await page.locator("#f-q").fill(probe)
            await expect(page.locator("#shown")).not_to_contain_text(f"of {everyone} matching")
            searches.append(time.perf_counter() - t1)
        await page.locator("#f-q").fill("")
        out["console_search_ms"] = statistics.median(searches) * 1000
        # Chromium's own measure of a frozen page: every task over 50 ms, reported by a PerformanceObserver.
        await page.evaluate("""() => { window.__long = [];
            new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__long.push(e.duration); })
              .observe({ type: "longtask" }); }""")
        worst = 0.0
        if trace:  # Chromium's own trace of the storm (chrome://tracing, or Perfetto), to see what a long task was
            await browser.start_tracing(page=page, path=trace, categories=[
                "devtools.timeline", "disabled-by-default-devtools.timeline", "v8.execute", "blink", "loading"])
        storming = asyncio.get_running_loop().run_in_executor(None, storm)
        while not storming.done():
            t1 = time.perf_counter()
            await page.evaluate("() => document.querySelectorAll('tbody tr').length")
            worst = max(worst, time.perf_counter() - t1)
            await asyncio.sleep(0.05)
        storm_done = time.perf_counter()
        await storming
        if trace:
            await browser.stop_tracing()
        await expect(page.locator("#sum-online b")).to_have_text(str(n), timeout=30_000)
        out["console_storm_worst_ms"] = worst * 1000
        long_tasks = await page.evaluate("() => window.__long")
        out["console_storm_long_tasks"] = len(long_tasks)
        out["console_storm_longest_task_ms"] = max(long_tasks, default=0.0)
        out["console_online_after_storm_s"] = time.perf_counter() - storm_done
        await browser.close()
        return out


def add_offline(data: Path, count: int) -> None:
    """``count`` devices in the store that never connect (``off000000``...), written straight into
    SQLite: a bench fixture (through ``device import`` each would cost its bcrypt hash, minutes)."""
    import sqlite3

    from henge_mqtt.store import DB_FILE, Store

    Store(data).close()  # the schema
    with sqlite3.connect(data / DB_FILE) as db:
        db.executemany("INSERT INTO devices (id, secret_hash, labels, created_at) VALUES (?, ?, '{}', ?)",
                       [(f"off{i:06d}", "0" * 64, "2026-12-04T00:00:00+00:00") for i in range(count)])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sse", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--offline", type=int, default=0, help="more devices in the store, never connected")
    parser.add_argument("--trace", default=None, help="write Chromium's trace of the storm to this file")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    target = run.Henge(args.n, tmp)
    result: dict[str, Any] = {"n": args.n, "offline": args.offline, "sse_clients": args.sse}
    if args.offline:
        add_offline(tmp / "data", args.offline)
    target.start()
    fleet = run.LoadWorkers(target, args.workers)
    commands, results = fleet.commands, fleet.results
    ctx = mp.get_context("spawn")
    try:
        url = f"http://127.0.0.1:{target.http_port}"
        token = (target.data / "http-token").read_text().strip()
        fleet.connect()

        def push() -> float:
            marker = uuid.uuid4().hex
            for q in commands:
                q.put({"cmd": "await_push", "marker": marker, "timeout": 120, "ping": False})
            t0 = time.time()
            target.push(marker)
            replies = [results.get(timeout=300) for _ in commands]
            assert sum(r["missing"] for r in replies) == 0
            return max(r["last"] for r in replies) - t0

        push()  # every device has a version: status rows are complete
        full = timed_gets(url, token, f"/api/v1/devices?limit={args.n}", 7)
        page = timed_gets(url, token, "/api/v1/devices?limit=500", 15)
        middle = timed_gets(url, token, f"/api/v1/devices?limit=500&cursor=dev{args.n // 2:05}", 15)
        summary = timed_gets(url, token, "/api/v1/summary", 7)
        result.update(status_all_ms=statistics.median(full), page_500_ms=statistics.median(page),
                      page_500_middle_ms=statistics.median(middle), summary_ms=statistics.median(summary))

        plain, streamed, delivered = [], [], []
        for _ in range(args.rounds):
            plain.append(push())
            ready, stop = ctx.Event(), ctx.Event()
            counts = ctx.Array("l", args.sse)
            sse = ctx.Process(target=sse_clients, args=(url, token, args.sse, ready, stop, counts))
            sse.start()
            assert ready.wait(60), "the event streams did not open"
            before = sum(counts)
            streamed.append(push())
            time.sleep(1.0)
            delivered.append((sum(counts) - before) / args.sse)
            stop.set()
            sse.join(30)
        if not args.rounds:
            plain = streamed = delivered = [float("nan")]
        result.update(push_rounds=plain, push_with_sse_rounds=streamed, push_s=statistics.median(plain),
                      push_with_sse_s=statistics.median(streamed),
                      sse_slowdown=statistics.median(streamed) / statistics.median(plain),
                      events_per_stream=statistics.median(delivered))

        def storm() -> None:
            start_at = time.time() + 0.5
            for q in commands:
                q.put({"cmd": "storm", "count": args.n // args.workers, "start_at": start_at, "timeout": 120})
            replies = [results.get(timeout=300) for _ in commands]
            result["storm_devices"] = sum(args.n // args.workers for _ in commands)
            result["storm_failed"] = sum(r["failed"] for r in replies)

        result.update(asyncio.run(console(url + "/", token, args.n, storm, total=args.n + args.offline,
                                           trace=args.trace)))
    finally:
        fleet.close()
    run.save_result("http", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
