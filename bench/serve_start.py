"""How long `henge serve` takes to start, and its RSS then: a fresh data dir, HTTP on (as deployed).

    python bench/serve_start.py [ROOT ...]     # each ROOT a checkout (PYTHONPATH), in alternation

Time from spawning the process to its "serving on" line (the data dir created, the store opened,
the listeners and the HTTP port bound), five times per checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def once(root: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as data:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "henge_mqtt", "serve", "--data", data, "--port", "0", "--http", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if "serving on" in line:
                    break
            took = time.perf_counter() - started
            with open(f"/proc/{proc.pid}/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        return took, rss


def main() -> None:
    roots = [Path(r).resolve() for r in sys.argv[1:]] or [ROOT]
    seen: dict[Path, list[tuple[float, float]]] = {r: [] for r in roots}
    for _ in range(5):
        for root in roots:
            seen[root].append(once(root))
    for root, runs in seen.items():
        print(f"{root}: start {min(t for t, _ in runs):.2f}-{max(t for t, _ in runs):.2f} s, "
              f"RSS {min(r for _, r in runs):.1f}-{max(r for _, r in runs):.1f} MB")


if __name__ == "__main__":
    main()
