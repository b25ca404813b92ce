"""Commands that read what happened: the live event stream and the audit trail.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

from .common import BrokerOpt, DataOpt, JsonOpt, TimeoutOpt, call_op, device_arg, emit, endpoint, op_help, run_async
from .render import render_table
from .tree import app


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow/--no-follow", "-f", help="Reconnect (with backoff) when the "
                                         "service restarts; --no-follow ends, exit 1, when the connection does.")]
    = True,
    device: Annotated[str | None, typer.Option("--device", help="Only this device's events.")] = None,
    kind: Annotated[list[str] | None, typer.Option("--type", help="Only events of this type (repeatable).")]
    = None,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    """Stream service events as they happen until Ctrl-C (exit 130); reconnects when the service restarts."""
    from ..backoff import Backoff
    from ..errors import ServiceUnavailable

    kinds = set(kind or [])

    async def go() -> None:
        from ..client import AdminClient

        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                async with AdminClient(endpoint(data, broker), timeout=timeout) as client:
                    backoff.reset()
                    async for event in client.events():
                        if (device and event.device != device) or (kinds and event.type not in kinds):
                            continue
                        if as_json:
                            typer.echo(event.model_dump_json())
                        else:
                            extra = " ".join(f"{k}={v}" for k, v in event.data.items() if v is not None)
                            typer.echo(f"{event.at} {event.type} {event.device or '-'} {extra}".rstrip())
            except ServiceUnavailable as exc:
                if not follow:
                    raise
                delay = backoff.next_delay()
                sys.stderr.write(f"henge: {exc}; reconnecting in {delay:.1f} s\n")
                await asyncio.sleep(delay)

    run_async(go(), until_interrupted=True)


@app.command(help=op_help("audit"))
def audit(
    device: Annotated[str | None, typer.Option("--device", help="Only this device's entries.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N entries.")] = 100,
    data: DataOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 10.0,
) -> None:
    args: dict[str, Any] = {"limit": limit}
    if device is not None:
        args["device"] = device_arg(device, "--device")
    rows = call_op(data, broker, timeout, "audit", **args)
    for row in rows:
        row["details"] = " ".join(f"{k}={v}" for k, v in sorted(row["summary"].items()))
    emit(rows, as_json, lambda r: render_table(r, ["at", "actor", "action", "device", "details"]))
