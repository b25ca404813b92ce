"""Devices: identities, labels, secrets (hashes kept in memory so a CONNECT never waits for the thread).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from ..errors import (
    DuplicateDevice,
    LabelsConflict,
)
from ..ids import labels_tag
from ..models import ConfigVersion, Device, utc_now
from .core import StoreCore, parse_ts, ts
from .credentials import Credential
from .db import IntegrityError


class Devices(StoreCore):
    def add_device(self, device: str, labels: dict[str, str] | None = None, *, actor: str = "library",
                   layered: list[ConfigVersion] | None = None) -> str:
        """A new device and its secret; ``layered`` receives the version its layers give it (stored in
        the same transaction: a layer config a schema refuses refuses the device too)."""
        made = Credential.new()
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO devices (id, secret_hash, labels, created_at, broker_hash, bcrypt_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (device, made.digest, json.dumps(labels or {}, sort_keys=True), ts(utc_now()), made.mosquitto,
                     made.bcrypt),
                )
                self._new_device_sessions([device])
                self._audit(actor, "device.add", device, {"labels": labels or {}})
                if self._layers:
                    rows = self._refresh([device], self._layers, actor=actor, message="a new device gets its layers")
                    if layered is not None:
                        layered.extend(rows)
        except IntegrityError as exc:
            raise DuplicateDevice(f"device {device!r} already exists") from exc
        self._hashes[device] = bytes.fromhex(made.digest)
        return made.secret

    def check_import(self, devices: list[tuple[str, dict[str, str]]], *, update: bool = False) -> list[str]:
        """The ids an import would create; DuplicateDevice (nothing imported) for an id given twice,
        or one that exists without ``update``."""
        seen: set[str] = set()
        for device, _ in devices:
            if device in seen:
                raise DuplicateDevice(f"device {device!r} appears twice; nothing was imported")
            if device in self._hashes and not update:
                raise DuplicateDevice(f"device {device!r} already exists; nothing was imported "
                                      "(--update changes the labels of existing devices)")
            seen.add(device)
        return [d for d, _ in devices if d not in self._hashes]

    def add_devices(self, devices: list[tuple[str, dict[str, str]]], *, actor: str = "library",
                    update: bool = False, layered: list[ConfigVersion] | None = None,
                    made: dict[str, Credential] | None = None) -> dict[str, str]:
        """Create many devices in one transaction: all or nothing. Returns the new devices' secrets.

        With ``update``, devices that exist get the labels given (their secrets are kept); without
        it, one existing id refuses the whole import. ``made``: credentials made beforehand (off
        this thread: ``make_credentials``); a new device without one gets it here.
        """
        self.check_import(devices, update=update)
        new = [(d, labels) for d, labels in devices if d not in self._hashes]
        existing = [(d, labels) for d, labels in devices if d in self._hashes]
        made = made or {}
        credentials = {d: made.get(d) or Credential.new() for d, _ in new}
        now = ts(utc_now())
        with self._tx():
            self._db.executemany(
                "INSERT INTO devices (id, secret_hash, labels, created_at, broker_hash, bcrypt_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(d, credentials[d].digest, json.dumps(labels, sort_keys=True), now, credentials[d].mosquitto,
                  credentials[d].bcrypt) for d, labels in new],
            )
            self._new_device_sessions([d for d, _ in new])
            self._db.executemany("UPDATE devices SET labels = ? WHERE id = ?",
                                 [(json.dumps(labels, sort_keys=True), d) for d, labels in existing])
            self._audit(actor, "device.import", None, {"devices": len(new), "updated": len(existing)})
            if self._layers:
                rows = self._refresh([d for d, _ in devices], self._layers, actor=actor, message="devices imported")
                if layered is not None:
                    layered.extend(rows)
        self._hashes.update({d: bytes.fromhex(c.digest) for d, c in credentials.items()})
        return {d: c.secret for d, c in credentials.items()}

    def set_labels(self, device: str, set_: dict[str, str], remove: list[str], *, actor: str,
                   layered: list[ConfigVersion] | None = None, if_tag: str | None = None) -> dict[str, str]:
        """Set and remove labels of one device; returns its labels afterwards. Its layers are
        re-evaluated in the same transaction (``layered`` receives the new version, if any). With
        ``if_tag`` (``labels_tag`` of the labels the edit began from), LabelsConflict unless they
        are still those."""
        with self._tx():
            row = self._db.execute("SELECT labels FROM devices WHERE id = ?", (device,)).fetchone()
            self._found(row, device)
            current = json.loads(row[0])
            if if_tag is not None and labels_tag(current) != if_tag:
                raise LabelsConflict(device, current=current)
            labels = {k: v for k, v in current.items() if k not in remove}
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
            self._found(cur.rowcount, device)
            self._db.execute("DELETE FROM presence_history WHERE device = ?", (device,))  # a new one inherits none
            self._audit(actor, "device.remove", device, {})
        self._hashes.pop(device, None)

    def rotate_secret(self, device: str, *, actor: str = "library") -> str:
        made = Credential.new()
        with self._tx():
            cur = self._db.execute(
                "UPDATE devices SET secret_hash = ?, broker_hash = ?, bcrypt_hash = ? WHERE id = ?",
                (made.digest, made.mosquitto, made.bcrypt, device),
            )
            self._found(cur.rowcount, device)
            self._audit(actor, "device.rotate_secret", device, {})
        self._hashes[device] = bytes.fromhex(made.digest)
        return made.secret

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
        self._found(row, device)
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
                      batch: int = -1, with_reported: bool = False) -> tuple[list[tuple[Any, ...]], str | None]:
        """What a status row needs from the store, by device id: ``(id, labels, desired version,
        applied version, applied at, rejected version, rejected error, drift, reported at, reported
        document)``, ``batch`` devices after ``after`` (-1: all), filtered by labels; and the last
        id scanned, or None when no device is left. ``drift``: the device's reported
        ``config_sha256`` is not the applied version's; the document is its JSON text, only
        ``with_reported`` (None otherwise). Tuples, not models: 10,000 rows in a few milliseconds
        (an index lookup per version)."""
        where, args = ("d.id = ?", [device]) if device is not None else ("d.id > ?", [after])
        limit = "" if batch == -1 else f" LIMIT {int(batch)}"
        rows = self._db.execute(
            "SELECT d.id, d.labels, COALESCE((SELECT MAX(v.version) FROM config_versions v WHERE v.device = d.id), 0), "
            "r.applied_version, r.applied_at, r.rejected_version, r.rejected_error, "
            "CASE WHEN p.config_sha256 IS NOT NULL AND p.config_sha256 <> (SELECT v.sha256 FROM config_versions v "
            "WHERE v.device = d.id AND v.version = r.applied_version) THEN 1 ELSE 0 END, p.at, "
            f"{'p.document' if with_reported else 'NULL'} "
            "FROM devices d LEFT JOIN device_reports r ON r.device = d.id LEFT JOIN reported p ON p.device = d.id "
            f"WHERE {where} ORDER BY d.id{limit}",
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
        """Ids only (a fleet push's selection), sorted: no version join and no model per device.
        Every device from memory (the index the loop checks credentials against): reading 18,000
        ids from SQLite was most of the time before a fleet push's first delivery (15-30 ms)."""
        if not labels:
            return sorted(self._hashes)
        ids = []
        for device, text in self._db.execute("SELECT id, labels FROM devices ORDER BY id"):
            have = json.loads(text)
            if all(have.get(k) == v for k, v in labels.items()):
                ids.append(device)
        return ids

    @staticmethod
    def _device(row: tuple[Any, ...]) -> Device:
        return Device(
            id=row[0], labels=json.loads(row[1]), created_at=parse_ts(row[2]), desired_version=row[3]
        )

    def labels_of(self, device: str) -> dict[str, str]:
        row = self._db.execute("SELECT labels FROM devices WHERE id = ?", (device,)).fetchone()
        self._found(row, device)
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
