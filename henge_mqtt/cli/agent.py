"""``henge agent``: the device side, for devices that have a shell.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import fail, log_level_of, user_errors
from .tree import app


def read_claim_file(path: Path) -> dict[str, Any]:
    """The claim file ``henge claim create`` wrote: ``{claim, secret, broker, topic_prefix}``."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        fail(f"cannot read the claim file {path}: {exc.strerror or exc}", 2)
    except ValueError as exc:
        fail(f"the claim file {path} is not JSON: {exc}", 2)
    if not isinstance(data, dict) or not isinstance(data.get("claim"), str) or not isinstance(data.get("secret"), str):
        fail(f"the claim file {path} has no claim and secret (write it with henge claim create --out FILE)", 2)
    return data


@app.command()
@user_errors
def agent(
    device: Annotated[str, typer.Option("--device", help="This device's id.")],
    secret_file: Annotated[Path, typer.Option("--secret-file", help="File holding the device secret (with "
                                              "--claim: written on first start, mode 0600).")],
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://host:port of the gateway (default: the "
                                               "claim file's).")] = None,
    claim: Annotated[Path | None, typer.Option("--claim", help="A claim file (henge claim create): with no "
                                               "secret file yet, get this device's identity with it first.")]
    = None,
    serial: Annotated[str | None, typer.Option("--serial", help="With --claim: the hardware serial, sent with "
                                               "the claim (kept as the label serial).")] = None,
    write: Annotated[Path | None, typer.Option("--write", help="Write each config (JSON) to FILE atomically.")] = None,
    exec_: Annotated[str | None, typer.Option("--exec", help="Run CMD with the config on stdin; non-zero exit "
                                              "rejects it with CMD's stderr as the error.")] = None,
    state: Annotated[Path | None, typer.Option("--state", help="State file (default ./ID.henge-state.json).")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix")] = "henge",
    mqtt: Annotated[str, typer.Option("--mqtt", help="Protocol: 5 (default; the server says why it closes a "
                                       "connection; 3.1.1 at once if the broker has no 5.0, as NATS) or 3.1.1.")] = "5",
    report_cmd: Annotated[str | None, typer.Option("--report-cmd", help="Run CMD and report the JSON object it "
                                                   "prints (e.g. the firmware version) with the agent's facts.")]
    = None,
    report_interval: Annotated[float, typer.Option("--report-interval", min=1.0, help="Seconds between checks "
                                                   "of the reported state; sent only when it changed.")] = 60.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run on a device: apply each new config, report the outcome, reconnect forever."""
    from urllib.parse import urlsplit

    from ..device import Agent, ClaimFailed, exec_applier, parse_exec, write_file_applier
    from ..ids import device_id_problem

    if (write is None) == (exec_ is None):
        fail("give exactly one of --write FILE or --exec CMD", 2)
    if mqtt not in ("5", "5.0", "3.1.1"):
        fail(f"--mqtt must be 5 or 3.1.1, not {mqtt!r}", 2)
    problem = device_id_problem(device)
    if problem:
        fail(problem, 2)
    claimed: dict[str, Any] | None = None  # the claim to use now: only while there is no secret file yet
    if claim is not None:
        found = read_claim_file(claim)  # where to connect, also once the device has its own identity
        broker = broker or found.get("broker")
        topic_prefix = found.get("topic_prefix") or topic_prefix
        claimed = None if secret_file.exists() else found
    elif serial is not None:
        fail("--serial goes with --claim", 2)
    if not broker:
        fail("give --broker mqtt://host:port (or a --claim file that names it)", 2)
    parts = urlsplit(broker)
    if parts.scheme != "mqtt" or not parts.hostname:
        fail(f"invalid broker URL {broker!r}: expected mqtt://host:port", 2)
    secret = ""
    if claimed is None:
        try:
            secret = secret_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the secret file {secret_file}: {exc.strerror or exc}")
    try:
        applier = write_file_applier(write) if write is not None else exec_applier(parse_exec(exec_ or ""))
        reporter = parse_exec(report_cmd, "--report-cmd") if report_cmd is not None else None
    except ValueError as exc:
        fail(str(exc), 2)
    logging.basicConfig(level=log_level_of(log_level),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = Agent(parts.hostname, parts.port or 1883, device, secret, applier,
                   state or Path(f"{device}.henge-state.json"), topic_prefix=topic_prefix, mqtt5=mqtt != "3.1.1",
                   config_file=write, report_cmd=reporter, report_interval=report_interval)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if claimed is not None:
            try:
                if not await worker.claim(claimed, secret_file, stop, serial=serial):
                    return  # stopped while it waited
            except ClaimFailed as exc:
                fail(f"the claim was refused: {exc}")
        await worker.run(stop)

    asyncio.run(main())
