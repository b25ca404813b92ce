"""The CLI's one exit: ``run`` runs the command tree and turns every failure into one line.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import typer

from ..errors import HengeError
from .common import EXIT_INTERRUPTED, EXIT_TIMEOUT, fail


def command(app: typer.Typer, only: str | None = None) -> Any:
    """The click command tree of ``henge``, with usage lines in the plain form people read in man
    pages (``henge push [OPTIONS] [ID] [FILE|-]``, ``henge diff [OPTIONS] DEVICE A B``): typer marks a
    required argument ``{ID}`` (and lower-cases one without a metavar), which reads like a
    placeholder to fill in braces and all.

    ``only``: the tree with just that top-level command or group (the one on the command line):
    typer builds a click command from every function's signature it is given, and building the
    other commands of the module that defines ``henge push`` cost a fifth of its start."""
    if only is not None:
        app = copy.copy(app)
        named = typer.main.get_command_name  # typer's own naming: the function's, "_" as "-"
        app.registered_commands = [c for c in app.registered_commands
                                   if (c.name or named(getattr(c.callback, "__name__", ""))) == only]
        app.registered_groups = [g for g in app.registered_groups if g.name == only]
    root = typer.main.get_command(app)

    def plain(cmd: Any) -> None:  # a click command (typer's own copy of click, from typer 0.26 on)
        typed = cmd.collect_usage_pieces

        def pieces(ctx: Any) -> list[str]:
            return [(p[1:-1] if p.startswith("{") and p.endswith("}") else p).upper() for p in typed(ctx)]

        cmd.collect_usage_pieces = pieces
        for sub in getattr(cmd, "commands", {}).values():
            plain(sub)

    plain(root)
    return root


def run(app: typer.Typer, only: str | None = None) -> None:
    """The CLI's one exit: every failure is one ``error:`` line and a documented exit code, never a
    traceback (usage errors 2, failures 1; ``HENGE_DEBUG=1`` shows the traceback of an unexpected one).
    ``only``: see :func:`command`."""
    try:
        code = _run_tree(app, only)
    except typer.Exit as exc:  # every failure, said by `fail`
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _run_tree(app: typer.Typer, only: str | None) -> Any:
    """The command tree, with whatever escapes a command said by the CLI's one ``fail``."""
    from typer.exceptions import TyperException

    try:
        return command(app, only)(standalone_mode=False)
    except (typer.Exit, SystemExit):
        raise
    except typer.Abort:
        fail("interrupted", EXIT_INTERRUPTED)
    except TyperException as exc:  # a usage error: one line, not a box
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        fail(message, int(getattr(exc, "exit_code", 2)))
    except HengeError as exc:
        fail(str(exc), EXIT_TIMEOUT if exc.code == "timeout" else 1)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # the last guard: a bug must still not print a traceback at an operator
        if os.environ.get("HENGE_DEBUG"):
            raise
        fail(f"unexpected failure: {exc!r} (run with HENGE_DEBUG=1 for the traceback)", 1)
