"""What the idle process is made of: the RSS each import adds, in the order the service loads them.

    python bench/import_rss.py      # run it with the interpreter of a fresh `pip install .`
"""

from __future__ import annotations

import importlib

# Everything up to henge_mqtt.http is what `henge serve` holds idle with the HTTP API on; the engine
# (FastAPI, uvicorn, the app's routes) is loaded when the first HTTP client connects, jsonschema when
# a config schema is first checked.
STEPS = ("asyncio", "pydantic", "henge_mqtt.models", "henge_mqtt.service", "typer", "henge_mqtt.cli.serve",
         "henge_mqtt.http", "fastapi", "uvicorn", "henge_mqtt.http.engine", "jsonschema")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    before = rss_mb()
    print(f"| the interpreter | {before:.1f} MB |\n|---|---|")
    for module in STEPS:
        importlib.import_module(module)
        now = rss_mb()
        print(f"| + {module} | {now - before:.1f} MB (total {now:.1f}) |")
        before = now


if __name__ == "__main__":
    main()
