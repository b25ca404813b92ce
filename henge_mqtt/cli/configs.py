"""Commands on configs: push (one device, or a fleet with --all/--label), get, history, diff,
rollback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
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
    op_help,
    report_outcome,
)
from .render import use_color
from .tree import app


@app.command(help=op_help("push", 'With --all or --label, to many devices at once (answered per device).'))
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
    """The options, declared for typer; the work is ``push.push`` (which ``quick`` runs without typer)."""
    from .push import push as run

    run(target, source, all_devices=all_devices, label=label, where=where, if_version=if_version, message=message,
        force=force, patch=patch, reconcile=reconcile, wait=wait, dry_run=dry_run, data=data, broker=broker,
        as_json=as_json, timeout=timeout)


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
    """The options, declared for typer; the work is ``read.get`` (which ``quick`` runs without typer)."""
    from .read import get as run

    run(device, version=version, explain=explain, reported=reported, reported_history=reported_history,
        data=data, broker=broker, as_json=as_json, timeout=timeout)


@app.command(help=op_help("history"))
def history(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
            timeout: TimeoutOpt = 10.0) -> None:
    """The options, declared for typer; the work is ``read.history`` (which ``quick`` runs without typer)."""
    from .read import history as run

    run(device, data=data, broker=broker, as_json=as_json, timeout=timeout)


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
