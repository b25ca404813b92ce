"""How long the ``henge`` command takes, from exec to exit: ``--version``, and a one-device ``push``
(and ``get``, ``history``, ``status``, ``device add``) against a running service, beside the
interpreter's own start as the floor.

Runs the ``henge`` found on PATH (or ``--henge PATH``): measure an installed copy (``pip install .``
in a fresh venv), not an editable one, whose import hook costs ~15 ms of its own. The service is
started on a port the kernel picks, in a temporary data dir.

    python bench/cli_start.py [--henge /tmp/venv/bin/henge] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def timed(cmd: list[str] | Callable[[int], list[str]], runs: int, env: dict[str, str],
          before: object = None) -> list[float]:
    """Wall time of ``cmd`` (or of ``cmd(i)``, run i's line), ``runs`` times (milliseconds); every
    run must succeed."""
    out = []
    for i in range(runs):
        if callable(before):
            before(i)
        line = cmd(i) if callable(cmd) else cmd
        started = time.perf_counter()
        done = subprocess.run(line, capture_output=True, env=env)
        out.append((time.perf_counter() - started) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(line)} failed: {done.stderr.decode().strip()}")
    return sorted(out)


def line(name: str, ms: list[float]) -> str:
    return f"| {name} | {statistics.median(ms):.0f} | {ms[0]:.0f}-{ms[-1]:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--henge", default=shutil.which("henge"))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if not args.henge:
        raise SystemExit("no henge on PATH: pip install . (or pass --henge)")
    henge = str(Path(args.henge).resolve())
    python = Path(henge).read_text().splitlines()[0].removeprefix("#!").strip()  # the interpreter it runs on
    data = Path(tempfile.mkdtemp()) / "data"
    env = {**os.environ, "HENGE_DATA": str(data)}
    serve = subprocess.Popen([henge, "serve", "--data", str(data), "--port", "0", "--no-http"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert serve.stdout is not None
        for text in serve.stdout:
            if "serving on" in text:
                break
        else:
            raise SystemExit("henge serve did not start")
        subprocess.run([henge, "device", "add", "d1"], check=True, capture_output=True, env=env)
        config = data.parent / "c.json"

        def fresh(i: int) -> None:  # a new config each time: every push stores a version
            config.write_text(json.dumps({"n": i, "at": time.time()}))

        rows = [
            line(f"`{Path(python).name} -c pass` (the floor)", timed([python, "-c", "pass"], args.runs, env)),
            line("`henge --version`", timed([henge, "--version"], args.runs, env)),
            line("`henge push d1 c.json`", timed([henge, "push", "d1", str(config)], args.runs, env, fresh)),
            line("`henge get d1`", timed([henge, "get", "d1"], args.runs, env)),
            line("`henge history d1`", timed([henge, "history", "d1"], args.runs, env)),
            line("`henge status d1`", timed([henge, "status", "d1"], args.runs, env)),
            line("`henge device add dN --label site=a`",
                 timed(lambda i: [henge, "device", "add", f"d{i + 2}", "--label", "site=a"], args.runs, env)),
        ]
    finally:
        serve.terminate()
        serve.wait(timeout=20)
    print(f"{args.runs} runs each, milliseconds from exec to exit\n")
    print("| command | median | min-max |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
