"""Safe fleet changes at fleet size: a staged rollout, a layer change and schema validation.

    python bench/rollouts.py [--n 10000] [--workers 2]

A real ``henge serve`` with N devices connected by the raw-socket load generator (other
processes), each answering every config with an ``applied`` report at once, as an agent would.

- ``rollout``: ``henge rollout start --all --waves 1,10,50,100 --min-applied 100 --pause 0``, from the
  command to ``completed``. The devices' own time per wave (first to last arrival of the new config in
  that wave, the reports going back at once) is subtracted to give the rollout's own overhead.
- ``layer``: ``henge layer set fleet FILE`` that changes all N configs, from the command to the last
  device holding its new config (stored and published, one transaction).
- ``schema``: a schema set over N stored configs (every one validated), in-process, and the check of a
  fleet push against it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

ROOT = Path(__file__).resolve().parent.parent


def cli(data: Path, *args: str, input: str | None = None) -> Any:
    out = subprocess.run([sys.executable, "-m", "henge_mqtt", *args, "--data", str(data), "--json"], input=input,
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def schema_bench(n: int) -> dict[str, float]:
    from henge_mqtt.service.schemas import Schemas
    from henge_mqtt.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-schema-"))
    store = Store(tmp / "data", synchronous="normal")
    devices = [f"s{i:05}" for i in range(n)]
    store.add_devices([(d, {"site": f"s{i % 10}"}) for i, d in enumerate(devices)])
    for i, d in enumerate(devices):
        store.push(d, {"port": 1000 + i % 50000, "name": d, "log": {"level": "info", "targets": ["a", "b"]}},
                   actor="bench")
    schemas = Schemas(store)
    schemas.load()
    schema = {"type": "object", "required": ["port"], "properties": {
        "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "name": {"type": "string", "maxLength": 64},
        "log": {"type": "object", "properties": {"level": {"enum": ["debug", "info", "warn"]},
                                                 "targets": {"type": "array", "items": {"type": "string"}}}}}}
    started = time.perf_counter()
    schemas.put("", schema, actor="bench", force=False)
    set_s = time.perf_counter() - started
    started = time.perf_counter()
    schemas.check_many(devices, {"port": 80, "name": "x", "log": {"level": "info", "targets": []}})
    check_s = time.perf_counter() - started
    store.close()
    return {"schema_set_validating_all_s": set_s, "fleet_push_check_s": check_s}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    result: dict[str, Any] = {"n": args.n} | schema_bench(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    target = run.Henge(args.n, tmp)
    target.start()
    fleet = run.LoadWorkers(target, args.workers, report=True)
    commands, results = fleet.commands, fleet.results
    try:
        fleet.connect()

        def awaiting(marker: str) -> None:
            for q in commands:
                q.put({"cmd": "await_push", "marker": marker, "timeout": 120, "ping": False, "arrivals": True})

        # A layer change that alters every config.
        marker = uuid.uuid4().hex
        awaiting(marker)
        started = time.time()
        layer = cli(target.data, "layer", "set", "fleet", "-", input=json.dumps({"m": marker}))
        replies = [results.get(timeout=300) for _ in commands]
        assert sum(r["missing"] for r in replies) == 0 and layer["devices"] == args.n
        result["layer_change_all_delivered_s"] = max(r["last"] for r in replies) - started

        # A 4-wave rollout to every device, each reporting at once.
        marker = uuid.uuid4().hex
        awaiting(marker)
        started = time.time()
        ro = cli(target.data, "rollout", "start", "-", "--all", "--waves", "1,10,50,100", "--min-applied", "100",
                 "--pause", "0", input=json.dumps({"r": marker}))
        while (status := cli(target.data, "rollout", "status", ro["id"]))["state"] == "running":
            time.sleep(0.02)
        from datetime import datetime

        # The rollout's own clock: from the stored plan to the stored completion (no CLI start-up in it).
        total = (datetime.fromisoformat(status["finished_at"]) - datetime.fromisoformat(status["created_at"])
                 ).total_seconds()
        result["rollout_command_to_completed_s"] = time.time() - started  # with the CLI's polling
        replies = [results.get(timeout=300) for _ in commands]
        assert status["state"] == "completed", status
        arrivals: dict[str, float] = {}
        for r in replies:
            arrivals.update(r["arrivals"])
        from henge_mqtt.rollout_plan import plan

        waves = plan(ro["id"], [d for d, _ in target.devices], waves=[1, 10, 50, 100])
        device_time = sum(max(arrivals[d] for d in w) - min(arrivals[d] for d in w) for w in waves)
        result.update(rollout_total_s=total, rollout_waves=[len(w) for w in waves],
                      rollout_device_time_s=device_time, rollout_overhead_s=total - device_time,
                      rollout_applied=[w["applied"] for w in status["waves"]])
    finally:
        fleet.close()
    run.save_result("rollouts", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
