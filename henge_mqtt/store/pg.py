"""PostgreSQL under the store: the connection seam (``db.Connection``) over psycopg 3.

The store's SQL is written once, in the dialect both engines share; the few SQLite-only forms are
translated here, once per statement text: ``?`` placeholders, ``INSERT OR IGNORE``, the two-argument
``MAX`` (``GREATEST``), ``BEGIN IMMEDIATE``, and in migrations ``AUTOINCREMENT``, ``REAL`` and
SQLite triggers (PostgreSQL's own immutability is the role's grants). psycopg's errors become
the seam's (``db.DatabaseError``, ``db.IntegrityError``), so the store catches one family; the schema
version lives in a one-row table of its own. Why psycopg 3 and not asyncpg: the store runs on one
thread of its own (the event loop never waits on it), which is what a synchronous driver is for;
psycopg is the maintained PostgreSQL adapter with both a sync and an async API.

The database should use the ``C`` collation (``createdb --locale=C`` or ``LC_COLLATE 'C'``): device
ids are ordered bytewise, as in SQLite, for status pages and cursors.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import NotSupported
from .db import DatabaseError, IntegrityError, Rows

_TRIGGER = re.compile(r"CREATE TRIGGER.*?END;", re.S | re.I)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    out = sql.replace("%", "%%").replace("?", "%s")
    out = out.replace("BEGIN IMMEDIATE", "BEGIN").replace("MAX(epoch, %s)", "GREATEST(epoch, %s)")
    if "INSERT OR IGNORE INTO" in out:
        out = out.replace("INSERT OR IGNORE INTO", "INSERT INTO").rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return out


def translate_ddl(script: str) -> list[str]:
    script = _TRIGGER.sub("", script)
    script = script.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    script = re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)
    script = re.sub(r"--[^\n]*", "", script)
    return [s.strip() for s in script.split(";") if s.strip()]


class _Rows:
    """No rows (an empty ``executemany``), like a cursor."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows
        self.rowcount = len(rows)
        self.description = None

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)


class PgConnection:
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise DatabaseError("PostgreSQL needs psycopg: pip install 'henge-mqtt[postgres]'") from exc

        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:  # one line: libpq's message spans several
            raise DatabaseError(f"cannot connect to PostgreSQL: {' '.join(str(exc).split())}") from exc
        self.conn.execute("CREATE TABLE IF NOT EXISTS henge_schema (version INTEGER NOT NULL)")
        if self.conn.execute("SELECT count(*) FROM henge_schema").fetchone()[0] == 0:  # type: ignore[index]
            self.conn.execute("INSERT INTO henge_schema (version) VALUES (0)")

    @property
    def in_transaction(self) -> bool:
        return bool(self.conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE)

    def _call(self, sql: str, params: Any, many: bool = False) -> Any:
        try:
            cur = self.conn.cursor()
            if many:
                cur.executemany(sql, params)
            else:
                cur.execute(sql, params)
            return cur
        except self._psycopg.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except self._psycopg.Error as exc:
            raise DatabaseError(str(exc)) from exc

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> Rows:
        return self._call(translate(sql), tuple(parameters))  # type: ignore[no-any-return]

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> Rows:
        rows = [tuple(p) for p in parameters]
        if not rows:
            return _Rows([])
        return self._call(translate(sql), rows, many=True)  # type: ignore[no-any-return]

    def schema_version(self) -> int:
        return int(self._call("SELECT version FROM henge_schema", ()).fetchone()[0])

    def migrate(self, script: str, version: int) -> None:
        self._call("BEGIN", ())
        try:
            for statement in translate_ddl(script):
                self._call(statement, ())
            self._call("UPDATE henge_schema SET version = %s", (int(version),))
        except BaseException:
            self._call("ROLLBACK", ())
            raise
        self._call("COMMIT", ())

    def backup(self, target: Path) -> None:
        raise NotSupported("with PostgreSQL, back up with pg_dump (henge backup copies SQLite stores)")

    def close(self) -> None:
        self.conn.close()


class Lease:
    """The lease of a shared store, on a connection of its own: renewals never queue behind the
    store's thread (a 100,000-device import must not cost the lease). See docs/scaling.md."""

    NOW = "extract(epoch from clock_timestamp())"  # the database's clock decides expiry

    def __init__(self, url: str) -> None:
        self.db = PgConnection(url)

    def take(self, holder: str, ttl: float) -> tuple[int | None, str | None]:
        """``(token, None)`` if ``holder`` now holds the lease (taken over, with the token + 1, if it
        had expired), else ``(None, the current holder)``."""
        row = self.db.execute(
            f"UPDATE lease SET holder = ?, token = CASE WHEN holder = ? THEN token ELSE token + 1 END, "
            f"expires = {self.NOW} + ? WHERE id = 1 AND (holder IS NULL OR holder = ? OR expires < {self.NOW}) "
            "RETURNING token", (holder, holder, ttl, holder)).fetchone()
        if row is not None:
            return int(row[0]), None
        current = self.db.execute("SELECT holder FROM lease WHERE id = 1").fetchone()
        return None, (current[0] if current else None)

    def renew(self, holder: str, token: int, ttl: float) -> bool:
        row = self.db.execute(f"UPDATE lease SET expires = {self.NOW} + ? WHERE id = 1 AND holder = ? AND token = ? "
                              "RETURNING token", (ttl, holder, token)).fetchone()
        return row is not None

    def release(self, holder: str, token: int) -> None:
        self.db.execute("UPDATE lease SET expires = 0 WHERE id = 1 AND holder = ? AND token = ?", (holder, token))

    def close(self) -> None:
        self.db.close()
