"""Config versions: pushes (one, many, if changed), history, rollback; a version is never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ..errors import (
    UnknownVersion,
    ValidationFailed,
)
from ..layering import merge_patch
from ..models import ConfigVersion, config_sha256, new_version, utc_now
from .core import StoreCore, parse_ts, ts
from .schema import VERSION_COLUMNS


def _rows(templates: dict[str, ConfigVersion], versions: dict[str, int]) -> list[ConfigVersion]:
    """Each device's new version: a copy of its template with its id and number filled in."""
    return [templates[device].renumbered(device, version) for device, version in versions.items()]


class Versions(StoreCore):
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
            self.require_device(device)
            current = self._expect_version(device, if_version)
            now = self.get_version(device, current) if current else None
            if patch is not None:  # a patch of the device's own layer
                config = merge_patch(now.device_layer if now else {}, patch)
                if not isinstance(config, dict):
                    raise ValidationFailed("the patch must leave a JSON object; nothing was stored")
            assert config is not None
            effective, _ = self.effective(self.labels_of(device), config, device=device)
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
        """Inside the caller's transaction: the devices under the same layers get their versions in
        one ``INSERT ... SELECT`` over a JSON object of device -> version (10,000 rows are not bound
        one by one through ``executemany``)."""
        templates = self._templates(devices, config, actor=actor, message=message)
        versions = self._next_versions(devices, templates, skip_unchanged=skip_unchanged)
        groups: dict[int, dict[str, int]] = {}
        for device, version in versions.items():
            groups.setdefault(id(templates[device]), {})[device] = version
        for members in groups.values():
            r = templates[next(iter(members))]
            table, pairs = self._keyed(members)
            self._db.execute(
                "INSERT INTO config_versions (device, version, config, sha256, message, created_at, actor, own, "
                f"layers) SELECT j.key, CAST(j.value AS INTEGER), ?, ?, ?, ?, ?, ?, ? FROM {table}",
                (json.dumps(r.config, ensure_ascii=False), r.sha256, message, ts(r.created_at), actor,
                 None if r.own is None else json.dumps(r.own, ensure_ascii=False), json.dumps(r.layers), pairs))
        return _rows(templates, versions)

    def plan_push_many(self, devices: list[str], config: dict[str, Any]) -> list[ConfigVersion]:
        """The versions ``push_many`` would store now (the devices whose config would change), stored
        nowhere: a fleet push's preview."""
        templates = self._templates(devices, config, actor="", message="")
        return _rows(templates, self._next_versions(devices, templates, skip_unchanged=True))

    def _next_versions(self, devices: list[str], templates: dict[str, ConfigVersion], *,
                       skip_unchanged: bool) -> dict[str, int]:
        """Each device's next version number, in ``devices``' order; with ``skip_unchanged``, none
        for a device whose current version is its template's content."""
        current = self._current_heads(devices)
        out = {}
        for device in devices:
            version, sha = current.get(device, (0, None))
            if not (skip_unchanged and sha == templates[device].sha256):
                out[device] = version + 1
        return out

    def _templates(self, devices: list[str], config: dict[str, Any], *, actor: str,
                   message: str) -> dict[str, ConfigVersion]:
        """Each device's next version with ``config`` as its device layer, as a row shared by the
        devices under the same layers (one merge each; its device and version still to fill in)."""
        for device in devices:
            self.require_device(device)
        created = utc_now()
        plain = config_sha256(config)
        merged: dict[tuple[str, ...], ConfigVersion] = {}
        by_device = self.layers_by_device(devices, self.labels_by_device(devices) if self._layers else {})
        out = {}
        for device in devices:
            applied = by_device[device]
            key = tuple(layer.ref for layer in applied)
            template = merged.get(key)
            if template is None:
                effective, used = self.merge_layers(applied, config)
                template = merged[key] = new_version(
                    device, 0, effective, config_sha256(effective) if used else plain, message=message,
                    created_at=created, actor=actor, own=config if used else None, layers=used)
            out[device] = template
        return out

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
        self.require_device(device)
        current = self._expect_version(device, if_version)
        config, used = self.effective(self.labels_of(device), own, device=device)
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
        stamps: dict[datetime, str] = {}  # a fleet push's rows share one time
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
            stamp = stamps.get(r.created_at)
            if stamp is None:
                stamp = stamps[r.created_at] = ts(r.created_at)
            values.append((r.device, r.version, text, r.sha256, r.message, stamp, r.actor, own, layers))
        self._db.executemany(
            "INSERT INTO config_versions (device, version, config, sha256, message, created_at, actor, own, layers) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

    def _current_version(self, device: str) -> int:
        row = self._db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM config_versions WHERE device = ?", (device,)
        ).fetchone()
        return int(row[0])

    def get_version(self, device: str, version: int | None = None) -> ConfigVersion:
        self.require_device(device)
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
        self.require_device(device)
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
            created_at=parse_ts(row[5]),
            actor=row[6],
            own=json.loads(row[7]) if row[7] is not None else None,
            layers=json.loads(row[8]),
        )

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
