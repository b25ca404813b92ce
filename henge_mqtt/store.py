"""The durable store: SQLite in the data dir, the single source of truth for devices and configs.

:class:`Store` is synchronous (WAL, ``BEGIN IMMEDIATE``, one transaction per operation).
:class:`StoreWorker` gives it one thread of its own, datasette's habit: every call runs there in
order, so admin operations stay atomic with respect to each other while the event loop, which
serves every device, only awaits them. The credential hashes are also kept in memory so that
authenticating a CONNECT never waits for the thread.

Durability: ``synchronous=FULL`` by default (every commit survives a power cut);
``store_synchronous: normal`` trades the last commits before a power cut for cheaper commits
(docs/security.md; the measured cost is in bench/README.md).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from .errors import (
    DuplicateDevice,
    DuplicateToken,
    Fenced,
    RolloutConflict,
    StoreError,
    UnknownDevice,
    UnknownLayer,
    UnknownRollout,
    UnknownToken,
    UnknownVersion,
    ValidationFailed,
    VersionConflict,
)
from .models import ConfigVersion, Device, VersionReport, config_sha256, utc_now

log = logging.getLogger(__name__)

DB_FILE = "henge.db"

# Each entry moves the schema from version i to i+1; never edit a shipped entry, append one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        epoch INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE config_versions (
        device TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        config TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (device, version)
    );
    CREATE TABLE admins (
        name TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TRIGGER config_versions_immutable BEFORE UPDATE ON config_versions
    BEGIN SELECT RAISE(ABORT, 'config versions are immutable'); END;
    """,
    """
    CREATE TABLE device_reports (
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        applied_version INTEGER,
        applied_at TEXT,
        rejected_version INTEGER,
        rejected_error TEXT,
        rejected_at TEXT
    );
    """,
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device TEXT,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_device ON audit (device, id);
    CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
    """
    ALTER TABLE devices ADD COLUMN broker_hash TEXT;
    ALTER TABLE admins ADD COLUMN broker_hash TEXT;
    """,
    """
    ALTER TABLE devices ADD COLUMN last_seen REAL;
    ALTER TABLE devices ADD COLUMN last_remote TEXT;
    ALTER TABLE devices ADD COLUMN last_reason TEXT;
    """,
    """
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE schemas (
        selector TEXT NOT NULL,          -- canonical k=v,k2=v2 (sorted); '' for the whole fleet
        version INTEGER NOT NULL,
        document TEXT,                   -- NULL: removed at this version
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (selector, version)
    );
""",
    """
    ALTER TABLE config_versions ADD COLUMN own TEXT;          -- the device layer, when it differs from config
    ALTER TABLE config_versions ADD COLUMN layers TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE layers (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        selector TEXT NOT NULL DEFAULT '{}',
        priority INTEGER NOT NULL DEFAULT 0,
        content TEXT,                    -- NULL: removed at this version
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    """,
    """
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        target TEXT NOT NULL,            -- {"all": true} or {"labels": {...}}
        config TEXT NOT NULL,            -- the device layer every target gets
        policy TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,             -- running | paused | reverting | halted | completed | aborted
        wave INTEGER NOT NULL DEFAULT 0, -- the current wave (0-based)
        waves INTEGER NOT NULL,
        wave_published INTEGER NOT NULL DEFAULT 0,
        wave_started REAL,               -- time.time() when the current wave went out
        next_wave_at REAL,               -- after a pause
        reason TEXT,                     -- why it halted or was aborted
        revert INTEGER NOT NULL DEFAULT 0,
        finished_at TEXT,
        layer TEXT                       -- a staged layer change: {name, content, labels, priority}
    );
    CREATE TABLE rollout_devices (
        rollout TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
        device TEXT NOT NULL,
        wave INTEGER NOT NULL,
        prev_version INTEGER NOT NULL DEFAULT 0,  -- the version before the rollout changed it
        new_version INTEGER,                       -- the version the rollout stored (NULL: not yet)
        online_at_start INTEGER NOT NULL DEFAULT 0,
        reverted_version INTEGER,                  -- the version that brought the old config back
        revert_note TEXT,
        PRIMARY KEY (rollout, device)
    );
    CREATE INDEX rollout_devices_device ON rollout_devices (device);
    """,
    """
    CREATE TABLE lease (
        id INTEGER PRIMARY KEY,          -- one row: who may write (PostgreSQL, several instances)
        holder TEXT,
        token INTEGER NOT NULL DEFAULT 0,  -- the fencing token: +1 at every takeover
        expires REAL NOT NULL DEFAULT 0
    );
    INSERT INTO lease (id, token, expires) VALUES (1, 0, 0);
    """,
    """
    CREATE TABLE version_reports (       -- every version's own report: "why was v5 rejected?" stays answerable
        device TEXT NOT NULL,
        version INTEGER NOT NULL,
        status TEXT NOT NULL,            -- applied | rejected
        error TEXT,
        at TEXT NOT NULL,
        epoch INTEGER,                   -- the connection the report came in on
        PRIMARY KEY (device, version),
        FOREIGN KEY (device, version) REFERENCES config_versions (device, version) ON DELETE CASCADE
    );
    INSERT INTO version_reports (device, version, status, error, at)
        SELECT r.device, r.rejected_version, 'rejected', r.rejected_error, r.rejected_at FROM device_reports r
        JOIN config_versions v ON v.device = r.device AND v.version = r.rejected_version;
    INSERT INTO version_reports (device, version, status, error, at)
        SELECT r.device, r.applied_version, 'applied', NULL, r.applied_at FROM device_reports r
        JOIN config_versions v ON v.device = r.device AND v.version = r.applied_version
        WHERE r.rejected_version IS NULL OR r.rejected_version <> r.applied_version;
    ALTER TABLE rollout_devices ADD COLUMN outcome TEXT;        -- frozen when the wave is decided
    ALTER TABLE rollout_devices ADD COLUMN outcome_error TEXT;
    """,
    """
    CREATE TABLE mqtt_sessions (         -- persistent MQTT sessions (CleanSession 0, Session Expiry > 0)
        device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        expiry INTEGER NOT NULL,         -- seconds it outlives its last connection
        subs TEXT NOT NULL,              -- [[filter, options], ...]
        ended_at REAL                    -- when its last connection ended (NULL: one is attached)
    );
    """,
]

VERSION_COLUMNS = "device, version, config, sha256, message, created_at, actor, own, layers"
FLEET_LAYER = "fleet"

ROLES = ("viewer", "operator", "admin")  # each can do what the ones before it can


