"""``henge get`` and ``henge history``: their work, without typer, once their line is parsed.

The typer commands (:mod:`henge_mqtt.cli.configs`) declare the options and call these functions;
:mod:`henge_mqtt.cli.quick` calls them for a plain line without loading typer at all (a script that
reads its devices' configs one by one starts ``henge get`` thousands of times).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plain import call_op, emit, fail


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
    emit(result, as_json, lambda r: json.dumps(r["config"], indent=2, sort_keys=True))


def reported_text(state: dict[str, Any]) -> str:
    if state["document"] is None:
        return f"{state['device']} has not reported its state yet"
    lines = [f"# {state['device']}: reported at {state['at']}, changed at {state['changed_at']} (#{state['seq']})",
             json.dumps(state["document"], indent=2, sort_keys=True)]
    for earlier in state.get("history", [])[1:]:
        lines += [f"# #{earlier['seq']} at {earlier['at']}", json.dumps(earlier["document"], indent=2, sort_keys=True)]
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
