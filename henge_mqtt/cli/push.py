"""What ``henge push`` does once its line is parsed: one device, or a fleet (``--all``, ``--label``,
``--where``) with its progress bar, a preview (``--dry-run``), a reconcile. No typer and no asyncio:
``quick`` runs it straight from a plain command line, ``configs`` (the typer command, for help and
everything unusual) hands its parsed options here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .plain import (
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    call_op,
    call_then_wait,
    echo,
    emit,
    fail,
    labels_arg,
    read_config,
    report_outcome,
    user_errors,
    where_arg,
)


@user_errors
def push(target: str | None, source: str | None, *, all_devices: bool = False, label: list[str] | None = None,
         where: str | None = None, if_version: int | None = None, message: str = "", force: bool = False,
         patch: bool = False, reconcile: bool = False, wait: bool = False, dry_run: bool = False,
         data: Path | None = None, broker: str | None = None, as_json: bool = False, timeout: float = 10.0) -> None:
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
    from .render import fleet_failure, fleet_lines

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

    args: dict[str, Any] = {"all": all_devices, "labels": labels, "config": config, "message": message,
                            "delivery_timeout": min(timeout, 30.0), "force": force, "where": where}
    if wait:
        args["report_timeout"] = timeout
    result = call_op(data, broker, timeout, "push_many", wait=timeout + min(timeout, 30.0) + 10, progress=progress,
                     **args)
    if show:
        sys.stderr.write("\n")
    if as_json:
        emit(result, True, str)
    else:
        echo(fleet_lines(result, wait))
    if wait and result["rejected"]:
        fail(fleet_failure(result), EXIT_REJECTED)
    if wait and result["pending"]:
        fail(fleet_failure(result), EXIT_TIMEOUT)