def _redact(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass(frozen=True, slots=True)
class Layer:
    """A config layer in force: the fleet's (``name == "fleet"``) or a label layer."""

    name: str
    version: int
    selector: dict[str, str]
    priority: int
    content: dict[str, Any]
    message: str = ""
    staged_by: str = ""  # a rollout staging this version: it is not in force yet

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" + (f" (rollout {self.staged_by})" if self.staged_by else "")

    def applies(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())


def explain(chain: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Which layer of ``chain`` (merged in order, RFC 7396) set each value of the result:
    ``{pointer: layer}`` (an object belongs to the layer that created it)."""
    owner: dict[str, str] = {}

    def drop(where: str) -> None:
        for known in [k for k in owner if k == where or k.startswith(where + "/")]:
            del owner[known]

    def apply(target: dict[str, Any], patch: dict[str, Any], base: str, layer: str) -> None:
        for key, value in patch.items():
            where = f"{base}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if value is None:
                target.pop(key, None)
                drop(where)
            elif isinstance(value, dict):
                if not isinstance(target.get(key), dict):
                    drop(where)
                    target[key] = {}
                    owner[where] = layer
                apply(target[key], value, where, layer)
            else:
                drop(where)
                target[key] = value
                owner[where] = layer

    result: dict[str, Any] = {}
    for layer, content in chain:
        apply(result, content, "", layer)
    return owner


def hash_secret(secret: str) -> str:
    """Secrets are >= 128-bit random tokens, so a fast hash is enough and keeps connect storms cheap."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mosquitto_hash(secret: str, iterations: int = 101) -> str:
    """Mosquitto's ``$7$`` password hash (PBKDF2-HMAC-SHA512), for an external broker's password file.

    Kept beside our own hash because we never keep the secret itself, and an external broker
    (issue: beyond one gateway) must be able to check the same secret.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _digest(text: str) -> bytes:
    """A stored hex digest as bytes; anything else (a corrupt row) matches no secret."""
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    return digest if len(digest) == 32 else b"\xff" * 33


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


P = ParamSpec("P")
T = TypeVar("T")


class Store:
    def __init__(self, data_dir: Path, *, synchronous: Literal["full", "normal"] = "full",
                 url: str | None = None) -> None:
        """SQLite in ``data_dir`` (the default), or the PostgreSQL database at ``url``
        (``postgresql://...``; henge_mqtt/pg.py)."""
        self.path = data_dir / DB_FILE
        self.url = url
        self._db: Any
        if url is not None:
            from .pg import PgConnection

            try:
                self._db = PgConnection(url)
                self._migrate()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot open the store at {_redact(url)}: {exc}") from exc
            self._load()
            return
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():  # configs and secret hashes: readable by the service's user only
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA foreign_keys=ON")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
            for suffix in ("", "-wal", "-shm"):  # SQLite makes its side files with the process umask
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.chmod(side, 0o600)
        except sqlite3.DatabaseError as exc:
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
            d: _digest(h) for d, h in self._db.execute("SELECT id, secret_hash FROM devices")
        }
        self._admin_hashes: dict[str, bytes] = {
            n: _digest(h) for n, h in self._db.execute("SELECT name, secret_hash FROM admins")
        }
        self._layers: dict[str, Layer] = self._load_layers()
        # HTTP API tokens by id: (digest, role, name), checked on the loop for every request.
        self._tokens: dict[str, tuple[bytes, str, str]] = {
            i: (_digest(h), role, name) for i, name, role, h in
            self._db.execute("SELECT id, name, role, secret_hash FROM api_tokens")
        }

    def close(self) -> None:
        self._db.close()

    # ---- schema ------------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the store at {self.path} has schema {current}, newer than this henge "
                f"({len(MIGRATIONS)}); upgrade henge"
            )
        for target in range(current, len(MIGRATIONS)):
            script = f"BEGIN IMMEDIATE;{MIGRATIONS[target]};PRAGMA user_version={target + 1};COMMIT;"
            try:
                self._db.executescript(script)
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            log.info("store.migrated to=%d", target + 1)

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._fenced_check if self.fence is not None else None)

    # ---- the lease (several instances on one PostgreSQL store) ---------------------------------

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

    # ---- devices -----------------------------------------------------------------------------

    def add_device(self, device: str, labels: dict[str, str] | None = None, *, actor: str = "library",
                   layered: list[ConfigVersion] | None = None) -> str:
        """A new device and its secret; ``layered`` receives the version its layers give it (stored in
        the same transaction: a layer config a schema refuses refuses the device too)."""
        secret = new_secret()
        digest = hash_secret(secret)
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO devices (id, secret_hash, labels, created_at, broker_hash) VALUES (?, ?, ?, ?, ?)",
                    (device, digest, json.dumps(labels or {}, sort_keys=True), _ts(utc_now()), mosquitto_hash(secret)),
                )
                self._audit(actor, "device.add", device, {"labels": labels or {}})
                if self._layers:
                    rows = self._refresh([device], self._layers, actor=actor, message="a new device gets its layers")
                    if layered is not None:
                        layered.extend(rows)
        except sqlite3.IntegrityError as exc:
            raise DuplicateDevice(f"device {device!r} already exists") from exc
        self._hashes[device] = bytes.fromhex(digest)
        return secret

    def add_devices(self, devices: list[tuple[str, dict[str, str]]], *, actor: str = "library",
                    update: bool = False, layered: list[ConfigVersion] | None = None) -> dict[str, str]:
        """Create many devices in one transaction: all or nothing. Returns the new devices' secrets.

        With ``update``, devices that exist get the labels given (their secrets are kept); without
        it, one existing id refuses the whole import.
        """
        seen: set[str] = set()
        for device, _ in devices:
            if device in seen:
                raise DuplicateDevice(f"device {device!r} appears twice; nothing was imported")
            if device in self._hashes and not update:
                raise DuplicateDevice(f"device {device!r} already exists; nothing was imported "
                                      "(--update changes the labels of existing devices)")
            seen.add(device)
        new = [(d, labels) for d, labels in devices if d not in self._hashes]
        existing = [(d, labels) for d, labels in devices if d in self._hashes]
        secrets_by_id = {device: new_secret() for device, _ in new}
        digests = {device: hash_secret(secret) for device, secret in secrets_by_id.items()}
        now = _ts(utc_now())
        with self._tx():
            self._db.executemany(
                "INSERT INTO devices (id, secret_hash, labels, created_at, broker_hash) VALUES (?, ?, ?, ?, ?)",
                [(d, digests[d], json.dumps(labels, sort_keys=True), now, mosquitto_hash(secrets_by_id[d]))
                 for d, labels in new],
            )
            self._db.executemany("UPDATE devices SET labels = ? WHERE id = ?",
                                 [(json.dumps(labels, sort_keys=True), d) for d, labels in existing])
            self._audit(actor, "device.import", None, {"devices": len(new), "updated": len(existing)})
            if self._layers:
                rows = self._refresh([d for d, _ in devices], self._layers, actor=actor, message="devices imported")
                if layered is not None:
                    layered.extend(rows)
        self._hashes.update({d: bytes.fromhex(h) for d, h in digests.items()})
        return secrets_by_id

    def set_labels(self, device: str, set_: dict[str, str], remove: list[str], *, actor: str,
                   layered: list[ConfigVersion] | None = None) -> dict[str, str]:
        """Set and remove labels of one device; returns its labels afterwards. Its layers are
        re-evaluated in the same transaction (``layered`` receives the new version, if any)."""
        with self._tx():
            row = self._db.execute("SELECT labels FROM devices WHERE id = ?", (device,)).fetchone()
            if row is None:
                raise UnknownDevice(f"unknown device {device!r}")
            labels = {k: v for k, v in json.loads(row[0]).items() if k not in remove}
            labels.update(set_)
            self._db.execute("UPDATE devices SET labels = ? WHERE id = ?", (json.dumps(labels, sort_keys=True),
                                                                            device))
            self._audit(actor, "device.label", device, {"set": set_, "removed": remove})
            if self._layers:
                rows = self._refresh([device], self._layers, actor=actor, message="labels changed")
                if layered is not None:
                    layered.extend(rows)
        return labels

    def remove_device(self, device: str, *, actor: str = "library") -> None:
        with self._tx():
            cur = self._db.execute("DELETE FROM devices WHERE id = ?", (device,))
            if cur.rowcount == 0:
                raise UnknownDevice(f"unknown device {device!r}")
            self._audit(actor, "device.remove", device, {})
        self._hashes.pop(device, None)

    def rotate_secret(self, device: str, *, actor: str = "library") -> str:
        secret = new_secret()
        digest = hash_secret(secret)
        with self._tx():
            cur = self._db.execute(
                "UPDATE devices SET secret_hash = ?, broker_hash = ? WHERE id = ?",
                (digest, mosquitto_hash(secret), device),
            )
            if cur.rowcount == 0:
                raise UnknownDevice(f"unknown device {device!r}")
            self._audit(actor, "device.rotate_secret", device, {})
        self._hashes[device] = bytes.fromhex(digest)
        return secret

    def verify_device(self, device: str, secret: str) -> bool:
        expected = self._hashes.get(device)
        if expected is None:
            # Compare anyway so an unknown id costs the same as a wrong secret.
            hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), bytes(32))
            return False
        return hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), expected)

    def has_device(self, device: str) -> bool:
        return device in self._hashes

    def get_device(self, device: str) -> Device:
        row = self._db.execute(
            "SELECT d.id, d.labels, d.created_at, COALESCE(MAX(v.version), 0) FROM devices d "
            "LEFT JOIN config_versions v ON v.device = d.id WHERE d.id = ? GROUP BY d.id",
            (device,),
        ).fetchone()
        if row is None:
            raise UnknownDevice(f"unknown device {device!r}")
        return self._device(row)

    def list_devices(self, labels: dict[str, str] | None = None) -> list[Device]:
        rows = self._db.execute(
            "SELECT d.id, d.labels, d.created_at, COALESCE(MAX(v.version), 0) FROM devices d "
            "LEFT JOIN config_versions v ON v.device = d.id GROUP BY d.id ORDER BY d.id"
        )
        devices = [self._device(row) for row in rows]
        if labels:
            devices = [d for d in devices if all(d.labels.get(k) == v for k, v in labels.items())]
        return devices

    def status_source(self, *, device: str | None = None, after: str = "", labels: dict[str, str] | None = None,
                      batch: int = -1) -> tuple[list[tuple[Any, ...]], str | None]:
        """What a status row needs from the store, by device id: ``(id, labels, desired version,
        applied version, applied at, rejected version, rejected error)``, ``batch`` devices after
        ``after`` (-1: all), filtered by labels; and the last id scanned, or None when no device is
        left. Tuples, not models: 10,000 rows in a few milliseconds (an index lookup per version)."""
        where, args = ("d.id = ?", [device]) if device is not None else ("d.id > ?", [after])
        limit = "" if batch == -1 else f" LIMIT {int(batch)}"
        rows = self._db.execute(
            "SELECT d.id, d.labels, COALESCE((SELECT MAX(v.version) FROM config_versions v WHERE v.device = d.id), 0), "
            "r.applied_version, r.applied_at, r.rejected_version, r.rejected_error "
            f"FROM devices d LEFT JOIN device_reports r ON r.device = d.id WHERE {where} ORDER BY d.id{limit}",
            args,
        ).fetchall()
        last = rows[-1][0] if rows and batch != -1 and len(rows) == batch else None
        out = []
        for row in rows:
            have = json.loads(row[1])
            if labels and any(have.get(k) != v for k, v in labels.items()):
                continue
            out.append((row[0], have, *row[2:]))
        return out, last

    def device_ids(self, labels: dict[str, str] | None = None) -> list[str]:
        """Ids only (a fleet push's selection): no version join and no model per device."""
        if not labels:
            return [row[0] for row in self._db.execute("SELECT id FROM devices ORDER BY id")]
        ids = []
        for device, text in self._db.execute("SELECT id, labels FROM devices ORDER BY id"):
            have = json.loads(text)
            if all(have.get(k) == v for k, v in labels.items()):
                ids.append(device)
        return ids

    @staticmethod
    def _device(row: tuple[Any, ...]) -> Device:
        return Device(
            id=row[0], labels=json.loads(row[1]), created_at=_parse_ts(row[2]), desired_version=row[3]
        )

    # ---- configs -----------------------------------------------------------------------------

    def push(
        self,
        device: str,
        config: dict[str, Any],
        *,
        actor: str,
        message: str = "",
        if_version: int | None = None,
    ) -> ConfigVersion:
        with self._tx():
            row = self._insert_version(device, config, actor=actor, message=message, if_version=if_version)
            self._audit(actor, "push", device, {"version": row.version, "sha256": row.sha256, "message": message})
            return row

    def push_if_changed(
        self,
        device: str,
        config: dict[str, Any] | None,
        *,
        actor: str,
        message: str = "",
        if_version: int | None = None,
        patch: dict[str, Any] | None = None,
    ) -> tuple[ConfigVersion, bool]:
        """A new version unless its content equals the current one: ``(row, stored)``.

        With ``patch`` (RFC 7396 JSON Merge Patch) the new content is the current one patched, read
        and written in one transaction, so a concurrent push cannot be lost in between.
        """
        with self._tx():
            if device not in self._hashes:
                raise UnknownDevice(f"unknown device {device!r}")
            current = self._current_version(device)
            if if_version is not None and if_version != current:
                raise VersionConflict(device, expected=if_version, current=current)
            now = self.get_version(device, current) if current else None
            if patch is not None:  # a patch of the device's own layer
                config = merge_patch(now.device_layer if now else {}, patch)
                if not isinstance(config, dict):
                    raise ValidationFailed("the patch must leave a JSON object; nothing was stored")
            assert config is not None
            effective, _ = self.effective(self.labels_of(device), config)
            if now is not None and now.sha256 == config_sha256(effective):
                return now, False
            row = self._insert_version(device, config, actor=actor, message=message, if_version=None)
            self._audit(actor, "push", device, {"version": row.version, "sha256": row.sha256, "message": message})
            return row, True

    def push_many(
        self, devices: list[str], config: dict[str, Any], *, actor: str, message: str = "",
        skip_unchanged: bool = False,
    ) -> list[ConfigVersion]:
        """``config`` as the device layer of each device, one new version each, stored in one
        transaction (the service calls it per chunk); with ``skip_unchanged``, none for a device
        whose current config is what it would get."""
        with self._tx():
            rows = self._push_many(devices, config, actor=actor, message=message, skip_unchanged=skip_unchanged)
            self._audit(actor, "push_many", None, {"devices": len(rows), "sha256": config_sha256(config),
                                                   "message": message})
        return rows

    def _push_many(self, devices: list[str], config: dict[str, Any], *, actor: str, message: str,
                   skip_unchanged: bool) -> list[ConfigVersion]:
        """Inside the caller's transaction."""
        for device in devices:
            if device not in self._hashes:
                raise UnknownDevice(f"unknown device {device!r}")
        created = utc_now()
        plain = config_sha256(config)
        merged: dict[tuple[str, ...], tuple[dict[str, Any], list[str], str]] = {}  # one merge per layer set
        current = self._current_rows(devices)
        labels = self.labels_by_device(devices)
        rows = []
        for device in devices:
            applied = self.layers_for(labels.get(device, {}))
            key = tuple(layer.ref for layer in applied)
            if key not in merged:
                effective, used = self.merge_layers(applied, config)
                merged[key] = (effective, used, config_sha256(effective) if used else plain)
            effective, used, digest = merged[key]
            version, _, _, sha = current.get(device, (0, None, None, None))
            if skip_unchanged and sha == digest:
                continue
            rows.append(ConfigVersion.model_construct(
                device=device, version=version + 1, config=effective, sha256=digest, message=message,
                created_at=created, actor=actor, own=config if used else None, layers=used))
        self._insert_rows(rows)
        return rows

    def _insert_version(
        self,
        device: str,
        own: dict[str, Any],
        *,
        actor: str,
        message: str,
        if_version: int | None,
    ) -> ConfigVersion:
        """A new version whose device layer is ``own``; its config is ``own`` over the layers in
        force for the device (checked against the schemas before it is inserted)."""
        if device not in self._hashes:
            raise UnknownDevice(f"unknown device {device!r}")
        current = self._current_version(device)
        if if_version is not None and if_version != current:
            raise VersionConflict(device, expected=if_version, current=current)
        config, used = self.effective(self.labels_of(device), own)
        if self.validate is not None:
            self.validate(device, config)
        row = ConfigVersion(
            device=device,
            version=current + 1,
            config=config,
            sha256=config_sha256(config),
            message=message,
            created_at=utc_now(),
            actor=actor,
            own=own if used else None,
            layers=used,
        )
        self._insert_rows([row])
        return row

    def _insert_rows(self, rows: list[ConfigVersion], *, own_texts: dict[str, str] | None = None) -> None:
        """Every distinct config, own layer and layer list serialized once (a fleet push or a layer
        change shares them across thousands of rows)."""
        texts: dict[str, str] = {}
        layer_texts: dict[tuple[str, ...], str] = {}
        own_cache: dict[int, str] = {}
        values = []
        for r in rows:
            text = texts.get(r.sha256)
            if text is None:
                text = texts[r.sha256] = json.dumps(r.config, ensure_ascii=False)
            key = tuple(r.layers)
            layers = layer_texts.get(key)
            if layers is None:
                layers = layer_texts[key] = json.dumps(r.layers)
            own = None
            if r.own is not None:
                own = (own_texts or {}).get(r.device) or own_cache.get(id(r.own))
                if own is None:
                    own = own_cache[id(r.own)] = json.dumps(r.own, ensure_ascii=False)
            values.append((r.device, r.version, text, r.sha256, r.message, _ts(r.created_at), r.actor, own, layers))
        self._db.executemany(
            "INSERT INTO config_versions (device, version, config, sha256, message, created_at, actor, own, layers) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

    def _current_version(self, device: str) -> int:
        row = self._db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM config_versions WHERE device = ?", (device,)
        ).fetchone()
        return int(row[0])

    def get_version(self, device: str, version: int | None = None) -> ConfigVersion:
        if device not in self._hashes:
            raise UnknownDevice(f"unknown device {device!r}")
        if version is None:
            version = self._current_version(device)
            if version == 0:
                raise UnknownVersion(f"device {device!r} has no config yet")
        row = self._db.execute(
            f"SELECT {VERSION_COLUMNS} FROM config_versions WHERE device = ? AND version = ?",
            (device, version),
        ).fetchone()
        if row is None:
            raise UnknownVersion(f"device {device!r} has no version {version}")
        return self._version(row)

    def history(self, device: str) -> list[ConfigVersion]:
        if device not in self._hashes:
            raise UnknownDevice(f"unknown device {device!r}")
        rows = self._db.execute(
            f"SELECT {VERSION_COLUMNS} FROM config_versions WHERE device = ? ORDER BY version",
            (device,),
        )
        return [self._version(row) for row in rows]

    def rollback(self, device: str, version: int, *, actor: str, message: str = "") -> ConfigVersion:
        with self._tx():
            old = self.get_version(device, version)
            note = message or f"rollback to version {version}"
            row = self._insert_version(device, old.device_layer, actor=actor, message=note, if_version=None)
            self._audit(actor, "rollback", device, {"to_content_of": version, "version": row.version})
            return row

    def current_versions(self) -> Iterator[ConfigVersion]:
        rows = self._db.execute(
            "SELECT v.device, v.version, v.config, v.sha256, v.message, v.created_at, v.actor, v.own, v.layers "
            "FROM config_versions v JOIN (SELECT device, MAX(version) AS version FROM config_versions "
            "GROUP BY device) m ON m.device = v.device AND m.version = v.version ORDER BY v.device"
        )
        for row in rows.fetchall():
            yield self._version(row)

    @staticmethod
    def _version(row: tuple[Any, ...]) -> ConfigVersion:
        return ConfigVersion(
            device=row[0],
            version=row[1],
            config=json.loads(row[2]),
            sha256=row[3],
            message=row[4],
            created_at=_parse_ts(row[5]),
            actor=row[6],
            own=json.loads(row[7]) if row[7] is not None else None,
            layers=json.loads(row[8]),
        )

    # ---- session epochs ----------------------------------------------------------------------

    def epochs(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT id, epoch FROM devices"))

    def sessions(self) -> list[tuple[str, int, float | None, str | None]]:
        """``(device, epoch high-water mark, last seen, last remote)`` for every device."""
        return list(self._db.execute("SELECT id, epoch, last_seen, last_remote FROM devices"))

    def mqtt_sessions(self) -> list[tuple[str, int, list[tuple[str, int]], float | None]]:
        """``(device, expiry, [(filter, options)], ended at)`` of every persistent MQTT session."""
        return [(device, int(expiry), [(str(f), int(o)) for f, o in json.loads(subs)], ended_at)
                for device, expiry, subs, ended_at in
                self._db.execute("SELECT device, expiry, subs, ended_at FROM mqtt_sessions")]

    def save_sessions(self, epochs: dict[str, int], seen: dict[str, tuple[float, str | None, str]],
                      mqtt: dict[str, tuple[int, list[tuple[str, int]], float | None] | None] | None = None,
                      ) -> None:
        """Epochs (the group commit of a reconnect storm), last-seen records and persistent MQTT
        sessions (None: ended) in one transaction.

        An epoch high-water mark only goes up, even if saved out of order.
        """
        with self._tx():
            if mqtt:
                self._db.executemany("DELETE FROM mqtt_sessions WHERE device = ?",
                                     [(d,) for d, s in mqtt.items() if s is None or d not in self._hashes])
                self._db.executemany(
                    "INSERT INTO mqtt_sessions (device, expiry, subs, ended_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET expiry = excluded.expiry, subs = excluded.subs, "
                    "ended_at = excluded.ended_at",
                    [(d, s[0], json.dumps(s[1]), s[2]) for d, s in mqtt.items() if s is not None and d in self._hashes])
            self._db.executemany(
                "UPDATE devices SET epoch = MAX(epoch, ?) WHERE id = ?", [(e, d) for d, e in epochs.items()]
            )
            self._db.executemany(
                "UPDATE devices SET last_seen = ?, last_remote = ?, last_reason = ? WHERE id = ?",
                [(at, remote, reason, d) for d, (at, remote, reason) in seen.items()],
            )

    # ---- device reports ----------------------------------------------------------------------

    def record_reports(self, reports: list[tuple[str, int, str, str | None, int | None]]) -> list[str]:
        """Many reports ``(device, version, status, error, epoch)`` in one transaction (a wave's
        devices answer together): per report ``ok``, ``unknown`` (a device removed meanwhile) or
        ``newer`` (a version it was never sent)."""
        outcomes: list[str] = []
        now = _ts(utc_now())
        with self._tx():
            current: dict[str, int] = {}
            for device, version, status, error, epoch in reports:
                if device not in self._hashes:
                    outcomes.append("unknown")
                    continue
                if device not in current:
                    current[device] = self._current_version(device)
                if version > current[device]:
                    outcomes.append("newer")
                    continue
                self._store_report(device, version, status, error, now, epoch)
                outcomes.append("ok")
        return outcomes

    def _store_report(self, device: str, version: int, status: str, error: str | None, now: str,
                      epoch: int | None = None) -> None:
        # The version's own report (its latest word on that version), kept as long as the version is.
        self._db.execute(
            "INSERT INTO version_reports (device, version, status, error, at, epoch) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device, version) DO UPDATE SET status = excluded.status, error = excluded.error, "
            "at = excluded.at, epoch = excluded.epoch",
            (device, version, status, (error or "") if status == "rejected" else None, now, epoch))
        # The device's summary: the newest applied and the newest rejected version.
        self._db.execute("INSERT OR IGNORE INTO device_reports (device) VALUES (?)", (device,))
        if status == "applied":
            self._db.execute(
                "UPDATE device_reports SET applied_version = ?, applied_at = ? "
                "WHERE device = ? AND (applied_version IS NULL OR applied_version <= ?)",
                (version, now, device, version),
            )
        else:
            self._db.execute(  # never lowered either: a late rejection of an older version changes nothing
                "UPDATE device_reports SET rejected_version = ?, rejected_error = ?, rejected_at = ? "
                "WHERE device = ? AND (rejected_version IS NULL OR rejected_version <= ?)",
                (version, error or "", now, device, version),
            )

    def record_report(self, device: str, version: int, status: str, error: str | None,
                      epoch: int | None = None) -> None:
        """Record an applied/rejected report; an older version never lowers a newer one, of either kind."""
        with self._tx():
            self._store_report(device, version, status, error, _ts(utc_now()), epoch)

    def version_reports(self, device: str) -> dict[int, VersionReport]:
        """Each version's own report (versions with none are absent)."""
        return {v: VersionReport(status=s, error=e, at=_parse_ts(at), epoch=ep) for v, s, e, at, ep in self._db.execute(
            "SELECT version, status, error, at, epoch FROM version_reports WHERE device = ?", (device,))}

    def reports(self) -> dict[str, DeviceReports]:
        rows = self._db.execute(
            "SELECT device, applied_version, applied_at, rejected_version, rejected_error, rejected_at "
            "FROM device_reports"
        )
        return {row[0]: DeviceReports(*row[1:]) for row in rows}

    def device_reports(self, device: str) -> DeviceReports:
        row = self._db.execute(
            "SELECT applied_version, applied_at, rejected_version, rejected_error, rejected_at "
            "FROM device_reports WHERE device = ?",
            (device,),
        ).fetchone()
        return DeviceReports(*row) if row else DeviceReports()

    # ---- audit trail ---------------------------------------------------------------------------

    def _audit(self, actor: str, action: str, device: str | None, summary: dict[str, Any]) -> None:
        """Inside the caller's transaction: an action and its audit row land together or not at all."""
        self._db.execute(
            "INSERT INTO audit (at, actor, action, device, summary) VALUES (?, ?, ?, ?, ?)",
            (_ts(utc_now()), actor, action, device, json.dumps(summary, sort_keys=True)),
        )

    def record_audit(self, actor: str, action: str, device: str | None, summary: dict[str, Any]) -> None:
        with self._tx():
            self._audit(actor, action, device, summary)

    def audit(self, device: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first; bulk actions carry no device."""
        if device is None:
            rows = self._db.execute(
                "SELECT id, at, actor, action, device, summary FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = self._db.execute(
                "SELECT id, at, actor, action, device, summary FROM audit WHERE device = ? ORDER BY id DESC "
                "LIMIT ?",
                (device, limit),
            )
        entries = [
            {"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "device": r[4], "summary": json.loads(r[5])}
            for r in rows
        ]
        return entries[::-1]

    # ---- admins ------------------------------------------------------------------------------

    def ensure_admin(self, name: str, secret: str) -> None:
        with self._tx():
            row = self._db.execute("SELECT secret_hash, broker_hash FROM admins WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] == hash_secret(secret) and row[1]:
                return  # unchanged: keep the broker hash (its salt) stable across restarts
            self._db.execute(
                "INSERT INTO admins (name, secret_hash, created_at, broker_hash) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET secret_hash = excluded.secret_hash, "
                "broker_hash = excluded.broker_hash",
                (name, hash_secret(secret), _ts(utc_now()), mosquitto_hash(secret)),
            )
        self._admin_hashes[name] = bytes.fromhex(hash_secret(secret))

    def broker_hashes(self) -> tuple[dict[str, str], list[str]]:
        """``{username: mosquitto hash}`` for admins and devices, and devices that have none yet."""
        found: dict[str, str] = dict(
            self._db.execute("SELECT name, broker_hash FROM admins WHERE broker_hash IS NOT NULL")
        )
        missing: list[str] = []
        for device, digest in self._db.execute("SELECT id, broker_hash FROM devices ORDER BY id"):
            if digest:
                found[device] = digest
            else:
                missing.append(device)
        return found, missing

    def backup(self, target: Path) -> int:
        """A consistent copy of the store in ``target`` (SQLite's online backup), mode 0600, written
        atomically; returns its size. Runs between transactions, so it never holds half of one."""
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        try:
            copy = sqlite3.connect(tmp)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def verify_admin(self, name: str, secret: str) -> bool:
        """From memory, like devices: safe to call on the event loop."""
        expected = self._admin_hashes.get(name)
        if expected is None:
            return False
        return hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), expected)

    # ---- layers ------------------------------------------------------------------------------

    def _load_layers(self) -> dict[str, Layer]:
        out: dict[str, Layer] = {}
        for name, version, selector, priority, content, message in self._db.execute(
                "SELECT l.name, l.version, l.selector, l.priority, l.content, l.message FROM layers l JOIN "
                "(SELECT name, MAX(version) AS m FROM layers GROUP BY name) x ON x.name = l.name AND x.m = l.version"):
            if content is not None:
                out[name] = Layer(name, version, json.loads(selector), priority, json.loads(content), message)
        return out

    def layers(self) -> dict[str, Layer]:
        return dict(self._layers)

    def layers_for(self, labels: dict[str, str], layers: dict[str, Layer] | None = None) -> list[Layer]:
        """The layers that apply to a device with ``labels``, in merge order: the fleet's, then label
        layers by priority (lowest first) and name."""
        layers = self._layers if layers is None else layers
        fleet = [layer for layer in layers.values() if layer.name == FLEET_LAYER]
        rest = sorted((layer for layer in layers.values() if layer.name != FLEET_LAYER and layer.applies(labels)),
                      key=lambda layer: (layer.priority, layer.name))
        return fleet + rest

    @staticmethod
    def merge_layers(applied: list[Layer], own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        if not applied:
            return own, []  # no layer: the device layer is the config exactly as given
        config: dict[str, Any] = {}
        for layer in applied:
            config = merge_patch(config, layer.content)
        config = merge_patch(config, own)
        return config, [layer.ref for layer in applied] + ["device"]

    def effective(self, labels: dict[str, str], own: dict[str, Any],
                  layers: dict[str, Layer] | None = None) -> tuple[dict[str, Any], list[str]]:
        """``(config, layers used)``: the layers for ``labels`` merged in order, then ``own``."""
        return self.merge_layers(self.layers_for(labels, layers), own)

    def _current_rows(self, devices: list[str]) -> dict[str, tuple[int, str | None, str, str]]:
        """``{device: (version, own json, config json, sha256)}`` of the current versions."""
        out: dict[str, tuple[int, str | None, str, str]] = {}
        for start in range(0, len(devices), 500):
            part = devices[start:start + 500]
            marks = ",".join("?" * len(part))
            for device, version, own, config, sha in self._db.execute(
                    "SELECT v.device, v.version, v.own, v.config, v.sha256 FROM config_versions v JOIN "
                    f"(SELECT device, MAX(version) AS m FROM config_versions WHERE device IN ({marks}) "
                    "GROUP BY device) x "
                    "ON x.device = v.device AND x.m = v.version", part):
                out[device] = (version, own, config, sha)
        return out

    def _refresh(self, devices: list[str], layers: dict[str, Layer], *, actor: str,
                 message: str) -> list[ConfigVersion]:
        """Inside a transaction: a new version for each device whose config under ``layers`` differs
        from its current one (a device without a version gets one if a layer applies to it); every
        new config is checked against the schemas first, all or none."""
        current = self._current_rows(devices)
        labels = self.labels_by_device(devices)
        created = utc_now()
        rows: list[ConfigVersion] = []
        texts: dict[str, str] = {}  # device -> its own layer's JSON, reused as is
        merged: dict[tuple[tuple[str, ...], str], tuple[dict[str, Any], list[str], str, Any]] = {}
        for device in devices:
            version, own_text, config_text, sha = current.get(device, (0, None, None, None))
            text = (own_text if own_text is not None else config_text) if version else None
            applied = self.layers_for(labels.get(device, {}), layers)
            key = (tuple(layer.ref for layer in applied), text or "{}")
            if key not in merged:  # devices with the same own layer under the same layers: one merge
                own = json.loads(text) if text is not None else {}
                effective, used = self.merge_layers(applied, own)
                merged[key] = (effective, used, config_sha256(effective), own)
            effective, used, digest, own = merged[key]
            if (not version and not used) or digest == sha:
                continue
            if used:
                texts[device] = text or "{}"
            rows.append(ConfigVersion.model_construct(
                device=device, version=version + 1, config=effective, sha256=digest, message=message,
                created_at=created, actor=actor, own=own if used else None, layers=used))
        if rows and self.validate_many is not None:
            self.validate_many([(r.device, labels.get(r.device, {}), r.config) for r in rows])
        self._insert_rows(rows, own_texts=texts)
        return rows

    def set_layer(self, name: str, content: dict[str, Any] | None, *, actor: str, message: str = "",
                  selector: dict[str, str] | None = None, priority: int | None = None,
                  ) -> tuple[int, list[ConfigVersion]]:
        """A new version of layer ``name`` (``content`` None: removed) and, in the same transaction, a
        new device version for exactly the devices whose config it changes."""
        staged = self._staging(name)
        if staged:
            raise RolloutConflict(f"layer {name!r} is being rolled out by {staged}; wait for it, or abort it")
        with self._tx():
            version, rows, candidate = self._set_layer(name, content, actor=actor, message=message,
                                                       selector=selector, priority=priority)
        self._layers = candidate
        return version, rows

    def candidate_layer(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                        priority: int | None) -> tuple[Layer | None, dict[str, str], int]:
        """The layer ``name`` would be after this change (None: removed), its selector and priority."""
        if name == FLEET_LAYER and selector:
            raise ValidationFailed("the fleet layer applies to every device: it takes no labels")
        before = self._layers.get(name)
        if content is None and before is None:
            raise UnknownLayer(f"no layer {name!r} is in force")
        if content is not None and name != FLEET_LAYER and selector is None and before is None:
            raise ValidationFailed(f"a new layer needs its labels (--label k=v), or use the name {FLEET_LAYER!r}")
        sel = selector if selector is not None else (before.selector if before else {})
        prio = priority if priority is not None else (before.priority if before else 0)
        row = self._db.execute("SELECT MAX(version) FROM layers WHERE name = ?", (name,)).fetchone()
        version = int(row[0] or 0) + 1
        layer = Layer(name, version, sel, prio, content) if content is not None else None
        return layer, sel, prio

    def _set_layer(self, name: str, content: dict[str, Any] | None, *, actor: str, message: str,
                   selector: dict[str, str] | None, priority: int | None,
                   ) -> tuple[int, list[ConfigVersion], dict[str, Layer]]:
        """Inside the caller's transaction; the caller installs the returned layers once it commits."""
        layer, sel, prio = self.candidate_layer(name, content, selector=selector, priority=priority)
        row = self._db.execute("SELECT MAX(version) FROM layers WHERE name = ?", (name,)).fetchone()
        version = int(row[0] or 0) + 1
        self._db.execute(
            "INSERT INTO layers (name, version, selector, priority, content, message, created_at, actor) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, json.dumps(sel, sort_keys=True), prio,
             json.dumps(content, sort_keys=True) if content is not None else None, message, _ts(utc_now()), actor))
        candidate = dict(self._layers)
        if layer is None:
            candidate.pop(name, None)
        else:
            candidate[name] = Layer(name, version, sel, prio, layer.content, message)
        rows = self._refresh(sorted(self._hashes), candidate, actor=actor, message=message or f"layer {name}@{version}")
        self._audit(actor, "layer.remove" if content is None else "layer.set", None,
                    {"layer": name, "version": version, "labels": sel, "priority": prio, "devices": len(rows)})
        return version, rows, candidate

    def _staging(self, name: str) -> str | None:
        """The active rollout staging a change of layer ``name``, if any."""
        for rid, layer in self._db.execute("SELECT id, layer FROM rollouts WHERE layer IS NOT NULL AND state IN "
                                           "('running', 'paused', 'reverting')"):
            if json.loads(layer)["name"] == name:
                return str(rid)
        return None

    def layer_change_targets(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                             priority: int | None) -> list[str]:
        """The devices whose config a layer change would alter (a staged layer change's targets)."""
        layer, _, _ = self.candidate_layer(name, content, selector=selector, priority=priority)
        candidate = dict(self._layers)
        if layer is None:
            candidate.pop(name, None)
        else:
            candidate[name] = layer
        devices = sorted(self._hashes)
        current = self._current_rows(devices)
        labels = self.labels_by_device(devices)
        out = []
        for device in devices:
            version, own_text, config_text, sha = current.get(device, (0, None, None, None))
            text = (own_text if own_text is not None else config_text) if version else None
            own = json.loads(text) if text is not None else {}
            effective, used = self.effective(labels.get(device, {}), own, candidate)
            if (version or used) and config_sha256(effective) != sha:
                out.append(device)
        return out

    def layer_history(self, name: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT version, selector, priority, content, message, created_at, actor FROM layers WHERE name = ? "
            "ORDER BY version", (name,)).fetchall()
        if not rows:
            raise UnknownLayer(f"no layer {name!r}")
        return [{"layer": name, "version": v, "labels": json.loads(sel), "priority": prio,
                 "content": json.loads(c) if c is not None else None, "removed": c is None, "message": msg,
                 "created_at": at, "actor": actor} for v, sel, prio, c, msg, at, actor in rows]

    def explain(self, device: str, version: int | None = None) -> list[dict[str, Any]]:
        """Per leaf of the device's config: its JSON pointer, value and the layer that set it."""
        row = self.get_version(device, version)
        chain: list[tuple[str, dict[str, Any]]] = []
        for ref in row.layers:
            if ref == "device":
                continue
            base, _, staged = ref.partition(" (rollout ")
            name, _, number = base.rpartition("@")
            found = self._db.execute("SELECT content FROM layers WHERE name = ? AND version = ?",
                                     (name, int(number))).fetchone()
            if (found is None or found[0] is None) and staged:  # staged by a rollout, not (yet) in force
                spec = self._db.execute("SELECT layer FROM rollouts WHERE id = ?", (staged.rstrip(")"),)).fetchone()
                found = (json.dumps(json.loads(spec[0])["content"]),) if spec and spec[0] else None
            if found and found[0] is not None:
                chain.append((ref, json.loads(found[0])))
        chain.append(("device", row.device_layer))
        owner = explain(chain) if row.layers else {}
        leaves: list[dict[str, Any]] = []

        def walk(value: Any, where: str) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(item, f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}")
            else:
                layer = owner.get(where)
                if layer is None:  # set inside an object a higher layer replaced, or no layers at all
                    layer = next((owner[k] for k in sorted(owner, key=len, reverse=True)
                                  if where.startswith(k + "/")), "device")
                leaves.append({"pointer": where, "value": value, "layer": layer})

        walk(row.config, "")
        return leaves

    # ---- rollouts ----------------------------------------------------------------------------

    ACTIVE_ROLLOUT = ("running", "paused", "reverting")

    def create_rollout(self, rollout_id: str, waves: list[list[str]], *, actor: str, target: dict[str, Any],
                       config: dict[str, Any], policy: dict[str, Any], message: str,
                       layer: dict[str, Any] | None = None) -> None:
        """The plan, stored before anything is published; refused if a target is in an active rollout."""
        devices = [d for wave in waves for d in wave]
        with self._tx():
            for start in range(0, len(devices), 500):
                part = devices[start:start + 500]
                marks = ",".join("?" * len(part))
                busy = self._db.execute(
                    f"SELECT rd.device, r.id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout "
                    f"WHERE rd.device IN ({marks}) AND r.state IN ('running', 'paused', 'reverting') LIMIT 1",
                    part).fetchone()
                if busy:
                    raise RolloutConflict(f"device {busy[0]!r} is in the active rollout {busy[1]}; one rollout per "
                                          "device at a time (finish, abort or wait for it); nothing was started")
            if layer is not None and (staged := self._staging(layer["name"])):
                raise RolloutConflict(f"layer {layer['name']!r} is being rolled out by {staged}; nothing was started")
            self._db.execute(
                "INSERT INTO rollouts (id, created_at, actor, target, config, policy, message, state, waves, layer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (rollout_id, _ts(utc_now()), actor, json.dumps(target, sort_keys=True),
                 json.dumps(config, ensure_ascii=False), json.dumps(policy, sort_keys=True), message, len(waves),
                 json.dumps(layer, sort_keys=True) if layer is not None else None))
            self._db.executemany("INSERT INTO rollout_devices (rollout, device, wave) VALUES (?, ?, ?)",
                                 [(rollout_id, d, i) for i, wave in enumerate(waves) for d in wave])
            self._audit(actor, "rollout.start", None, {"rollout": rollout_id, "devices": len(devices),
                                                       "waves": len(waves), "message": message})

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT id, created_at, actor, target, config, policy, message, state, wave, waves, wave_published, "
            "wave_started, next_wave_at, reason, revert, finished_at, layer FROM rollouts WHERE id = ?",
            (rollout_id,)).fetchone()
        if row is None:
            raise UnknownRollout(f"no rollout {rollout_id!r}")
        keys = ("id", "created_at", "actor", "target", "config", "policy", "message", "state", "wave", "waves",
                "wave_published", "wave_started", "next_wave_at", "reason", "revert", "finished_at", "layer")
        out = dict(zip(keys, row, strict=True))
        for key in ("target", "config", "policy"):
            out[key] = json.loads(out[key])
        out["layer"] = json.loads(out["layer"]) if out["layer"] is not None else None
        out["wave_published"], out["revert"] = bool(out["wave_published"]), bool(out["revert"])
        return out

    def rollouts(self, active_only: bool = False) -> list[dict[str, Any]]:
        where = " WHERE state IN ('running', 'paused', 'reverting')" if active_only else ""
        return [self.rollout(r[0]) for r in self._db.execute(f"SELECT id FROM rollouts{where} ORDER BY created_at")]

    def rollout_devices(self, rollout_id: str, wave: int | None = None) -> list[dict[str, Any]]:
        """Each device of the rollout (of one wave) with what the rollout did to it and its reports."""
        args: list[Any] = [rollout_id]
        where = "rd.rollout = ?"
        if wave is not None:
            where += " AND rd.wave = ?"
            args.append(wave)
        rows = self._db.execute(
            "SELECT rd.device, rd.wave, rd.prev_version, rd.new_version, rd.online_at_start, rd.reverted_version, "
            "rd.revert_note, rd.outcome, rd.outcome_error, vr.status, vr.error FROM rollout_devices rd "
            "LEFT JOIN version_reports vr ON vr.device = rd.device AND vr.version = rd.new_version "
            f"WHERE {where} ORDER BY rd.wave, rd.device", args)
        out = []
        for device, wv, prev, new, online, reverted, note, frozen, frozen_error, status, error in rows:
            # The outcome of the rollout's own version: frozen once the wave is decided; until then
            # that version's report. A later version (a revert, another push) never counts.
            if frozen is not None:
                report, error = (None if frozen == "pending" else frozen), frozen_error
            else:
                report = status if new is not None else None
            out.append({"device": device, "wave": wv, "prev_version": prev, "new_version": new,
                        "online_at_start": bool(online), "report": report,
                        "error": error if report == "rejected" else None, "reverted_version": reverted,
                        "revert_note": note})
        return out

    def _freeze_outcomes(self, rollout_id: str, wave: int | None = None) -> None:
        """Inside the caller's transaction: each published device's report of the rollout's version
        (or ``pending``) becomes the wave's outcome for good, whatever it reports later."""
        args: list[Any] = [rollout_id]
        where = ""
        if wave is not None:
            where, args = " AND wave = ?", [rollout_id, wave]
        match = "vr.device = rollout_devices.device AND vr.version = rollout_devices.new_version"
        self._db.execute(
            f"UPDATE rollout_devices SET outcome = COALESCE((SELECT status FROM version_reports vr WHERE {match}), "
            f"'pending'), outcome_error = (SELECT error FROM version_reports vr WHERE {match} AND "
            f"vr.status = 'rejected') WHERE rollout = ? AND new_version IS NOT NULL AND outcome IS NULL{where}",
            args)

    def publish_wave(self, rollout_id: str, wave: int, online: set[str], *, now: float) -> list[ConfigVersion]:
        """The wave's versions and the mark that it went out, in one transaction: a wave is stored
        once, whatever crashes when (a restart republishes every current version anyway)."""
        ro = self.rollout(rollout_id)
        if ro["state"] != "running" or ro["wave"] != wave or ro["wave_published"]:
            return []
        devices = [r[0] for r in self._db.execute(
            "SELECT device FROM rollout_devices WHERE rollout = ? AND wave = ? AND new_version IS NULL ORDER BY device",
            (rollout_id, wave))]
        devices = [d for d in devices if d in self._hashes]  # a device removed meanwhile is skipped
        note = ro["message"] or f"rollout {rollout_id} wave {wave + 1}"
        with self._tx():
            current = self._current_rows(devices)
            if ro["layer"] is not None:  # a staged layer change: these devices get it now, the layer at the end
                spec = ro["layer"]
                layer, _, _ = self.candidate_layer(spec["name"], spec["content"], selector=spec["labels"],
                                                   priority=spec["priority"])
                candidate = dict(self._layers)
                if layer is None:
                    candidate.pop(spec["name"], None)
                else:
                    candidate[spec["name"]] = Layer(spec["name"], layer.version, layer.selector, layer.priority,
                                                    layer.content, staged_by=rollout_id)
                rows = self._refresh(devices, candidate, actor=ro["actor"], message=note)  # checks the schemas
            else:
                rows = self._push_many(devices, ro["config"], actor=ro["actor"], message=note, skip_unchanged=False)
                if rows and self.validate_many is not None:  # a schema set since the start: the wave halts
                    labels = self.labels_by_device(devices)
                    self.validate_many([(r.device, labels.get(r.device, {}), r.config) for r in rows])
            self._audit(ro["actor"], "rollout.wave", None, {"rollout": rollout_id, "wave": wave + 1,
                                                            "devices": len(rows)})
            self._db.executemany(
                "UPDATE rollout_devices SET prev_version = ?, new_version = ?, online_at_start = ? "
                "WHERE rollout = ? AND device = ?",
                [(current.get(r.device, (0,))[0], r.version, int(r.device in online), rollout_id, r.device)
                 for r in rows])
            self._db.execute("UPDATE rollouts SET wave_published = 1, wave_started = ? WHERE id = ?",
                             (now, rollout_id))
        return rows

    def advance_rollout(self, rollout_id: str, *, next_wave_at: float) -> tuple[str, list[ConfigVersion]]:
        """The current wave passed: on to the next (after the pause), or completed. A staged layer
        change comes into force in the transaction that completes its rollout (the rows: devices
        it changes that no wave held, e.g. added since)."""
        rows: list[ConfigVersion] = []
        installed: dict[str, Layer] | None = None
        with self._tx():
            ro = self.rollout(rollout_id)
            self._freeze_outcomes(rollout_id, ro["wave"])
            if ro["wave"] + 1 >= ro["waves"]:
                if ro["layer"] is not None:
                    spec = ro["layer"]
                    _, rows, installed = self._set_layer(spec["name"], spec["content"], actor=ro["actor"],
                                                         message=ro["message"] or f"rollout {rollout_id}",
                                                         selector=spec["labels"], priority=spec["priority"])
                self._db.execute("UPDATE rollouts SET state = 'completed', finished_at = ? WHERE id = ?",
                                 (_ts(utc_now()), rollout_id))
                self._audit(ro["actor"], "rollout.complete", None, {"rollout": rollout_id})
                state = "completed"
            else:
                self._db.execute("UPDATE rollouts SET wave = wave + 1, wave_published = 0, wave_started = NULL, "
                                 "next_wave_at = ? WHERE id = ?", (next_wave_at, rollout_id))
                state = "running"
        if installed is not None:
            self._layers = installed
        return state, rows

    def set_rollout_state(self, rollout_id: str, state: str, *, actor: str, reason: str | None = None,
                          revert: bool = False, expect: tuple[str, ...] = ()) -> dict[str, Any]:
        with self._tx():
            ro = self.rollout(rollout_id)
            if expect and ro["state"] not in expect:
                raise RolloutConflict(f"rollout {rollout_id} is {ro['state']}; cannot make it {state}")
            if state in ("reverting", "aborted"):  # the rollout is decided: what it did stays as it was
                self._freeze_outcomes(rollout_id)
            self._db.execute("UPDATE rollouts SET state = ?, reason = COALESCE(?, reason), revert = ? WHERE id = ?",
                             (state, reason, int(revert or ro["revert"]), rollout_id))
            self._audit(actor, f"rollout.{state}", None, {"rollout": rollout_id} | ({"reason": reason} if reason
                                                                                      else {}))
        return self.rollout(rollout_id)

    def revert_rollout(self, rollout_id: str, *, final: str) -> list[ConfigVersion]:
        """Every device the rollout changed gets its previous config back as a new version, in one
        transaction with the rollout's final state; a device changed since by someone else keeps
        that change (noted), and one with no previous config keeps the new one (noted)."""
        ro = self.rollout(rollout_id)
        rows: list[ConfigVersion] = []
        with self._tx():
            todo = self._db.execute(
                "SELECT device, prev_version, new_version FROM rollout_devices WHERE rollout = ? AND "
                "new_version IS NOT NULL AND reverted_version IS NULL AND revert_note IS NULL",
                (rollout_id,)).fetchall()
            notes = []
            for device, prev, new in todo:
                if device not in self._hashes:
                    notes.append(("device removed", device))
                    continue
                current = self._current_version(device)
                if current != new:
                    notes.append((f"left at version {current}: changed after the rollout", device))
                    continue
                if not prev:
                    notes.append(("no previous config: kept the rollout's", device))
                    continue
                old = self.get_version(device, prev)
                row = self._insert_version(device, old.device_layer, actor=ro["actor"],
                                           message=f"revert rollout {rollout_id}", if_version=None)
                rows.append(row)
            self._db.executemany("UPDATE rollout_devices SET reverted_version = ? WHERE rollout = ? AND device = ?",
                                 [(r.version, rollout_id, r.device) for r in rows])
            self._db.executemany("UPDATE rollout_devices SET revert_note = ? WHERE rollout = ? AND device = ?",
                                 [(note, rollout_id, d) for note, d in notes])
            self._freeze_outcomes(rollout_id)
            self._db.execute("UPDATE rollouts SET state = ?, finished_at = ? WHERE id = ?",
                             (final, _ts(utc_now()), rollout_id))
            self._audit(ro["actor"], "rollout.reverted", None, {"rollout": rollout_id, "devices": len(rows),
                                                                "kept": len(notes)})
        return rows

    # ---- schemas -----------------------------------------------------------------------------

    def labels_of(self, device: str) -> dict[str, str]:
        row = self._db.execute("SELECT labels FROM devices WHERE id = ?", (device,)).fetchone()
        if row is None:
            raise UnknownDevice(f"unknown device {device!r}")
        return dict(json.loads(row[0]))

    def labels_by_device(self, devices: list[str] | None = None) -> dict[str, dict[str, str]]:
        if devices is None:
            return {d: json.loads(t) for d, t in self._db.execute("SELECT id, labels FROM devices")}
        out: dict[str, dict[str, str]] = {}
        for start in range(0, len(devices), 500):
            part = devices[start:start + 500]
            marks = ",".join("?" * len(part))
            out.update({d: json.loads(t) for d, t in
                        self._db.execute(f"SELECT id, labels FROM devices WHERE id IN ({marks})", part)})
        return out

    def current_configs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every device's current config (devices without one are left out)."""
        for device, text in self._db.execute(
                "SELECT v.device, v.config FROM config_versions v JOIN (SELECT device, MAX(version) AS m "
                "FROM config_versions GROUP BY device) x ON x.device = v.device AND x.m = v.version"):
            yield device, json.loads(text)

    def current_config(self, device: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT config FROM config_versions WHERE device = ? ORDER BY version DESC LIMIT 1",
                               (device,)).fetchone()
        return dict(json.loads(row[0])) if row else None

    def current_config_layer(self, device: str) -> dict[str, Any]:
        """The device's own layer at its current version ({} without one)."""
        row = self._db.execute("SELECT own, config FROM config_versions WHERE device = ? ORDER BY version DESC "
                               "LIMIT 1", (device,)).fetchone()
        if row is None:
            return {}
        return dict(json.loads(row[0] if row[0] is not None else row[1]))

    def schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The schemas in force: ``{selector: (version, document)}``."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for selector, version, document in self._db.execute(
                "SELECT s.selector, s.version, s.document FROM schemas s JOIN (SELECT selector, MAX(version) AS m "
                "FROM schemas GROUP BY selector) x ON x.selector = s.selector AND x.m = s.version"):
            if document is not None:
                out[selector] = (version, json.loads(document))
        return out

    def schema_history(self, selector: str) -> list[dict[str, Any]]:
        return [
            {"selector": selector, "version": v, "removed": d is None, "created_at": at, "actor": actor,
             "document": json.loads(d) if d is not None else None}
            for v, d, at, actor in self._db.execute(
                "SELECT version, document, created_at, actor FROM schemas WHERE selector = ? ORDER BY version",
                (selector,))
        ]

    def put_schema(self, selector: str, document: dict[str, Any] | None, *, actor: str, forced: bool = False) -> int:
        """A new version of the schema for ``selector`` (``None``: removed); audited with it."""
        with self._tx():
            row = self._db.execute("SELECT MAX(version) FROM schemas WHERE selector = ?", (selector,)).fetchone()
            version = int(row[0] or 0) + 1
            self._db.execute(
                "INSERT INTO schemas (selector, version, document, created_at, actor) VALUES (?, ?, ?, ?, ?)",
                (selector, version, json.dumps(document, sort_keys=True) if document is not None else None,
                 _ts(utc_now()), actor))
            action = "schema.remove" if document is None else "schema.set"
            self._audit(actor, action, None, {"schema": selector or "fleet", "version": version}
                        | ({"forced": True} if forced else {}))
        return version

    # ---- HTTP API tokens ---------------------------------------------------------------------

    def create_token(self, name: str, role: str, *, actor: str) -> tuple[str, str]:
        """``(id, token)``: the token is shown once; only its hash is kept."""
        if role not in ROLES:
            raise ValidationFailed(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        token_id = secrets.token_hex(4)
        token = f"henge_{token_id}_{secrets.token_urlsafe(24)}"
        with self._tx():
            if self._db.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise DuplicateToken(f"a token named {name!r} exists; revoke it first or pick another name")
            self._db.execute(
                "INSERT INTO api_tokens (id, name, role, secret_hash, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, name, role, hash_secret(token), _ts(utc_now()), actor),
            )
            self._audit(actor, "token.create", None, {"token": name, "role": role})
        self._tokens[token_id] = (bytes.fromhex(hash_secret(token)), role, name)
        return token_id, token

    def list_tokens(self) -> list[dict[str, Any]]:
        return [
            {"id": r[0], "name": r[1], "role": r[2], "created_at": r[3], "created_by": r[4]}
            for r in self._db.execute("SELECT id, name, role, created_at, created_by FROM api_tokens ORDER BY name")
        ]

    def revoke_token(self, ref: str, *, actor: str) -> dict[str, Any]:
        """By id or name; the token stops working at once."""
        with self._tx():
            row = self._db.execute("SELECT id, name, role FROM api_tokens WHERE id = ? OR name = ?",
                                   (ref, ref)).fetchone()
            if row is None:
                raise UnknownToken(f"no token with id or name {ref!r}")
            self._db.execute("DELETE FROM api_tokens WHERE id = ?", (row[0],))
            self._audit(actor, "token.revoke", None, {"token": row[1], "role": row[2]})
        self._tokens.pop(row[0], None)
        return {"id": row[0], "name": row[1], "role": row[2], "revoked": True}

    def verify_token(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of a live token, from memory: safe to call on the event loop."""
        parts = token.split("_")
        if len(parts) < 3 or parts[0] != "henge":
            return None
        entry = self._tokens.get(parts[1])
        if entry is None or not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), entry[0]):
            return None
        return entry[2], entry[1]

    def has_tokens(self) -> bool:
        return bool(self._tokens)


class StoreWorker:
    """The store's one thread: calls run there in the order they were made; the loop only awaits.

    ``has_device``/``verify_device``/``verify_admin`` read in-memory dicts and may be called from
    the loop directly; everything else goes through :meth:`run`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="henge-store")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()


@dataclass(frozen=True, slots=True)
class DeviceReports:
    applied_version: int | None = None
    applied_at: str | None = None
    rejected_version: int | None = None
    rejected_error: str | None = None
    rejected_at: str | None = None

    def sync(self, desired: int) -> str:
        """in_sync / pending / rejected / unknown, as documented in docs/protocol.md."""
        if self.applied_version is None and self.rejected_version is None:
            return "unknown"
        if self.applied_version is not None and self.applied_version >= desired:
            return "in_sync"
        if self.rejected_version == desired:
            return "rejected"
        return "pending"


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
