"""What writing ``--json`` costs the CLI on a large answer: ``json.dumps(indent=2, sort_keys=True)``
(the standard library's pure-Python encoder, as ``indent`` makes it) against
``henge_mqtt.cli.jsontext.dumps`` (the same bytes), best of ``--repeat``.

    python bench/json_output.py [--n 10000] [--repeat 7]

Documents: a fleet push's answer (an entry per device in ``per_device`` and ``versions``) and
``henge status -o json``'s rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from henge_mqtt.cli.jsontext import dumps


def documents(n: int) -> dict[str, Any]:
    ids = [f"dev{i:05}" for i in range(n)]
    push = {"targeted": n, "per_device": {d: {"version": 5, "online": True, "delivered": True, "report": None,
                                              "error": None} for d in ids},
            "versions": {d: 5 for d in ids}}
    row = {"state": "online", "since": "2026-12-05T02:00:00Z", "remote": "127.0.0.1:5555", "reason": "connected",
           "epoch": 3, "takeovers": 0, "conflict": False, "conflict_remotes": [], "labels": {"site": "a", "hw": "2"},
           "desired_version": 5, "applied_version": 5, "sync": "in_sync", "error": None, "session": None}
    return {"push --all --json": push, "status -o json": [dict(row, device=d) for d in ids]}


def best(write: Callable[[Any], str], document: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        write(document)
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"| answer ({args.n:,} devices) | json.dumps(indent=2) ms | jsontext.dumps ms |\n|---|---|---|")
    for name, document in documents(args.n).items():
        assert dumps(document) == json.dumps(document, indent=2, sort_keys=True)
        standard = best(lambda d: json.dumps(d, indent=2, sort_keys=True), document, args.repeat)
        ours = best(dumps, document, args.repeat)
        print(f"| `henge {name}` | {standard:.1f} | {ours:.1f} ({ours / standard:.0%}) |")


if __name__ == "__main__":
    main()
