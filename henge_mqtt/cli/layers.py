"""``henge layer`` and ``henge schema``: config layers and the JSON Schemas configs must satisfy.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import (
    BrokerOpt,
    DataOpt,
    JsonOpt,
    LayerArg,
    SchemaLabels,
    TimeoutOpt,
    call_op,
    emit,
    fail,
    labels_arg,
    op_help,
    read_config,
    read_document,
    where_arg,
)
from .jsontext import dumps as json_text
from .render import render_table, warn_new_devices
from .tree import layer_app, schema_app


@layer_app.command("set", help=op_help("layer.set"))
def layer_set(
    name: LayerArg,
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="The layer: a JSON object merged (RFC 7396) "
                                          "over the layers below it.")],
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable: the devices it applies to "
                                                    "(a new label layer needs at least one; default: unchanged).")]
    = None,
    priority: Annotated[int | None, typer.Option("--priority", min=-1000, max=1000, help="Label layers merge "
                                                 "lowest first (then by name); default 0 or unchanged.")] = None,
    where: Annotated[str | None, typer.Option("--where", help='Only devices this filter matches, over id, labels '
                                              'and reported state, e.g. \'reported.fw >= "2.4"\', re-evaluated as '
                                              'devices report (docs/where.md; "" removes it; default: unchanged).')]
    = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Store it even if a device added later (no config of "
                                        "its own) would get a config its schemas refuse; says which.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say which devices it would change (one diff) and "
                                          "what their schemas would say; store nothing.")] = False,
    if_version: Annotated[int | None, typer.Option("--if-version", min=0, help="Fail unless the layer's current "
                                                   "version is N (0: no version yet); nothing stored.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    args: dict[str, Any] = {"name": name, "content": read_config(source, what="layer"), "message": message,
                            "force": force}
    if where is not None:
        args["where"] = where_arg(where, standing=True) if where else ""
    if label:
        args["labels"] = labels_arg(label)
    if priority is not None:
        args["priority"] = priority
    if if_version is not None:
        args["if_version"] = if_version
    if dry_run:
        preview = call_op(data, broker, timeout, "layer.preview", **args)

        def text(r: dict[str, Any]) -> str:
            lines = [f"layer {r['layer']} would change the config of {r['change']} device(s); nothing was stored"]
            if r["devices"]:
                lines.append("  " + ", ".join(r["devices"]) + (f" and {r['more']} more" if r["more"] else ""))
            lines += [f"schema: {line}" for line in r["invalid"]]
            lines += [f"schema (a device added later): {line}" for line in r["new_devices_invalid"]]
            if r["example"]:
                lines.append(r["example"]["diff"])
            return "\n".join(lines)

        emit(preview, as_json, text)
        return
    result = call_op(data, broker, timeout, "layer.set", **args)
    if not as_json:
        result.pop("versions")
    emit(result, as_json, lambda r: f"layer {r['layer']} is at version {r['version']}; "
          f"{r['devices']} device(s) got a new version")
    warn_new_devices(result, as_json)


@layer_app.command("get", help=op_help("layer.get"))
def layer_get(name: LayerArg, version: Annotated[int | None, typer.Option("--version", min=1)] = None,
              data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
              timeout: TimeoutOpt = 10.0) -> None:
    args: dict[str, Any] = {"name": name} | ({"version": version} if version else {})
    result = call_op(data, broker, timeout, "layer.get", **args)
    if result["content"] is None and not as_json:
        fail(f"layer {name} was removed at version {result['version']}")
    emit(result, as_json, lambda r: json_text(r["content"]))


@layer_app.command("list", help=op_help("layer.list"))
def layer_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
               timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "layer.list")
    people = [{"layer": r["layer"], "version": r["version"],
               "priority": r["priority"] if r["layer"] != "fleet" else "-",
               "labels": ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "(all)",
               "where": r.get("where") or "-"} for r in rows]
    emit(rows, as_json,
         lambda _: render_table(people, ["layer", "version", "priority", "labels", "where"]) if rows else "no layers")


@layer_app.command("history", help=op_help("layer.history"))
def layer_history(name: LayerArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "layer.history", name=name)
    people = [{"version": r["version"], "at": r["created_at"], "by": r["actor"],
               "change": "removed" if r["removed"] else "set", "message": r["message"]} for r in rows]
    emit(rows, as_json, lambda _: render_table(people, ["version", "at", "by", "change", "message"]))


@layer_app.command("diff", help=op_help("layer.diff", 'Exit 1 when they differ, like diff(1).'))
def layer_diff(name: LayerArg, a: int, b: int, data: DataOpt = None, broker: BrokerOpt = None,
               as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "layer.diff", name=name, a=a, b=b)
    emit(result, as_json, lambda r: r["diff"] or "(no difference)")
    if not result["same"]:
        raise typer.Exit(1)


@layer_app.command("rollback", help=op_help("layer.rollback"))
def layer_rollback(name: LayerArg, version: int, message: Annotated[str, typer.Option("-m", "--message")] = "",
                   data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 60.0) -> None:
    result = call_op(data, broker, timeout, "layer.rollback", name=name, version=version, message=message)
    if not as_json:
        result.pop("versions")
    emit(result, as_json, lambda r: f"layer {r['layer']} is at version {r['version']}; "
          f"{r['devices']} device(s) got a new version")


@layer_app.command("remove", help=op_help("layer.remove"))
def layer_remove(name: LayerArg, message: Annotated[str, typer.Option("-m", "--message")] = "",
                 force: Annotated[bool, typer.Option("--force", help="Remove it even if a device added later "
                                                     "would then get a config its schemas refuse.")] = False,
                 data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                 timeout: TimeoutOpt = 60.0) -> None:
    result = call_op(data, broker, timeout, "layer.remove", name=name, message=message, force=force)
    emit(result, as_json, lambda r: f"layer {r['layer']} removed; {r['devices']} device(s) got a new version")
    warn_new_devices(result, as_json)


@schema_app.command("set", help=op_help("schema.set"))
def schema_set(
    source: Annotated[str, typer.Argument(metavar="FILE", help="A JSON Schema 2020-12 document, or - for stdin.")],
    label: SchemaLabels = None,
    force: Annotated[bool, typer.Option("--force", help="Store it even if current configs break it (those "
                                        "devices then show sync invalid).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say which current configs it would refuse (each "
                                          "violation); store nothing.")] = False,
    if_version: Annotated[int | None, typer.Option("--if-version", min=0, help="Fail unless the schema's current "
                                                   "version is N (0: none yet); nothing stored.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0,
) -> None:
    document = read_document(source)
    if dry_run:
        preview = call_op(data, broker, timeout, "schema.preview", labels=labels_arg(label), document=document)
        emit(preview, as_json, lambda r: f"schema {r['schema']} would be version {r['version']} and refuse the "
             f"config of {len(r['invalid_devices']) + r['more']} device(s); nothing was stored"
             + "".join(f"\n  {line}" for line in r["violations"]))
        return
    extra: dict[str, Any] = {"if_version": if_version} if if_version is not None else {}
    result = call_op(data, broker, timeout, "schema.set", labels=labels_arg(label), document=document, force=force,
                     **extra)
    bad = result["invalid_devices"]
    emit(result, as_json, lambda r: f"schema {r['schema']} is at version {r['version']}" + (
        f"\n{len(bad)} device(s) now invalid: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}" if bad else ""))


@schema_app.command("get", help=op_help("schema.get"))
def schema_get(
    label: SchemaLabels = None,
    version: Annotated[int | None, typer.Option("--version", min=1, help="An older version.")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    args: dict[str, Any] = {"labels": labels_arg(label)} | ({"version": version} if version else {})
    result = call_op(data, broker, timeout, "schema.get", **args)
    if result["document"] is None:
        fail(f"schema {result['schema']} was removed at version {result['version']}")
    emit(result, as_json, lambda r: json_text(r["document"]))


@schema_app.command("list", help=op_help("schema.list"))
def schema_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "schema.list")
    emit(rows, as_json, lambda r: render_table(r, ["schema", "version"]) if r else "no schemas")


@schema_app.command("history", help=op_help("schema.history"))
def schema_history(label: SchemaLabels = None, data: DataOpt = None, broker: BrokerOpt = None,
                   as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "schema.history", labels=labels_arg(label))
    people = [{"version": r["version"], "at": r["created_at"], "by": r["actor"],
               "change": "removed" if r["removed"] else "set"} for r in rows]
    emit(rows, as_json, lambda _: render_table(people, ["version", "at", "by", "change"]))


@schema_app.command("remove", help=op_help("schema.remove"))
def schema_remove(label: SchemaLabels = None, data: DataOpt = None, broker: BrokerOpt = None,
                  as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0) -> None:
    result = call_op(data, broker, timeout, "schema.remove", labels=labels_arg(label))
    emit(result, as_json, lambda r: f"schema {r['schema']} removed (version {r['version']})")
