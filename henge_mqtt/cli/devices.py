"""Commands on devices: register, list, show, label, import/export, remove, rotate a secret;
status, kick, clear a conflict.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    BrokerOpt,
    DataOpt,
    JsonOpt,
    TimeoutOpt,
    WhereOpt,
    call_op,
    emit,
    fail,
    labels_arg,
    op_help,
)
from .render import Output, age, broker_said, device_block, render_table
from .tree import app, device_app


@device_app.command("add", help=op_help("device.add"))
def device_add(
    device: str,
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    from . import provision

    provision.device_add(device, label=label, data=data, broker=broker, as_json=as_json, timeout=timeout)


@device_app.command("list", help=op_help("device.list"))
def device_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "device.list")
    now = datetime.now(UTC)
    people = [{"id": r["id"], "version": r["desired_version"], "created": age(r["created_at"], now) + " ago",
               "labels": ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or None} for r in rows]
    emit(rows, as_json, lambda _: render_table(people, ["id", "version", "created", "labels"]))


@device_app.command("show", help=op_help("device.show"))
def device_show(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "device.show", device=device)
    emit(result, as_json, device_block)


@device_app.command("remove", help=op_help("device.remove"))
def device_remove(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "device.remove", device=device)
    said = broker_said(result)
    emit(result, as_json, lambda r: f"device {r['device']} removed" + said)


@device_app.command("rotate-secret", help=op_help("device.rotate_secret"))
def device_rotate(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "device.rotate_secret", device=device)
    said = broker_said(result)
    emit(result, as_json, lambda r: f"new secret for {r['device']}: {r['secret']}" + said)


@device_app.command("import", help=op_help("device.import", 'Their secrets go to a 0600 file, never to the screen.'))
def device_import(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="CSV (id column + one column per label) "
                                           "or JSON lines ({\"id\", \"labels\"}).")],
    secrets_out: Annotated[Path, typer.Option("--secrets-out", help="Where to write id,secret (mode 0600).")]
    = Path("henge-secrets.csv"),
    update: Annotated[bool, typer.Option("--update", help="Existing devices get the labels in FILE (secrets "
                                         "kept) instead of refusing the import.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    from ..bulk import read_devices, write_secrets

    devices = read_devices(source)
    if secrets_out.exists():
        fail(f"{secrets_out} already exists: choose another --secrets-out (secrets are never overwritten)")
    result = call_op(data, broker, timeout, "device.import", devices=[{"id": d, "labels": lb} for d, lb in devices],
                   update=update)
    if result["secrets"]:
        write_secrets(secrets_out, result["secrets"])
    summary = {"imported": len(result["secrets"]), "updated": result.get("updated", 0),
               "secrets_file": str(secrets_out) if result["secrets"] else None, "broker": result.get("broker")}
    said = broker_said(result)
    emit(summary, as_json, lambda r: f"imported {r['imported']} devices, updated {r['updated']}"
          + (f"; secrets in {r['secrets_file']} (mode 0600)" if r["secrets_file"] else "") + said)


@device_app.command("label", help=op_help("device.label", 'kubectl style: site=berlin tier-.'))
def device_label(
    device: str,
    changes: Annotated[list[str], typer.Argument(metavar="k=v|k-", help="Set k=v, or remove k with k-.")],
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for change in changes:
        if "=" in change:
            to_set.update(labels_arg([change]))
        elif change.endswith("-") and len(change) > 1:
            to_remove.append(change[:-1])
        else:
            fail(f"invalid label change {change!r}: use key=value to set or key- to remove", 2)
    result = call_op(data, broker, timeout, "device.label", device=device, set=to_set, remove=to_remove)
    emit(result, as_json, lambda r: f"{r['device']}: " + (",".join(f"{k}={v}" for k, v in
                                                                   sorted(r["labels"].items())) or "no labels"))


@device_app.command("export", help=op_help("device.export", 'CSV, or JSON lines with --json.'))
def device_export(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 60.0) -> None:
    from ..bulk import devices_csv

    rows = call_op(data, broker, timeout, "device.export")
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
    else:
        typer.echo(devices_csv(rows), nl=False)


@app.command(help=op_help("status", 'A fleet summary line at the end.'))
def status(
    device: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Only devices with label k=v (repeatable).")]
    = None,
    state: Annotated[str | None, typer.Option("--state", help="Only devices online, offline or quarantined.")]
    = None,
    sync: Annotated[str | None, typer.Option("--sync", help="Only devices in_sync, drift, pending, rejected, "
                                                            "unknown or invalid.")]
    = None,
    conflict: Annotated[bool, typer.Option("--conflict", help="Only devices with an identity conflict.")] = False,
    where: WhereOpt = None,
    summary: Annotated[bool, typer.Option("--summary", help="Only the fleet summary.")] = False,
    output: Annotated[Output, typer.Option("-o", "--output", help="table (fits 100 columns), wide, json, yaml.")]
    = Output.table,
    watch: Annotated[float | None, typer.Option("--watch", min=0.5, help="Redraw every S seconds until Ctrl-C.")]
    = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    from . import read

    read.status(device, label=label, state=state, sync=sync, conflict=conflict, where=where, summary=summary,
                output=output, watch=watch, data=data, broker=broker, as_json=as_json, timeout=timeout)


@app.command(help=op_help("kick"))
def kick(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
         timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "kick", device=device)
    if result.get("supported") is False:
        if as_json:
            emit(result, as_json, str)
        fail(f"{device}: not kicked: {result.get('detail') or 'not supported by this broker'}")
    emit(result, as_json, lambda r: f"{r['device']}: {'kicked' if r['kicked'] else 'was not connected'}")


@app.command("clear-conflict", help=op_help("clear_conflict"))
def clear_conflict(device: str, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "clear_conflict", device=device)
    emit(result, as_json, lambda r: f"{r['device']}: {'cleared' if r['cleared'] else 'no conflict'}")
