"""The store's core: the connection, migrations, transactions (``BEGIN IMMEDIATE``; under a lease, fenced),
the audit row every change writes, and the one guard for unknown devices and version conflicts.
Each aggregate's repository (a module of this package) builds on it and shares its connection.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import Fenced, StoreError, UnknownDevice, VersionConflict
from ..layering import Layer
from ..models import ConfigVersion, utc_now
from .credentials import digest_of
from .db import Connection, DatabaseError, SqliteConnection
from .schema import DB_FILE, MIGRATIONS

log = logging.getLogger("henge_mqtt.store")


def redact(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def ts(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; with ``check``, run first inside."""

    def __init__(self, db: Any, check: Callable[[], None] | None = None) -> None:
        self._db = db
        self._check = check

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        if self._check is not None:
            try:
                self._check()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


class StoreCore:
    """The connection and what every repository shares; :class:`~henge_mqtt.store.Store` composes them."""

    if TYPE_CHECKING:  # the seams between repositories: each defined once, in the module named
        # layers.py
        def _load_layers(self) -> dict[str, Layer]: ...

        # layers.py
        def effective(self, labels: dict[str, str], own: dict[str, Any], layers: dict[str, Layer] | None = None, *,
                      device: str | None = None) -> tuple[dict[str, Any], list[str]]: ...
        # devices.py
        def labels_of(self, device: str) -> dict[str, str]: ...
        # layers.py
        def _current_rows(self, devices: list[str]) -> dict[str, tuple[int, str | None, str, str]]: ...
        # layers.py
        def _current_heads(self, devices: list[str]) -> dict[str, tuple[int, str]]: ...
        # layers.py
        def layers_by_device(self, devices: list[str], labels: dict[str, dict[str, str]],
                             layers: dict[str, Layer] | None = None) -> dict[str, list[Layer]]: ...
        # devices.py
        def labels_by_device(self, devices: list[str] | None = None) -> dict[str, dict[str, str]]: ...
        # layers.py
        def layers_for(self, labels: dict[str, str], layers: dict[str, Layer] | None = None, *,
                       device: str | None = None) -> list[Layer]: ...
        # reported.py
        def _reported_doc(self, device: str) -> dict[str, Any] | None: ...
        # layers.py
        @staticmethod
        def merge_layers(applied: list[Layer], own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]: ...
        # layers.py
        def _staging(self, name: str) -> str | None: ...
        # layers.py
        def candidate_layer(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                            priority: int | None, where: str | None = None
                            ) -> tuple[Layer | None, dict[str, str], int]: ...
        # layers.py
        def _refresh(self, devices: list[str], layers: dict[str, Layer], *, actor: str,
                     message: str) -> list[ConfigVersion]: ...
        # versions.py
        def _push_many(self, devices: list[str], config: dict[str, Any], *, actor: str, message: str,
                       skip_unchanged: bool) -> list[ConfigVersion]: ...
        # layers.py
        def _set_layer(self, name: str, content: dict[str, Any] | None, *, actor: str, message: str,
                       selector: dict[str, str] | None, priority: int | None, where: str | None = None,
                       ) -> tuple[int, list[ConfigVersion], dict[str, Layer]]: ...
        # versions.py
        def _current_version(self, device: str) -> int: ...
        # versions.py
        def get_version(self, device: str, version: int | None = None) -> ConfigVersion: ...
        # versions.py
        def _insert_version(
            self,
            device: str,
            own: dict[str, Any],
            *,
            actor: str,
            message: str,
            if_version: int | None,
        ) -> ConfigVersion: ...
        # versions.py
        def _insert_rows(self, rows: list[ConfigVersion], *, own_texts: dict[str, str] | None = None) -> None: ...

    # ---- the one guard: unknown devices and version conflicts --------------------------------------

    def require_device(self, device: str, *, also: str = "") -> None:
        """Raise :class:`UnknownDevice` unless ``device`` is registered. From memory (no query): the
        service calls it on the loop too, so every layer says "unknown device" the same way."""
        if device not in self._hashes:
            raise UnknownDevice(device, also=also)

    @staticmethod
    def _found(found: object, device: str) -> None:
        """Raise :class:`UnknownDevice` when a row (or a row count) says the device is not there."""
        if found is None or found == 0:
            raise UnknownDevice(device)

    def _among(self, devices: list[str]) -> tuple[str, str | list[str]]:
        """``devices`` as a table ``j`` (its column ``value``) and the one parameter it takes: a JSON
        array read by ``json_each`` on SQLite, an array on PostgreSQL. One statement for thousands
        of devices, where ``IN (?, ?, ...)`` takes 500 at a time."""
        if self.url is None:
            return "json_each(?) AS j", json.dumps(devices)
        return "unnest(?::text[]) AS j(value)", devices

    def _new_device_sessions(self, devices: list[str]) -> None:
        """The session records of devices just inserted (epoch 0, never seen), in their transaction."""
        self._db.executemany("INSERT INTO device_sessions (device) VALUES (?)", [(d,) for d in devices])

    def _keyed(self, values: dict[str, int]) -> tuple[str, str]:
        """``{device: n}`` as a table ``j`` of ``key`` (text) and ``value`` (``CAST(j.value AS
        INTEGER)`` in both) and the one parameter it takes, a JSON object: one statement for
        thousands of rows (``json_each`` on SQLite, ``json_each_text`` on PostgreSQL)."""
        return ("json_each(?) AS j" if self.url is None else "json_each_text(?::json) AS j"), json.dumps(values)

    def _expect_version(self, device: str, expected: int | None) -> int:
        """The device's current version; :class:`VersionConflict` if the caller expected another."""
        current = self._current_version(device)
        if expected is not None and expected != current:
            raise VersionConflict(device, expected=expected, current=current)
        return current

    def __init__(self, data_dir: Path, *, synchronous: Literal["full", "normal"] = "full",
                 url: str | None = None) -> None:
        """SQLite in ``data_dir`` (the default), or the PostgreSQL database at ``url``
        (``postgresql://...``; henge_mqtt/store/pg.py)."""
        self.path = data_dir / DB_FILE
        self.url = url
        self._db: Connection
        if url is not None:
            from .pg import PgConnection

            try:
                self._db = PgConnection(url)
                self._migrate()
            except DatabaseError as exc:
                raise StoreError(f"cannot open the store at {redact(url)}: {exc}") from exc
            self._load()
            return
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():  # configs and secret hashes: readable by the service's user only
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            sqlite = SqliteConnection(self.path, synchronous=synchronous)
            self._db = sqlite
            mode = sqlite.journal_mode
            self._migrate()
            for suffix in ("", "-wal", "-shm"):  # SQLite makes its side files with the process umask
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.chmod(side, 0o600)
        except DatabaseError as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot use the data dir {data_dir}: {exc}") from exc
        if mode.lower() != "wal":
            log.warning("store.not_wal mode=%s", mode)
        self._load()

    def _load(self) -> None:
        # Called with (device, config) before any version is inserted, inside the transaction; the
        # service sets it to the schema check, so nothing a schema refuses is ever stored.
        self.validate: Callable[[str, dict[str, Any]], None] | None = None
        # The same check for many versions at once: [(device, labels, config)], all or none.
        self.validate_many: Callable[[list[tuple[str, dict[str, str], dict[str, Any]]]], None] | None = None
        self.reload()

    def reload(self) -> None:
        """The in-memory indexes the loop reads without waiting for the store's thread, read anew
        (a standby that just took the lease of a shared store: the active one changed it meanwhile)."""
        # Digests as bytes (33 bytes less per stored device than hex text).
        self._hashes: dict[str, bytes] = {
            d: digest_of(h) for d, h in self._db.execute("SELECT id, secret_hash FROM devices")
        }
        self._admin_hashes: dict[str, bytes] = {
            n: digest_of(h) for n, h in self._db.execute("SELECT name, secret_hash FROM admins")
        }
        self._layers: dict[str, Layer] = self._load_layers()
        # HTTP API tokens by id: (digest, role, name), checked on the loop for every request.
        self._tokens: dict[str, tuple[bytes, str, str]] = {
            i: (digest_of(h), role, name) for i, name, role, h in
            self._db.execute("SELECT id, name, role, secret_hash FROM api_tokens")
        }

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version()

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the store at {self.path} has schema {current}, newer than this henge "
                f"({len(MIGRATIONS)}); upgrade henge"
            )
        for target in range(current, len(MIGRATIONS)):
            self._db.migrate(MIGRATIONS[target], target + 1)
            log.info("store.migrated to=%d", target + 1)

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._fenced_check if self.fence is not None else None)

    def _in_values(self, sql: str, columns: int, rows: list[tuple[Any, ...]]) -> None:
        """``sql`` once per 500 of ``rows``, its ``{values}`` a multi-row ``VALUES`` of them. For
        PostgreSQL, where a statement a row held the store's one thread for seconds (a failover's
        10,000 epochs), and every read queued behind it."""
        row = "(" + ", ".join("?" * columns) + ")"
        for start in range(0, len(rows), 500):
            part = rows[start:start + 500]
            self._db.execute(sql.format(values=", ".join([row] * len(part))), [x for r in part for x in r])

    fence: tuple[str, int] | None = None  # (holder, token) this instance writes under

    def _fenced_check(self) -> None:
        """Inside every write transaction: this instance still holds the lease with its token, or
        nothing is written (a standby took over; this one is a zombie)."""
        assert self.fence is not None
        row = self._db.execute("SELECT 1 FROM lease WHERE id = 1 AND holder = ? AND token = ? FOR SHARE",
                               self.fence).fetchone()
        if row is None:
            raise Fenced(f"this instance lost the store's lease (token {self.fence[1]}): another one is active; "
                         "nothing was written")

    def _audit(self, actor: str, action: str, device: str | None, summary: dict[str, Any]) -> None:
        """Inside the caller's transaction: an action and its audit row land together or not at all."""
        self._db.execute(
            "INSERT INTO audit (at, actor, action, device, summary) VALUES (?, ?, ?, ?, ?)",
            (ts(utc_now()), actor, action, device, json.dumps(summary, sort_keys=True)),
        )
