"""``henge rollout``: staged rollouts, started, watched, paused, resumed, aborted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .common import (
    EXIT_INTERRUPTED,
    BrokerOpt,
    DataOpt,
    JsonOpt,
    RolloutArg,
    TimeoutOpt,
    WhereOpt,
    call_op,
    emit,
    fail,
    labels_arg,
    op_help,
    read_config,
    where_arg,
)
from .render import render_table, rollout_lines
from .tree import rollout_app


@rollout_app.command("start", help=op_help("rollout.start"))
def rollout_start(
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="The config every target gets as its own layer.")],
    all_devices: Annotated[bool, typer.Option("--all", help="Every device.")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="Devices with label k=v (repeatable).")] = None,
    where: WhereOpt = None,
    waves: Annotated[str | None, typer.Option("--waves", help="Cumulative percentages, e.g. 1,10,50,100 "
                                              "(the default).")] = None,
    wave_size: Annotated[int | None, typer.Option("--wave-size", min=1, help="N devices per wave instead.")] = None,
    max_rejected: Annotated[str, typer.Option("--max-rejected", help="Halt when a wave has more rejections: N "
                                              "devices or P% of the wave.")] = "1",
    min_applied: Annotated[str, typer.Option("--min-applied", help="Percent (90 or 90%) of the wave's devices "
                                             "online at its start that must apply to go on.")] = "90",
    wave_timeout: Annotated[float, typer.Option("--wave-timeout", min=0.1, help="Seconds a wave may take to "
                                                "reach --min-applied; then it halts.")] = 300.0,
    pause: Annotated[float, typer.Option("--pause", min=0, help="Seconds between waves.")] = 0.0,
    layer: Annotated[str | None, typer.Option("--layer", help="Stage a change of this layer instead: FILE is its "
                                              "new content; the targets are the devices it alters.")] = None,
    layer_label: Annotated[list[str] | None, typer.Option("--layer-label", help="With --layer: the layer's labels "
                                                          "(k=v, repeatable; default: unchanged).")] = None,
    priority: Annotated[int | None, typer.Option("--priority", min=-1000, max=1000, help="With --layer: its "
                                                 "priority (default: unchanged, or 0).")] = None,
    message: Annotated[str, typer.Option("-m", "--message", help="Why this change.")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what it would do (its devices, how many in each "
                                          "wave, the configs it changes, one diff); start nothing.")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    if layer is not None and (all_devices or label or where):
        fail("with --layer the targets are the devices the layer change alters: no --all, --label or --where", 2)
    if layer is None and not all_devices and not label and not where:
        fail("select the devices with --all, --label k=v or --where (or stage a --layer change)", 2)
    if layer is None and (layer_label or priority is not None):
        fail("--layer-label and --priority go with --layer", 2)
    if waves is not None and wave_size is not None:
        fail("give --waves or --wave-size, not both", 2)
    try:
        applied_percent = float(min_applied.removesuffix("%"))
    except ValueError:
        fail(f"--min-applied wants a percentage like 90 or 90%, not {min_applied!r}", 2)
    if not 0 <= applied_percent <= 100:
        fail(f"--min-applied is a percentage between 0 and 100, not {min_applied!r}", 2)
    document = read_config(source, what="layer" if layer else "config")
    args: dict[str, Any] = {"all": all_devices, "labels": labels_arg(label), "where": where_arg(where),
                            "max_rejected": max_rejected,
                            "min_applied": applied_percent, "wave_timeout": wave_timeout, "pause": pause,
                            "message": message}
    if layer is None:
        args["config"] = document
    else:
        args["layer"] = {"name": layer, "content": document, "labels": labels_arg(layer_label) if layer_label else None,
                         "priority": priority}
    if wave_size is not None:
        args["wave_size"] = wave_size
    else:
        try:
            args["waves"] = [float(w) for w in (waves or "1,10,50,100").split(",")]
        except ValueError:
            fail(f"--waves wants percentages like 1,10,50,100, not {waves!r}", 2)
    if dry_run:
        preview = call_op(data, broker, timeout, "rollout.preview", **args)
        emit(preview, as_json, lambda r: (
            f"would roll out to {r['targeted']} devices in {len(r['waves'])} waves "
            f"({', '.join(map(str, r['waves']))}), "
            f"changing the config of {r['change']} ({r['unchanged']} unchanged); nothing was started"
            + (f"\n{r['example']['diff']}" if r["example"] else "")))
        return
    result = call_op(data, broker, timeout, "rollout.start", **args)
    emit(result, as_json, lambda r: f"rollout {r['id']} started: {r['devices']} devices in "
          f"{len(r['waves'])} waves ({', '.join(str(w['targeted']) for w in r['waves'])})\n"
          f"follow it: henge rollout status {r['id']} --watch 2")


@rollout_app.command("status", help=op_help("rollout.status"))
def rollout_status(
    rollout: RolloutArg,
    watch: Annotated[float | None, typer.Option("--watch", min=0.2, help="Redraw every S seconds until it "
                                                "ends (or Ctrl-C).")] = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    import time as _time

    try:
        while True:
            result = call_op(data, broker, timeout, "rollout.status", rollout=rollout)
            if watch is not None and not as_json and sys.stdout.isatty():
                typer.echo("\x1b[H\x1b[2J", nl=False)
            emit(result, as_json, rollout_lines)
            if watch is None or result["state"] not in ("running", "paused", "reverting"):
                return
            _time.sleep(watch)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


@rollout_app.command("list", help=op_help("rollout.list"))
def rollout_list(data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                 timeout: TimeoutOpt = 10.0) -> None:
    rows = call_op(data, broker, timeout, "rollout.list")
    people = [{"id": r["id"], "state": r["state"], "wave": f"{r['wave']}/{r['waves']}", "started": r["created_at"],
               "by": r["actor"], "reason": r["reason"]} for r in rows]
    emit(rows, as_json, lambda _: render_table(people, ["id", "state", "wave", "started", "by", "reason"])
          if rows else "no rollouts")


@rollout_app.command("pause", help=op_help("rollout.pause"))
def rollout_pause(rollout: RolloutArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 10.0) -> None:
    emit(call_op(data, broker, timeout, "rollout.pause", rollout=rollout), as_json, rollout_lines)


@rollout_app.command("resume", help=op_help("rollout.resume"))
def rollout_resume(rollout: RolloutArg, data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 10.0) -> None:
    emit(call_op(data, broker, timeout, "rollout.resume", rollout=rollout), as_json, rollout_lines)


@rollout_app.command("abort", help=op_help("rollout.abort"))
def rollout_abort(
    rollout: RolloutArg,
    revert: Annotated[bool, typer.Option("--revert", help="Put every device it changed back on its previous "
                                         "config (as a new version).")] = False,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0,
) -> None:
    emit(call_op(data, broker, timeout, "rollout.abort", rollout=rollout, revert=revert), as_json, rollout_lines)
