"""What every command shares: the options, the one way to fail (one ``error:`` line and a
documented exit code), the admin client call, reading configs and labels from the command line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from ..errors import HengeError, InvalidConfig
from ..ids import parse_labels

if TYPE_CHECKING:  # the admin client (aiomqtt) is loaded by the commands that use it, not by `serve`
    from ..client import Endpoint


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


def fail(message: str, code: int = 1) -> NoReturn:
    """The CLI's one way to fail: one ``error:`` line per line of the message (a schema refusal has
    one per violation) on stderr, then exit ``code`` (usage 2, failures 1, rejected 3, timeout 4,
    interrupted 130). ``main`` catches what a command did not and says it through here too."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()] or [""]
    sys.stderr.write("".join(f"error: {line}\n" for line in lines))
    sys.stderr.flush()
    raise typer.Exit(code)


def endpoint(data: Path | None, broker: str | None) -> Endpoint:
    """Where the service is: --broker (or HENGE_BROKER), else --data (or HENGE_DATA), else the context
    of the client config file (HENGE_CONTEXT or its current one), else ./henge-data."""
    from ..client import Endpoint, load_context

    context = None if (broker or data) else load_context(os.environ.get("HENGE_CONTEXT"))
    if broker:
        return Endpoint.from_url(broker, load_context(os.environ.get("HENGE_CONTEXT")) if os.environ.get(
            "HENGE_CONTEXT") else None)
    if context is not None and context.get("broker"):
        return Endpoint.from_url(str(context["broker"]), context)
    if data is None and context is not None and context.get("data"):
        data = Path(str(context["data"]))
    return Endpoint.from_data_dir(data or Path("henge-data"))


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells expect of a command Ctrl-C ended


def run_async(coro: Coroutine[Any, Any, T], *, until_interrupted: bool = False) -> T:
    """``until_interrupted``: a command that runs until Ctrl-C (a watch, a stream), for which the
    interrupt is how it ends: no error line, still exit 130 (a script can tell it from a normal end)."""
    try:
        return asyncio.run(_until_interrupted(coro) if until_interrupted else coro)
    except HengeError as exc:
        fail(str(exc), EXIT_TIMEOUT if exc.code == "timeout" else 1)
    except KeyboardInterrupt:
        if until_interrupted:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        fail("interrupted", EXIT_INTERRUPTED)


async def _until_interrupted(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` until Ctrl-C, which cancels it, and again every 0.1 s until it has ended: in Python
    3.11 one cancellation can be lost (``asyncio.wait_for`` returns a result that arrives with it,
    gh-86296), and a watch whose cancellation was lost went on drawing (seen under load in tests)."""
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


def call_op(data: Path | None, broker: str | None, timeout: float, op: str, /, **args: Any) -> Any:
    """One operation of the op table (henge_mqtt/ops.py) over the admin protocol; its result."""
    return call_then_wait(data, broker, timeout, op, None, **args)[0]


def call_then_wait(
    data: Path | None, broker: str | None, timeout: float, op: str, wait: float | None, /, **args: Any
) -> tuple[Any, Any]:
    """Run ``op``; with ``wait``, then wait (that long) for the device to report the new version."""
    from ..ops import ADMIN_OPS

    if op not in ADMIN_OPS:  # a CLI command calls only what the op table declares
        raise AssertionError(f"henge_mqtt.ops has no admin operation {op!r}")

    async def go() -> tuple[Any, Any]:
        from ..client import AdminClient

        async with AdminClient(endpoint(data, broker), timeout=10.0 if wait else timeout) as client:
            result = await client.call(op, **args)
            if wait is None:
                return result, None
            outcome = await client.call("wait", wait=wait, device=result["device"], version=result["version"],
                                        timeout=wait)
            return result, outcome

    return run_async(go())


EXIT_REJECTED = 3
EXIT_TIMEOUT = 4


def report_outcome(result: dict[str, Any], outcome: dict[str, Any] | None, as_json: bool, line: str) -> None:
    if outcome is None:
        emit(result, as_json, lambda _: line)
        return
    if as_json:
        typer.echo(json.dumps(result | {"report": outcome}, indent=2, sort_keys=True))
    if outcome["status"] == "rejected":
        fail(f"{result['device']} rejected version {result['version']}: {outcome['error'] or 'no reason given'}",
             EXIT_REJECTED)
    if not as_json:
        typer.echo(f"{line}; applied by the device")


def emit(value: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else human(value))


def device_arg(value: str, what: str = "ID") -> str:
    """A device id given where one is optional: empty is a mistake (it would mean "every device")."""
    if not value.strip():
        fail(f"{what} is empty: give a device id, or leave it out for every device", 2)
    return value


def where_arg(text: str | None, *, standing: bool = False) -> str | None:
    """A ``--where`` filter, checked here so a typo is a usage error (exit 2) that names the column
    (``standing``: a layer's, which may read only id, labels and reported state)."""
    if text is None:
        return None
    from ..where import STANDING_ROOTS, WhereError, parse

    try:
        parse(text, allowed=STANDING_ROOTS if standing else None)
    except WhereError as exc:
        fail(f"--where: {exc}", 2)
    return text


WhereOpt = Annotated[str | None, typer.Option("--where", help='A filter over id, labels, reported state, state '
                                              'and sync, e.g. \'reported.fw < "2.4"\' (docs/where.md).')]


def labels_arg(pairs: list[str] | None) -> dict[str, str]:
    try:
        return parse_labels(pairs or [])
    except ValueError as exc:
        fail(str(exc))


def read_document(source: str) -> dict[str, Any]:
    return read_config(source, what="schema")


def read_config(source: str, what: str = "config") -> dict[str, Any]:
    """Read a config from a file or ``-`` (stdin); refuse anything but a JSON object."""
    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {where}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        fail(f"{where} is not UTF-8 text")
    from ..ids import StrictJSONError, strict_json

    try:
        value = strict_json(text)
    except json.JSONDecodeError as exc:
        raise InvalidConfig(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except StrictJSONError as exc:
        raise InvalidConfig(f"{where} is not strict JSON: {exc}; nothing was stored") from exc
    if not isinstance(value, dict):
        raise InvalidConfig(f"{where}: a {what} must be a JSON object, not {type(value).__name__}")
    return value


def user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """One line on stderr and a non-zero exit for every error of ours: never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except HengeError as exc:
            fail(str(exc))

    return wrapper
RolloutArg = Annotated[str, typer.Argument(metavar="ID", help="The rollout's id (r-xxxxxxxx).")]
LayerArg = Annotated[str, typer.Argument(metavar="NAME", help="fleet, or a label layer's name.")]
SchemaLabels = Annotated[list[str] | None, typer.Option(
    "--label", help="k=v, repeatable: the schema for devices with all these labels (none: the fleet's).")]
