"""What a command does once its line is parsed, without typer or asyncio: the one way to fail (one
``error:`` line and a documented exit code), the one guard that turns whatever a command raised into
that, printing answers, the admin call (blocking: ``admin_call``), reading configs and labels.

Apart from ``common`` (typer's option declarations) so that ``henge push``, whose line ``quick``
parses, runs without loading typer; ``common`` hands all of this to the other commands.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ..errors import HengeError, InvalidConfig
from ..ids import parse_labels
from .jsontext import dumps as json_text

if TYPE_CHECKING:
    from ..endpoint import Endpoint

T = TypeVar("T")

EXIT_REJECTED = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells expect of a command Ctrl-C ended


def fail(message: str, code: int = 1) -> NoReturn:
    """The CLI's one way to fail: one ``error:`` line per line of the message (a schema refusal has
    one per violation) on stderr, then exit ``code`` (usage 2, failures 1, rejected 3, timeout 4,
    interrupted 130). ``guarded`` says what a command did not catch through here too."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()] or [""]
    sys.stderr.write("".join(f"error: {line}\n" for line in lines))
    sys.stderr.flush()
    raise SystemExit(code)


def guarded(run: Callable[[], T]) -> T:
    """``run()``, with whatever escapes it said by :func:`fail`: our errors as their one line (a
    timeout exits 4), Ctrl-C as "interrupted" (130), and a bug as one line too, never a traceback at
    an operator (``HENGE_DEBUG=1`` shows it)."""
    try:
        return run()
    except SystemExit:
        raise
    except HengeError as exc:
        fail_with(exc)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # whoever read the output left (`henge status | head -1`): exit 1, quietly, as click
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing left to flush at exit)
        raise SystemExit(1) from None
    except Exception as exc:  # the last guard: a bug must still not print a traceback at an operator
        if os.environ.get("HENGE_DEBUG"):
            raise
        fail(f"unexpected failure: {exc!r} (run with HENGE_DEBUG=1 for the traceback)", 1)


def fail_with(exc: HengeError) -> NoReturn:
    """One of our errors, said: its message, exit 4 for a timeout (``--wait``), else 1."""
    fail(str(exc), EXIT_TIMEOUT if exc.code == "timeout" else 1)


def echo(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def emit(value: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    echo(json_text(value) if as_json else human(value))


def endpoint(data: Path | None, broker: str | None) -> Endpoint:
    """Where the service is: --broker (or HENGE_BROKER), else --data (or HENGE_DATA), else the context
    of the client config file (HENGE_CONTEXT or its current one), else ./henge-data."""
    from ..endpoint import Endpoint, load_context

    context = None if (broker or data) else load_context(os.environ.get("HENGE_CONTEXT"))
    if broker:
        return Endpoint.from_url(broker, load_context(os.environ.get("HENGE_CONTEXT")) if os.environ.get(
            "HENGE_CONTEXT") else None)
    if context is not None and context.get("broker"):
        return Endpoint.from_url(str(context["broker"]), context)
    if data is None and context is not None and context.get("data"):
        data = Path(str(context["data"]))
    return Endpoint.from_data_dir(data or Path("henge-data"))


def call_op(data: Path | None, broker: str | None, timeout: float, op: str, /, *,
            progress: Callable[[dict[str, Any]], None] | None = None, wait: float | None = None,
            **args: Any) -> Any:
    """One operation of the op table (henge_mqtt/ops.py) over the admin protocol; its result.
    ``wait`` and ``progress``: see :meth:`AdminCall.call`."""
    return call_then_wait(data, broker, timeout, op, None, progress=progress, op_wait=wait, **args)[0]


def call_then_wait(
    data: Path | None, broker: str | None, timeout: float, op: str, wait: float | None, /, *,
    progress: Callable[[dict[str, Any]], None] | None = None, op_wait: float | None = None, **args: Any
) -> tuple[Any, Any]:
    """Run ``op``; with ``wait``, then wait (that long) for the device to report the new version."""
    from ..admin_call import AdminCall
    from ..ops import ADMIN_OPS

    if op not in ADMIN_OPS:  # a CLI command calls only what the op table declares
        raise AssertionError(f"henge_mqtt.ops has no admin operation {op!r}")
    with AdminCall(endpoint(data, broker), timeout=10.0 if wait else timeout) as client:
        result = client.call(op, wait=op_wait, progress=progress, **args)
        if wait is None:
            return result, None
        outcome = client.call("wait", wait=wait, device=result["device"], version=result["version"],
                              timeout=wait)
        return result, outcome


def report_outcome(result: dict[str, Any], outcome: dict[str, Any] | None, as_json: bool, line: str) -> None:
    if outcome is None:
        emit(result, as_json, lambda _: line)
        return
    if as_json:
        echo(json_text(result | {"report": outcome}))
    if outcome["status"] == "rejected":
        fail(f"{result['device']} rejected version {result['version']}: {outcome['error'] or 'no reason given'}",
             EXIT_REJECTED)
    if not as_json:
        echo(f"{line}; applied by the device")


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
            fail_with(exc)

    return wrapper
