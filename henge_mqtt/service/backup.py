"""Backup and restore of a data dir's store, for when no service is running (``henge backup`` and
``henge restore``; a running service makes its own backup through the admin protocol)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from ..datadir import DataDirLock, service_running
from ..errors import ServiceUnavailable, StoreError, ValidationFailed
from ..store import DB_FILE, Store


def backup_stopped(data_dir: Path, target: Path) -> int | None:
    """The copy's size; None when a service holds the data dir (it then makes the copy itself,
    online, over the admin protocol). The data dir's lock is held while copying, as ``serve`` does."""
    if not (data_dir / DB_FILE).exists():
        raise StoreError(f"no store in {data_dir} (no {DB_FILE})")
    lock = DataDirLock(data_dir)
    if not lock.try_acquire():
        return None
    try:
        store = Store(data_dir)
        try:
            return store.backup(target)
        finally:
            store.close()
    finally:
        lock.release()


def restore(source: Path, data_dir: Path, *, force: bool = False) -> int:
    """Put a backup in place as the data dir's store; returns the number of devices it holds. The
    data dir's lock (``serve``'s) is held throughout: a running service is never replaced under it,
    whether or not it has an admin socket."""
    if service_running(data_dir):
        raise ServiceUnavailable(f"a service is running on {data_dir}: stop it before restoring")
    lock = DataDirLock(data_dir)
    if not lock.try_acquire():
        raise ServiceUnavailable(f"a service is running on {data_dir}: stop it before restoring")
    try:
        return _restore(source, data_dir, force=force)
    finally:
        lock.release()


def _restore(source: Path, data_dir: Path, *, force: bool) -> int:
    try:
        check = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            ok = check.execute("PRAGMA integrity_check").fetchone()[0]
            devices = check.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        finally:
            check.close()
    except sqlite3.DatabaseError as exc:
        raise ValidationFailed(f"{source} is not a henge backup: {exc}") from exc
    if ok != "ok":
        raise ValidationFailed(f"{source} is damaged: {ok}")
    target = data_dir / DB_FILE
    if target.exists() and not force:
        raise ValidationFailed(f"{data_dir} already holds a store: pass --force to replace it")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = data_dir / f".{DB_FILE}.restore"
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o600)
    for suffix in ("-wal", "-shm"):  # the old store's side files belong to the old store
        (data_dir / (DB_FILE + suffix)).unlink(missing_ok=True)
    os.replace(tmp, target)
    Store(data_dir).close()  # migrates a backup from an older henge forward, now, with a clear error
    return int(devices)
