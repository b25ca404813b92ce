"""``henge get``, ``henge history`` and ``henge status``: their work, without typer, once their line
is parsed.

The typer commands (:mod:`henge_mqtt.cli.configs`, :mod:`henge_mqtt.cli.devices`) declare the
options and call these functions; :mod:`henge_mqtt.cli.quick` calls them for a plain line without
loading typer at all (a script that reads its devices' configs one by one starts ``henge get``
thousands of times; a health check runs ``henge status`` every few seconds).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jsontext import dumps as json_text
from .plain import call_op, device_arg, echo, emit, endpoint, fail, labels_arg, where_arg


def get(device: str, *, version: int | None = None, explain: bool = False, reported: bool = False,
        reported_history: bool = False, data: Path | None = None, broker: str | None = None,
        as_json: bool = False, timeout: float = 10.0) -> None:
    if reported_history and not reported:
        fail("--history goes with --reported", code=2)
    if reported:
        if version is not None or explain:
            fail("--reported shows the device's own document: no --version or --explain with it", code=2)
        state = call_op(data, broker, timeout, "reported", device=device, history=reported_history)
        emit(state, as_json, reported_text)
        return
    args: dict[str, Any] = {"device": device}
    if version is not None:
        args["version"] = version
    if explain:
        from .render import render_table

        leaves = call_op(data, broker, timeout, "explain", **args)
        people = [{"key": leaf["pointer"] or "/", "value": json.dumps(leaf["value"]), "layer": leaf["layer"]}
                  for leaf in leaves]
        emit(leaves, as_json, lambda _: render_table(people, ["key", "value", "layer"]) if people else "(empty config)")
        return
    result = call_op(data, broker, timeout, "get", **args)
    emit(result, as_json, lambda r: json_text(r["config"]))


def reported_text(state: dict[str, Any]) -> str:
    if state["document"] is None:
        return f"{state['device']} has not reported its state yet"
    lines = [f"# {state['device']}: reported at {state['at']}, changed at {state['changed_at']} (#{state['seq']})",
             json_text(state["document"])]
    for earlier in state.get("history", [])[1:]:
        lines += [f"# #{earlier['seq']} at {earlier['at']}", json_text(earlier["document"])]
    return "\n".join(lines)


def history(device: str, *, data: Path | None = None, broker: str | None = None, as_json: bool = False,
            timeout: float = 10.0) -> None:
    rows = call_op(data, broker, timeout, "history", device=device)
    people = []
    for row in rows:
        report = row.get("report")
        said = None if not report else "applied" if report["status"] == "applied" else (
            "rejected: " + (" ".join((report["error"] or "").split()) or "no reason given"))
        people.append(row | {"sha": row["sha256"][:12], "report": said})

    def table(_: Any) -> str:
        from .render import render_table

        return render_table(people, ["version", "created_at", "actor", "sha", "report", "message"])

    emit(rows, as_json, table)


def status(device: str | None = None, *, label: list[str] | None = None, state: str | None = None,
           sync: str | None = None, conflict: bool = False, where: str | None = None, summary: bool = False,
           output: str = "table", watch: float | None = None, data: Path | None = None, broker: str | None = None,
           as_json: bool = False, timeout: float = 10.0) -> None:
    from ..results import SYNC_STATES, FleetSummary, fleet_summary, summary_line
    from .render import Output, dump, session_text, status_table, use_color

    if state not in (None, "online", "offline", "quarantined"):
        fail(f"--state must be online, offline or quarantined, not {state!r}", 2)
    if sync is not None and sync not in SYNC_STATES:
        fail(f"--sync must be {', '.join(SYNC_STATES[:-1])} or {SYNC_STATES[-1]}, not {sync!r}", 2)
    args: dict[str, Any] = {"labels": labels_arg(label), "state": state, "sync": sync}
    if where is not None:
        args["where"] = where_arg(where)
    if conflict:
        args["conflict"] = True
    if device is not None:
        args["device"] = device_arg(device)
    fmt = Output.json if as_json else Output(output)
    # The whole fleet's counts are the service's `summary` op: no row leaves it (10,000 rows through
    # a broker were seconds of every `--summary` after a failover); a filtered summary counts rows.
    whole = summary and device is None and not args["labels"] and not conflict and (state, sync, where) == (None,) * 3
    op, op_args = ("summary", {}) if whole else ("status", args)

    def render(rows: list[dict[str, Any]] | FleetSummary) -> str:
        if isinstance(rows, dict):
            return dump(rows, fmt) if fmt in (Output.json, Output.yaml) else summary_line(rows)
        counts = fleet_summary((row["state"], row["sync"], row["conflict"]) for row in rows)
        if summary:
            return dump(counts, fmt) if fmt in (Output.json, Output.yaml) else summary_line(counts)
        if fmt in (Output.json, Output.yaml):
            return dump(rows, fmt)
        text = (status_table(rows, wide=fmt == Output.wide, color=use_color())
                + "\n" + summary_line(counts))
        if device is not None and rows and rows[0].get("session"):  # one device: its MQTT session too
            text += "\nsession: " + session_text(rows[0]["session"])
        return text

    if watch is None:
        echo(render(call_op(data, broker, timeout, op, **op_args)))
        return
    _watch(render, op, op_args, watch, data, broker, timeout)


def _watch(render: Callable[[Any], str], op: str, op_args: dict[str, Any], every: float, data: Path | None,
           broker: str | None, timeout: float) -> None:
    """``henge status --watch``: one admin connection, the answer drawn again every ``every`` seconds."""
    import asyncio
    import sys
    from datetime import UTC, datetime

    from ..client import AdminClient
    from .common import run_async

    async def follow() -> None:
        async with AdminClient(endpoint(data, broker), timeout=timeout) as client:
            while True:
                text = render(await client.call(op, **op_args))
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place, like watch(1)
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                echo(f"every {every:g} s, {stamp} UTC (Ctrl-C to stop)\n{text}")
                await asyncio.sleep(every)

    run_async(follow(), until_interrupted=True)
