"""The CLI's one exit: ``run`` runs the command tree and turns every failure into one line.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import typer

from .plain import EXIT_INTERRUPTED, fail, guarded


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
    code = _run_tree(app, only)  # a failure, said by `fail`, exits from inside
    sys.exit(code if isinstance(code, int) else 0)


def _run_tree(app: typer.Typer, only: str | None) -> Any:
    """The command tree, with whatever escapes a command said by the CLI's one ``fail`` (``guarded``;
    typer's own usage errors and aborts here)."""
    from typer.exceptions import TyperException

    def invoke() -> Any:
        try:
            return command(app, only)(standalone_mode=False)
        except typer.Exit as exc:  # click returns it as the code, but one raised outside a command
            raise SystemExit(exc.exit_code) from None
        except typer.Abort:
            fail("interrupted", EXIT_INTERRUPTED)
        except TyperException as exc:  # a usage error: one line, not a box
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            fail(message, int(getattr(exc, "exit_code", 2)))

    return guarded(invoke)
