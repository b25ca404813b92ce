"""The ``henge`` command: ``serve`` runs the service; every other command is a client of it (over
the admin protocol) or works on a data dir offline.

A package with one room per job: ``app`` (the command tree), ``common`` (options, ``fail``, the
admin call), ``render`` (tables, colours, answers), one module per thing the commands act on
(``devices``, ``configs``, ``events``, ``rollouts``, ``layers``, ``tokens``, ``offline``, ``agent``),
``serve`` (the service's lifecycle as a runner object) and ``main`` (the one exit). Importing a
command module registers its commands on the tree.
"""

from __future__ import annotations

import importlib

from .app import app
from .main import command, main

__all__ = ["app", "command", "main"]

# Each module registers its commands when imported, in this order (the order of `henge --help`).
for _module in ("serve", "configs", "devices", "offline", "events", "rollouts", "layers", "tokens", "agent"):
    importlib.import_module(f".{_module}", __name__)
