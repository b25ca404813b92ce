"""``henge migrate``: a whole store from SQLite to PostgreSQL or back, in one transaction on the target.

Both ends are opened as henge stores (so the target gets every migration first), every table is
copied in dependency order with its rows as they are, and the target must be empty: a migration
never merges two histories. The source is only read. Stop the service first (a running service on
a SQLite data dir is refused by its lock).
"""

from __future__ import annotations

from pathlib import Path

from ..datadir import DataDirLock
from ..errors import ValidationFailed
from ..store import Store

TABLES = ("meta", "devices", "admins", "config_versions", "device_reports", "audit", "api_tokens", "schemas", "layers",
          "rollouts", "rollout_devices", "version_reports", "mqtt_sessions", "reported", "reported_history", "claims",
          "claim_uses", "fleet_series", "presence_history", "device_sessions")
# Not copied: who holds the write lease of a PostgreSQL store (the running instances', not the data's).
NOT_COPIED = ("lease",)


def _open(where: str, scratch: Path) -> tuple[Store, DataDirLock | None]:
    if where.startswith(("postgresql://", "postgres://")):
        return Store(scratch, url=where), None
    data = Path(where)
    lock = DataDirLock(data)
    lock.acquire()  # refuses a data dir a service is running on
    try:
        return Store(data), lock
    except BaseException:
        lock.release()
        raise


def migrate_store(source: str, target: str) -> dict[str, int]:
    if source == target:
        raise ValidationFailed("--from and --to are the same store")
    if not source.startswith(("postgresql://", "postgres://")) and not (Path(source) / "henge.db").exists():
        raise ValidationFailed(f"no henge store in {source} (henge.db is missing)")
    scratch = Path("/nonexistent-henge-scratch")
    src, src_lock = _open(source, scratch)
    try:
        dst, dst_lock = _open(target, scratch)
        try:
            return _copy(src, dst)
        finally:
            dst.close()
            if dst_lock is not None:
                dst_lock.release()
    finally:
        src.close()
        if src_lock is not None:
            src_lock.release()


def _copy(src: Store, dst: Store) -> dict[str, int]:
    s, d = src._db, dst._db  # both stores' one connection: this runs while no service holds them
    for table in TABLES:
        if d.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
            raise ValidationFailed(f"the target already holds data ({table}); migrate into an empty store")
    counts: dict[str, int] = {}
    d.execute("BEGIN IMMEDIATE")
    try:
        for table in TABLES:
            cursor = s.execute(f"SELECT * FROM {table}")
            columns = [c[0] for c in cursor.description]
            rows = cursor.fetchall()
            if rows:
                marks = ", ".join("?" * len(columns))
                d.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            counts[table] = len(rows)
        if dst.url is not None and counts["audit"]:  # the audit ids go on from where they were
            d.execute("SELECT setval(pg_get_serial_sequence('audit', 'id'), (SELECT max(id) FROM audit))")
        d.execute("COMMIT")
    except BaseException:
        d.execute("ROLLBACK")
        raise
    return counts
