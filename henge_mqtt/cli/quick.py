"""``henge push``, ``get``, ``history``, ``status`` and ``device add`` from a plain command line,
without typer.

A script that pushes to its devices one by one runs ``henge push ID FILE`` thousands of times (one
that reads them, ``henge get ID``; one that registers them, ``henge device add ID``), and typer
(building click commands from signatures) was most of each start. So a plain line of these commands
(options it knows, each with a value of the right type, the arguments the command requires, nothing
after ``--``) is parsed here, by the tables below, and handed to the same function the typer command
calls (``push.push``, ``read.get``, ...). Anything else, ``--help``, a typo, a value out of range,
an option written the way only click understands (``-mtext``), goes to typer as before, so help and
usage errors read as they always did.

Each table is typer's, written down: ``tests/test_cli.py`` checks it against the typer command
(every option, its kind, its environment variable, the arguments and how many are required) and
that both paths call the function with the same arguments for the same lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DEVICE_ADD", "GET", "HISTORY", "PUSH", "QUICK", "STATUS", "Spec", "parse", "run"]


class Spec(NamedTuple):
    arguments: tuple[str, ...]  # the positional parameters, in order
    # "--flag" -> (parameter, kind): flag, text, many, path, int>=N, float>=X, choice:A,B,...
    options: dict[str, tuple[str, str]]
    env: dict[str, str]  # parameter -> environment variable read when the option is not given
    required: int = 0  # how many of the arguments a line must give


PUSH = Spec(
    arguments=("target", "source"),
    options={
        "--all": ("all_devices", "flag"), "--label": ("label", "many"), "--where": ("where", "text"),
        "--if-version": ("if_version", "int>=0"), "-m": ("message", "text"), "--message": ("message", "text"),
        "--force": ("force", "flag"), "--patch": ("patch", "flag"), "--reconcile": ("reconcile", "flag"),
        "--wait": ("wait", "flag"), "--dry-run": ("dry_run", "flag"), "--data": ("data", "path"),
        "--broker": ("broker", "text"), "--json": ("as_json", "flag"), "--timeout": ("timeout", "float>=0.1"),
    },
    env={"data": "HENGE_DATA", "broker": "HENGE_BROKER"},
)

GET = Spec(
    arguments=("device",),
    options={
        "--version": ("version", "int>=1"), "--explain": ("explain", "flag"), "--reported": ("reported", "flag"),
        "--history": ("reported_history", "flag"), "--data": ("data", "path"), "--broker": ("broker", "text"),
        "--json": ("as_json", "flag"), "--timeout": ("timeout", "float>=0.1"),
    },
    env={"data": "HENGE_DATA", "broker": "HENGE_BROKER"},
    required=1,
)

HISTORY = Spec(
    arguments=("device",),
    options={"--data": ("data", "path"), "--broker": ("broker", "text"), "--json": ("as_json", "flag"),
             "--timeout": ("timeout", "float>=0.1")},
    env={"data": "HENGE_DATA", "broker": "HENGE_BROKER"},
    required=1,
)

OUTPUT = "choice:table,wide,json,yaml"  # render.Output's values (quick loads no renderer)

STATUS = Spec(
    arguments=("device",),
    options={
        "--label": ("label", "many"), "--state": ("state", "text"), "--sync": ("sync", "text"),
        "--conflict": ("conflict", "flag"), "--where": ("where", "text"), "--summary": ("summary", "flag"),
        "-o": ("output", OUTPUT), "--output": ("output", OUTPUT),
        "--watch": ("watch", "float>=0.5"), "--data": ("data", "path"), "--broker": ("broker", "text"),
        "--json": ("as_json", "flag"), "--timeout": ("timeout", "float>=0.1"),
    },
    env={"data": "HENGE_DATA", "broker": "HENGE_BROKER"},
)

DEVICE_ADD = Spec(
    arguments=("device",),
    options={"--label": ("label", "many"), "--data": ("data", "path"), "--broker": ("broker", "text"),
             "--json": ("as_json", "flag"), "--timeout": ("timeout", "float>=0.1")},
    env={"data": "HENGE_DATA", "broker": "HENGE_BROKER"},
    required=1,
)

# command ("group command" for a group's) -> (its table, the module of its typer-free function, the function)
QUICK = {"push": (PUSH, "push", "push"), "get": (GET, "read", "get"), "history": (HISTORY, "read", "history"),
         "status": (STATUS, "read", "status"), "device add": (DEVICE_ADD, "provision", "device_add")}

_MISSING = object()
_INF = float("inf")


def _value(kind: str, raw: str) -> Any:
    """``raw`` as the option's type, or ``_MISSING`` where typer should have the say."""
    if kind in ("text", "many"):
        return raw
    if kind.startswith("choice:"):  # one of these, exactly (typer's enum choices are case-sensitive)
        return raw if raw in kind[7:].split(",") else _MISSING
    if kind == "path":
        return Path(raw) if raw else _MISSING
    number, _, least = kind.partition(">=")
    try:
        value: float = int(raw) if number == "int" else float(raw)
    except ValueError:
        return _MISSING
    if not -_INF < value < _INF or value < (int(least) if number == "int" else float(least)):  # no nan
        return _MISSING
    return value


def parse(spec: Spec, argv: list[str]) -> dict[str, Any] | None:
    """The parameters ``argv`` gives (the function's defaults fill the rest); None for a line typer
    should read."""
    given: dict[str, Any] = {}
    positional: list[str] = []
    kinds = {name: kind for name, kind in spec.options.values()}
    tokens = iter(argv)
    for token in tokens:
        if token == "-" or not token.startswith("-"):
            positional.append(token)
            continue
        flag, eq, attached = token.partition("=") if token.startswith("--") else (token, "", "")
        if flag not in spec.options:
            return None
        name, kind = spec.options[flag]
        if kind == "flag":
            if eq:
                return None
            given[name] = True
            continue
        raw = attached if eq else next(tokens, None)
        if raw is None or (not eq and raw.startswith("-") and raw != "-"):
            return None  # click would take "-x" as the value; such a line is left to it
        value = _value(kind, raw)
        if value is _MISSING:
            return None
        if kind == "many":
            given.setdefault(name, []).append(value)
        else:
            given[name] = value
    if not spec.required <= len(positional) <= len(spec.arguments):
        return None
    given.update(zip(spec.arguments, positional, strict=False))
    for name, variable in spec.env.items():
        raw = os.environ.get(variable)
        if name not in given and raw:
            value = _value(kinds[name], raw)
            if value is _MISSING:
                return None
            given[name] = value
    return given


def run(command: str, argv: list[str]) -> None:
    """``henge COMMAND ARGV`` without typer when ``command`` has a table here and the line is plain
    (then exits); returns otherwise."""
    if command not in QUICK and argv and f"{command} {argv[0]}" in QUICK:  # a group's command
        command, argv = f"{command} {argv[0]}", argv[1:]
    if command not in QUICK:
        return
    spec, module, function = QUICK[command]
    given = parse(spec, argv)
    if given is None:
        return
    import importlib

    from .plain import guarded

    work = getattr(importlib.import_module(f".{module}", __package__), function)
    positional = [given.pop(name, None) for name in spec.arguments]
    guarded(lambda: work(*positional, **given))
    raise SystemExit(0)
