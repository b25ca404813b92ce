"""The connection seam: what the repositories ask of a database, and its two implementations' errors.

:class:`Connection` is a :class:`~typing.Protocol` with two implementations: :class:`SqliteConnection`
here (a file in the data dir) and :class:`~henge_mqtt.store.pg.PgConnection` (PostgreSQL over
psycopg). The repositories write one SQL dialect, SQLite's, with ``?`` placeholders; ``pg.py``
translates the few forms PostgreSQL spells differently. What differs beyond SQL is a method of the
seam, not an emulated ``PRAGMA``: the schema version, running a migration, an online backup.
Both raise this module's :class:`DatabaseError` family, so the store catches one set of errors
whichever database is under it (neither driver's exceptions leak above this layer).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol


class DatabaseError(Exception):
    """The database failed: it cannot be opened, a statement failed, the connection was lost."""


class IntegrityError(DatabaseError):
    """A constraint refused a row (a second device with one id, a second token with one name)."""


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

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> Rows: ...

    def schema_version(self) -> int:
        """The number of migrations applied (0 for a new database)."""
        ...

    def migrate(self, script: str, version: int) -> None:
        """Run one migration's DDL and record ``version``, in one transaction (all or nothing)."""
        ...

    def backup(self, target: Path) -> None:
        """A consistent copy of the whole database in the (new, empty) SQLite file ``target``."""
        ...

    def close(self) -> None: ...


class SqliteConnection:
    """SQLite in autocommit mode (the store says ``BEGIN IMMEDIATE`` itself), WAL, foreign keys on;
    usable from the store's one thread (``check_same_thread`` off: that thread is not the opener)."""

    __slots__ = ("_db", "journal_mode")

    def __init__(self, path: Path, *, synchronous: Literal["full", "normal"] = "full") -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA foreign_keys=ON")
            self.journal_mode: str = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> Rows:
        try:
            return self._db.execute(sql, parameters)  # type: ignore[arg-type]  # a tuple or a list
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    def executemany(self, sql: str, parameters: Any, /) -> Rows:
        try:
            return self._db.executemany(sql, parameters)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    def schema_version(self) -> int:
        return int(self.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, script: str, version: int) -> None:
        try:
            self._db.executescript(f"BEGIN IMMEDIATE;{script};PRAGMA user_version={int(version)};COMMIT;")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise DatabaseError(str(exc)) from exc

    def backup(self, target: Path) -> None:
        try:
            copy = sqlite3.connect(target)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    def close(self) -> None:
        self._db.close()
