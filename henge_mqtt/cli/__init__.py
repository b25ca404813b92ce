"""The ``henge`` command: ``serve`` runs the service; every other command is a client of it (over
the admin protocol) or works on a data dir offline.

A package with one room per job: ``tree`` (the root app and its groups), ``common`` (options,
``fail``, the admin call), ``render`` (tables, colours, answers), one module per thing the commands
act on (``devices``, ``configs``, ``events``, ``rollouts``, ``layers``, ``tokens``, ``claims``,
``offline``, ``agent``), ``serve`` (the service's lifecycle as a runner object) and ``runner`` (the one exit).
Importing a command module registers its commands on the tree.

A command loads only the module that defines it (``HOME``), and only it is built (``runner.command``):
typer builds a click command per function it is given, from its signature, and importing and
building all of them cost more than the whole of ``henge push`` does otherwise. ``henge --version``
loads no command at all, and a plain ``henge push`` line not even typer (``quick``). Anything the
table does not name (``henge``, ``henge --help``, a typo) gets the whole tree, so help and "no such
command" read as they always did; ``app`` (the whole tree) is what tests and docs walk.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

__all__ = ["HOME", "MODULES", "app", "load", "main"]

# Each module registers its commands when imported, in this order (the order of `henge --help`).
MODULES = ("serve", "configs", "devices", "offline", "events", "rollouts", "layers", "tokens", "claims", "agent")

# The module that registers each top-level command or group (tests/test_cli.py checks it against the tree).
HOME: dict[str, str] = {
    "serve": "serve", "push": "configs", "get": "configs", "history": "configs", "diff": "configs",
    "rollback": "configs", "status": "devices", "kick": "devices", "clear-conflict": "devices",
    "device": "devices", "migrate": "offline", "backup": "offline", "restore": "offline", "certs": "offline",
    "broker-config": "offline", "events": "events", "audit": "events", "agent": "agent", "rollout": "rollouts",
    "layer": "layers", "schema": "layers", "token": "tokens", "claim": "claims",
}


def load(name: str | None = None) -> typer.Typer:
    """The command tree with ``name``'s commands registered; every command for ``None`` or a name
    that is not in ``HOME``."""
    for module in (HOME[name],) if name in HOME else MODULES:
        importlib.import_module(f".{module}", __name__)
    from .tree import app as tree

    return tree


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole tree
        return load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """``henge``: the one command named on the line, loaded and run (``runner.run``: one error
    line, never a traceback)."""
    args = sys.argv[1:]
    if args == ["--version"]:
        from .. import __version__

        print(f"henge {__version__}")
        sys.exit(0)
    if args:  # a plain line of a command quick has a table for runs without typer (then exits)
        from .quick import run as quick

        quick(args[0], args[1:])  # returns for any other line
    # The root takes no option with a value, so the first word that is not an option is the command.
    name = next((arg for arg in args if not arg.startswith("-")), None)
    from .runner import run

    run(load(name), only=name if name in HOME else None)
