"""Admin identities, the hashes an external broker needs, and online backups.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Literal

from ..models import utc_now
from .core import StoreCore, ts
from .credentials import BROKER_HASH_COLUMNS, bcrypt_hash, hash_secret, mosquitto_hash


class Admins(StoreCore):
    def ensure_admin(self, name: str, secret: str) -> None:
        with self._tx():
            row = self._db.execute("SELECT secret_hash, broker_hash, bcrypt_hash FROM admins WHERE name = ?",
                                   (name,)).fetchone()
            if row is not None and row[0] == hash_secret(secret) and row[1] and row[2]:
                return  # unchanged: keep the broker hashes (their salts) stable across restarts
            self._db.execute(
                "INSERT INTO admins (name, secret_hash, created_at, broker_hash, bcrypt_hash) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET secret_hash = excluded.secret_hash, "
                "broker_hash = excluded.broker_hash, bcrypt_hash = excluded.bcrypt_hash",
                (name, hash_secret(secret), ts(utc_now()), mosquitto_hash(secret), bcrypt_hash(secret)),
            )
        self._admin_hashes[name] = bytes.fromhex(hash_secret(secret))

    def broker_hashes(self, kind: Literal["mosquitto", "bcrypt"] = "mosquitto") -> tuple[dict[str, str], list[str]]:
        """``{username: hash}`` for admins and devices, and devices that have none yet (made before
        henge kept that kind): Mosquitto's ``$7$`` or bcrypt (NATS)."""
        column = BROKER_HASH_COLUMNS[kind]
        found: dict[str, str] = dict(
            self._db.execute(f"SELECT name, {column} FROM admins WHERE {column} IS NOT NULL")
        )
        missing: list[str] = []
        for device, digest in self._db.execute(f"SELECT id, {column} FROM devices ORDER BY id"):
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
            self._db.backup(tmp)
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
