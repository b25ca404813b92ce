"""What every command shares: typer's declarations of the common options, ``run_async`` for the
commands that stream or watch (on asyncio), and, from ``plain``, everything a command does once its
line is parsed (the one way to fail, the admin call, reading configs and labels).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..errors import HengeError
from .plain import (
    EXIT_INTERRUPTED,
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    call_op,
    call_then_wait,
    device_arg,
    emit,
    endpoint,
    fail,
    fail_with,
    labels_arg,
    read_config,
    read_document,
    report_outcome,
    user_errors,
    where_arg,
)

__all__ = [
    "EXIT_INTERRUPTED", "EXIT_REJECTED", "EXIT_TIMEOUT", "BrokerOpt", "DataOpt", "JsonOpt", "LayerArg", "RolloutArg",
    "SchemaLabels", "TimeoutOpt", "WaitOpt", "WaitTimeoutOpt", "WhereOpt", "call_op", "call_then_wait", "device_arg",
    "emit", "endpoint", "fail", "labels_arg", "log_level_of", "op_help", "read_config", "read_document",
    "report_outcome", "run_async", "user_errors", "where_arg",
]


DataOpt = Annotated[
    Path | None,
    typer.Option("--data", envvar="HENGE_DATA", help="Data dir of a local service (default ./henge-data)."),
]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="HENGE_BROKER", help="mqtt[s]://host:port of the service; credentials from "
                 "HENGE_ADMIN_USER/SECRET (TLS files: HENGE_CA/CERT/KEY) or the client config file."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the service.")]
WaitTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, help="Seconds to wait for the service (with --wait: for the device).")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="Wait until the device (with --all/--label: every device) reports the version applied "
    "(exit 0) or rejected (exit 3); exit 4 on timeout.")]

T = TypeVar("T")


def op_help(op: str, more: str = "", *, details: str = "") -> str:
    """A command's help: the operation's one line from the op table, then what only the CLI adds."""
    from ..ops import doc

    first = f"{doc(op)} {more}".strip()
    return f"{first}\n\n{details}" if details else first


def log_level_of(name: str) -> int:
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
    if name.lower() not in levels:
        fail(f"--log-level must be one of {', '.join(levels)}, not {name!r}", 2)
    return levels[name.lower()]


def run_async(coro: Coroutine[Any, Any, T], *, until_interrupted: bool = False) -> T:
    """``until_interrupted``: a command that runs until Ctrl-C (a watch, a stream), for which the
    interrupt is how it ends: no error line, still exit 130 (a script can tell it from a normal end)."""
    import asyncio  # here: a one-shot command never loads it (its admin call blocks: ``admin_call``)

    try:
        return asyncio.run(_until_interrupted(coro) if until_interrupted else coro)
    except HengeError as exc:
        fail_with(exc)
    except KeyboardInterrupt:
        if until_interrupted:
            raise SystemExit(EXIT_INTERRUPTED) from None
        fail("interrupted", EXIT_INTERRUPTED)


async def _until_interrupted(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` until Ctrl-C, which cancels it, and again every 0.1 s until it has ended: in Python
    3.11 one cancellation can be lost (``asyncio.wait_for`` returns a result that arrives with it,
    gh-86296), and a watch whose cancellation was lost went on drawing (seen under load in tests)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[asyncio.TimerHandle] = []

    def cancel() -> None:
        task.cancel()
        interrupted.append(loop.call_later(0.1, cancel))

    loop.add_signal_handler(signal.SIGINT, cancel)
    try:
        return await coro
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for handle in interrupted:
            handle.cancel()


WhereOpt = Annotated[str | None, typer.Option("--where", help='A filter over id, labels, reported state, state '
                                              'and sync, e.g. \'reported.fw < "2.4"\' (docs/where.md).')]


RolloutArg = Annotated[str, typer.Argument(metavar="ID", help="The rollout's id (r-xxxxxxxx).")]
LayerArg = Annotated[str, typer.Argument(metavar="NAME", help="fleet, or a label layer's name.")]
SchemaLabels = Annotated[list[str] | None, typer.Option(
    "--label", help="k=v, repeatable: the schema for devices with all these labels (none: the fleet's).")]
