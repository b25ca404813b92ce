"""Commands on configs: push (one device, or a fleet with --all/--label), get, history, diff,
rollback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    BrokerOpt,
    DataOpt,
    JsonOpt,
    TimeoutOpt,
    WaitOpt,
    WaitTimeoutOpt,
    WhereOpt,
    call_op,
    call_then_wait,
    emit,
    endpoint,
    fail,
    labels_arg,
    op_help,
    read_config,
    report_outcome,
    run_async,
    user_errors,
    where_arg,
)
from .render import fleet_failure, fleet_lines, render_table, use_color
from .tree import app


@app.command(help=op_help("push", 'With --all or --label, to many devices at once (answered per device).'))
@user_errors
def push(
    target: Annotated[str | None, typer.Argument(metavar="ID", help="The device (omit with --all/--label).")]
    = None,
    source: Annotated[str | None, typer.Argument(metavar="FILE|-", help="JSON file, or - for stdin.")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="Push to every device.")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="Push to devices with label k=v.")] = None,
    where: WhereOpt = None,
    if_version: Annotated[int | None, typer.Option("--if-version", min=0,
                                                   help="Fail unless the current version is N.")] = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    force: Annotated[bool, typer.Option("--force", help="A new version even if the content is unchanged.")]
    = False,
    patch: Annotated[bool, typer.Option("--patch", help="FILE is an RFC 7396 merge patch of the current "
                                        "config (null removes a key).")] = False,
    reconcile: Annotated[bool, typer.Option("--reconcile", help="No FILE: deliver ID's current version again "
                                            "(a config edited on the device is put back; see sync drift).")]
    = False,
    wait: WaitOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --all, --label or --where: show which devices "
                                          "would get a new version, and the first one's diff; store nothing.")]
    = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: WaitTimeoutOpt = 10.0,
) -> None:
    if dry_run and not (all_devices or label or where):
        fail("--dry-run previews a fleet push: give --all, --label k=v or --where EXPR", 2)
    if reconcile:
        if target is None or source is not None or all_devices or label or patch or force or if_version is not None:
            fail("--reconcile takes one device id and nothing else: henge push --reconcile ID", 2)
        result = call_op(data, broker, timeout, "reconcile", device=target)
        emit(result, as_json, lambda r: f"{r['device']}: version {r['version']} delivered again"
             + ("" if r["online"] else " (offline: it gets it when it connects)") + f"; sync was {r['sync']}")
        return
    if target is None:
        fail("missing FILE: henge push --all FILE (or --label k=v, --where EXPR)" if all_devices or label or where
             else "missing ID and FILE: henge push ID FILE|- (or henge push --all FILE)", 2)
    if all_devices or label or where:
        if source is not None:
            fail("with --all, --label or --where give only the FILE, no device id", 2)
        if if_version is not None or patch:
            fail("--if-version and --patch apply to a single device", 2)
        if dry_run:
            _preview(read_config(target), all_devices, labels_arg(label), where_arg(where), data, broker, as_json,
                     timeout)
            return
        _push_many(read_config(target), all_devices, labels_arg(label), where_arg(where), message, data, broker,
                   as_json, timeout, force, wait)
        return
    if source is None:
        fail("missing FILE: henge push ID FILE|-", 2)
    device = target
    document = read_config(source)
    args: dict[str, Any] = {"device": device, "patch" if patch else "config": document, "message": message,
                            "force": force}
    if if_version is not None:
        args["if_version"] = if_version
    result, outcome = call_then_wait(data, broker, timeout, "push", timeout if wait else None, **args)
    if result.get("unchanged"):
        line = f"{result['device']}: unchanged, still version {result['version']} (--force stores it again)"
    else:
        line = f"{result['device']}: version {result['version']} ({result['sha256'][:12]})"
    report_outcome(result, outcome, as_json, line)


def _preview(config: dict[str, Any], all_devices: bool, labels: dict[str, str], where: str | None,
             data: Path | None, broker: str | None, as_json: bool, timeout: float) -> None:
    result = call_op(data, broker, timeout, "push_preview", all=all_devices, labels=labels, where=where,
                     config=config)

    def text(r: dict[str, Any]) -> str:
        lines = [f"would change {r['change']} of {r['targeted']} devices ({r['unchanged']} unchanged); "
                 "nothing was stored"]
        if r["devices"]:
            lines.append("  " + ", ".join(r["devices"]) + (f" and {r['more']} more" if r["more"] else ""))
        if r["example"]:
            lines.append(r["example"]["diff"])
        return "\n".join(lines)

    emit(result, as_json, text)


def _push_many(config: dict[str, Any], all_devices: bool, labels: dict[str, str], where: str | None, message: str,
               data: Path | None, broker: str | None, as_json: bool, timeout: float, force: bool,
               wait: bool) -> None:
    show = sys.stderr.isatty() and not as_json

    def progress(state: dict[str, Any]) -> None:
        if not show:
            return
        if "applied" in state:
            done, total = state["applied"] + state["rejected"], state["devices"]
            what = (f"devices reported ({state['rejected']} rejected)" if wait else
                    f"delivered {state['delivered']}" if state.get("delivered") is not None else "published")
            if not wait and state.get("delivered") is not None:
                done, total, what = state["delivered"], state["online"], "online devices acknowledged"
        else:  # still storing and publishing, chunk by chunk
            done, total, what = state.get("stored", 0), state.get("of", 0), "devices stored and published"
        width = 30
        filled = width * done // total if total else width
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}   ")
        sys.stderr.flush()

    async def go() -> Any:
        from ..client import AdminClient

        async with AdminClient(endpoint(data, broker), timeout=timeout) as client:
            args: dict[str, Any] = {"all": all_devices, "labels": labels, "config": config, "message": message,
                                    "delivery_timeout": min(timeout, 30.0), "force": force, "where": where}
            if wait:
                args["report_timeout"] = timeout
            return await client.call("push_many", wait=timeout + min(timeout, 30.0) + 10, progress=progress, **args)

    result = run_async(go())
    if show:
        sys.stderr.write("\n")
    if as_json:
        emit(result, True, str)
    else:
        typer.echo(fleet_lines(result, wait))
    if wait and result["rejected"]:
        fail(fleet_failure(result), EXIT_REJECTED)
    if wait and result["pending"]:
        fail(fleet_failure(result), EXIT_TIMEOUT)


@app.command(help=op_help("get", 'The config itself; --json for the whole record.'))
def get(
    device: str,
    version: Annotated[int | None, typer.Option("--version", min=1, help="Default: the current one.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Per key, the layer that set it.")] = False,
    reported: Annotated[bool, typer.Option("--reported", help="What the device reports it is and runs, "
                                           "instead of the config it was sent.")] = False,
    reported_history: Annotated[bool, typer.Option("--history", help="With --reported: the documents it "
                                                   "reported before, newest first.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    if reported_history and not reported:
        fail("--history goes with --reported", code=2)
    if reported:
        if version is not None or explain:
            fail("--reported shows the device's own document: no --version or --explain with it", code=2)
        state = call_op(data, broker, timeout, "reported", device=device, history=reported_history)
        emit(state, as_json, _reported_text)
        return
    args: dict[str, Any] = {"device": device}
    if version is not None:
        args["version"] = version
    if explain:
        leaves = call_op(data, broker, timeout, "explain", **args)
        people = [{"key": leaf["pointer"] or "/", "value": json.dumps(leaf["value"]), "layer": leaf["layer"]}
                  for leaf in leaves]
        emit(leaves, as_json, lambda _: render_table(people, ["key", "value", "layer"]) if people else "(empty config)")
        return
    result = call_op(data, broker, timeout, "get", **args)
    emit(result, as_json, lambda r: json.dumps(r["config"], indent=2, sort_keys=True))


def _reported_text(state: dict[str, Any]) -> str:
    if state["document"] is None:
        return f"{state['device']} has not reported its state yet"
    lines = [f"# {state['device']}: reported at {state['at']}, changed at {state['changed_at']} (#{state['seq']})",
             json.dumps(state["document"], indent=2, sort_keys=True)]
    for earlier in state.get("history", [])[1:]:
        lines += [f"# #{earlier['seq']} at {earlier['at']}", json.dumps(earlier["document"], indent=2, sort_keys=True)]
    return "\n".join(lines)


@app.command(help=op_help("history"))
def history(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
            timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "history", device=device)
    people = []
    for row in rows:
        report = row.get("report")
        said = None if not report else "applied" if report["status"] == "applied" else (
            "rejected: " + (" ".join((report["error"] or "").split()) or "no reason given"))
        people.append(row | {"sha": row["sha256"][:12], "report": said})
    emit(rows, as_json, lambda _: render_table(people, ["version", "created_at", "actor", "sha", "report", "message"]))


@app.command(help=op_help("diff", 'Exit 1 when they differ, like diff(1).'))
def diff(device: str, a: int, b: int, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
         timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "diff", device=device, a=a, b=b)
    color = use_color()

    def paint(line: str) -> str:
        if not color or line.startswith(("+++", "---")):
            return line
        fg = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith(
            "@@") else None
        return typer.style(line, fg=fg) if fg else line

    emit(result, as_json, lambda r: "\n".join(paint(line) for line in r["diff"].splitlines()) or "(no differences)")
    if not result["same"]:
        raise typer.Exit(1)


@app.command(help=op_help("rollback"))
def rollback(
    device: str, version: int,
    message: Annotated[str, typer.Option("-m", "--message")] = "",
    wait: WaitOpt = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: WaitTimeoutOpt = 10.0,
) -> None:
    result, outcome = call_then_wait(data, broker, timeout, "rollback", timeout if wait else None,
                                      device=device, version=version, message=message)
    report_outcome(result, outcome, as_json,
                    f"{result['device']}: version {result['version']} (content of version {version})")
