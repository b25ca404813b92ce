"""The connection seam: what the repositories ask of a database connection.

Both :class:`sqlite3.Connection` and :class:`~henge_mqtt.store.pg.PgConnection` implement it
(structurally, as a :class:`~typing.Protocol`); the repositories write SQLite's SQL dialect and
``?`` placeholders, which ``pg.py`` translates. Nothing else of either driver is used.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any, Protocol


class Rows(Protocol):
    """A statement's result: rows to read, and how many rows a write changed."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...  # the columns of a SELECT (``migrate`` copies tables by them)

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Any = (), /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Rows: ...

    def executescript(self, sql_script: str, /) -> object: ...

    def backup(self, target: sqlite3.Connection, /) -> None: ...

    def close(self) -> None: ...
