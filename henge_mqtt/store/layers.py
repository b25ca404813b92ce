"""Config layers in force and their history; a layer change re-derives the configs of the devices it changes.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import (
    RolloutConflict,
    SchemaViolation,
    UnknownLayer,
    ValidationFailed,
    VersionConflict,
)
from ..layering import FLEET_LAYER, Layer, applying, explain, merge
from ..models import ConfigVersion, config_sha256, new_version, utc_now
from ..results import Explained, LayerVersion
from ..where import STANDING_ROOTS, WhereError
from ..where import parse as parse_where
from .core import StoreCore, ts
from .db import Rows

# The meta row of a layer change whose devices are still being refreshed, chunk by chunk.
LAYER_CHANGE = "layer_change"


class Layers(StoreCore):
    def _load_layers(self) -> dict[str, Layer]:
        out: dict[str, Layer] = {}
        for name, version, selector, priority, content, message, where in self._db.execute(
                "SELECT l.name, l.version, l.selector, l.priority, l.content, l.message, l.where_expr FROM layers l "
                "JOIN (SELECT name, MAX(version) AS m FROM layers GROUP BY name) x "
                "ON x.name = l.name AND x.m = l.version"):
            if content is not None:
                out[name] = Layer(name, version, json.loads(selector), priority, json.loads(content), message,
                                  where=where or "")
        return out

    def layers(self) -> dict[str, Layer]:
        return dict(self._layers)

    def layers_for(self, labels: dict[str, str], layers: dict[str, Layer] | None = None, *,
                   device: str | None = None) -> list[Layer]:
        """The layers that apply to ``device`` with ``labels``, in merge order: the fleet's, then label
        layers by priority (lowest first) and name. A layer with a ``where`` filter reads the
        device's id and reported state; ``device`` None is a device henge knows nothing of yet."""
        chosen = self._layers if layers is None else layers
        reported = None
        if device is not None and any(layer.reads_reported for layer in chosen.values()):
            reported = self._reported_doc(device)
        return applying(chosen.values(), labels, device or "", reported)

    def layers_by_device(self, devices: list[str], labels: dict[str, dict[str, str]],
                         layers: dict[str, Layer] | None = None) -> dict[str, list[Layer]]:
        """:meth:`layers_for` of many devices. Unless a layer reads what a device is beyond its labels
        (a ``where``), devices with the same labels share one answer: a fleet push or a layer change
        works out the layers once per label set, not once per device."""
        chosen = self._layers if layers is None else layers
        if not chosen:
            return {device: [] for device in devices}
        if any(layer.where for layer in chosen.values()):
            return {device: self.layers_for(labels.get(device, {}), chosen, device=device) for device in devices}
        by_labels: dict[frozenset[tuple[str, str]], list[Layer]] = {}
        out = {}
        for device in devices:
            own = labels.get(device, {})
            key = frozenset(own.items())
            applied = by_labels.get(key)
            if applied is None:
                applied = by_labels[key] = applying(chosen.values(), own, device)
            out[device] = applied
        return out

    @staticmethod
    def merge_layers(applied: list[Layer], own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return merge(applied, own)  # pure: henge_mqtt/layering.py

    def effective(self, labels: dict[str, str], own: dict[str, Any], layers: dict[str, Layer] | None = None, *,
                  device: str | None = None) -> tuple[dict[str, Any], list[str]]:
        """``(config, layers used)``: the layers for ``device`` with ``labels`` merged in order, then ``own``."""
        return self.merge_layers(self.layers_for(labels, layers, device=device), own)

    def _current_heads(self, devices: list[str]) -> dict[str, tuple[int, str]]:
        """``{device: (version, sha256)}`` of the current versions (not their configs: a fleet push
        needs only these to number the next version and skip the unchanged)."""
        return {device: (version, sha) for device, version, sha in self._current(devices, "v.version, v.sha256")}

    def _current(self, devices: list[str], columns: str) -> Rows:
        """``device, columns`` of each device's current version (``v``), in one statement."""
        table, ids = self._among(devices)
        return self._db.execute(
            f"SELECT j.value, {columns} FROM {table} JOIN config_versions v ON v.device = j.value "
            "AND v.version = (SELECT MAX(w.version) FROM config_versions w WHERE w.device = j.value)", (ids,))

    def _current_rows(self, devices: list[str]) -> dict[str, tuple[int, str | None, str, str]]:
        """``{device: (version, own json, config json, sha256)}`` of the current versions."""
        return {device: (version, own, config, sha) for device, version, own, config, sha
                in self._current(devices, "v.version, v.own, v.config, v.sha256")}

    def _refresh(self, devices: list[str], layers: dict[str, Layer], *, actor: str,
                 message: str) -> list[ConfigVersion]:
        """Inside a transaction: a new version for each device whose config under ``layers`` differs
        from its current one (a device without a version gets one if a layer applies to it); every
        new config is checked against the schemas first, all or none."""
        current = self._current_rows(devices)
        labels = self.labels_by_device(devices)
        by_device = self.layers_by_device(devices, labels, layers)
        created = utc_now()
        rows: list[ConfigVersion] = []
        texts: dict[str, str] = {}  # device -> its own layer's JSON, reused as is
        # devices with the same own layer under the same layers: one merge, one row to copy
        merged: dict[tuple[tuple[str, ...], str], tuple[ConfigVersion, bool]] = {}
        for device in devices:
            version, own_text, config_text, sha = current.get(device, (0, None, None, None))
            text = (own_text if own_text is not None else config_text) if version else None
            applied = by_device[device]
            key = (tuple(layer.ref for layer in applied), text or "{}")
            if key not in merged:
                own = json.loads(text) if text is not None else {}
                effective, used = self.merge_layers(applied, own)
                merged[key] = (new_version(device, 0, effective, config_sha256(effective), message=message,
                                           created_at=created, actor=actor, own=own if used else None,
                                           layers=used), bool(used))
            template, layered = merged[key]
            if (not version and not layered) or template.sha256 == sha:
                continue
            if layered:
                texts[device] = text or "{}"
            rows.append(template.renumbered(device, version + 1))
        if rows and self.validate_many is not None:
            self.validate_many([(r.device, labels.get(r.device, {}), r.config) for r in rows])
        self._insert_rows(rows, own_texts=texts)
        return rows

    def begin_layer_change(self, name: str, content: dict[str, Any] | None, *, actor: str, devices: list[str],
                           last: bool = True, message: str = "", selector: dict[str, str] | None = None,
                           priority: int | None = None, where: str | None = None,
                           if_version: int | None = None) -> tuple[int, list[ConfigVersion]]:
        """A new version of layer ``name`` (``content`` None: removed) and, in the same transaction, a
        new version for those of ``devices`` (the first chunk) whose config it changes; unless
        ``last``, the other devices follow in :meth:`continue_layer_change`. With ``if_version``, only
        if that is the layer's current version (0: no version yet), else VersionConflict.

        Until the last chunk commits, the ``meta`` row ``layer_change`` says a change is under way:
        a service that stops (or dies) part-way finishes it when it starts (:meth:`finish_layer_change`),
        so no device keeps a config its layers in force no longer give."""
        staged = self._staging(name)
        if staged:
            raise RolloutConflict(f"layer {name!r} is being rolled out by {staged}; wait for it, or abort it")
        with self._tx():
            if if_version is not None:
                row = self._db.execute("SELECT MAX(version) FROM layers WHERE name = ?", (name,)).fetchone()
                if int(row[0] or 0) != if_version:
                    raise VersionConflict(f"layer {name}", expected=if_version, current=int(row[0] or 0))
            earlier = self._layer_change()
            if earlier is not None:  # one that failed part-way: this change refreshes every device too
                self._audit(earlier["actor"], earlier["action"], None, earlier["summary"] | {
                    "devices": earlier["devices"], "finished_by": f"layer {name}"})
                self._mark_layer_change(None)
            version, rows, candidate = self._set_layer(name, content, actor=actor, message=message,
                                                       selector=selector, priority=priority, where=where,
                                                       devices=devices, last=last)
        self._layers = candidate
        return version, rows

    def continue_layer_change(self, devices: list[str], *, last: bool) -> list[ConfigVersion]:
        """The next chunk of the layer change under way: a new version for those of ``devices`` whose
        config the layers in force change (a device removed meanwhile is skipped, one pushed to
        meanwhile already has it), in one transaction; ``last``: the change is complete (audited)."""
        with self._tx():
            change = self._layer_change()
            if change is None:
                return []
            rows = self._refresh([d for d in devices if d in self._hashes], self._layers, actor=change["actor"],
                                 message=change["message"])
            change["devices"] += len(rows)
            if last:
                self._audit(change["actor"], change["action"], None, change["summary"] | {"devices": change["devices"]})
            self._mark_layer_change(None if last else change)
        return rows

    def finish_layer_change(self) -> tuple[list[ConfigVersion], SchemaViolation | None]:
        """At start: the devices a layer change had not reached when the service stopped part-way,
        refreshed under the layers in force (nothing, without such a change). Its devices were
        checked against the schemas before it began; if a config is refused all the same, nothing
        more is stored, the change is ended (audited with the refusal) and the refusal returned."""
        change = self._layer_change()
        if change is None:
            return [], None
        try:
            return self.continue_layer_change(sorted(self._hashes), last=True), None
        except SchemaViolation as exc:
            with self._tx():
                self._audit(change["actor"], change["action"], None, change["summary"] | {
                    "devices": change["devices"], "refused": str(exc)})
                self._mark_layer_change(None)
            return [], exc

    def _layer_change(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (LAYER_CHANGE,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def _mark_layer_change(self, change: dict[str, Any] | None) -> None:
        """Inside the caller's transaction: the change under way, as it now stands (None: none)."""
        self._db.execute("DELETE FROM meta WHERE key = ?", (LAYER_CHANGE,))
        if change is not None:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (LAYER_CHANGE, json.dumps(change)))

    def candidate_layer(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                        priority: int | None, where: str | None = None) -> tuple[Layer | None, dict[str, str], int]:
        """The layer ``name`` would be after this change (None: removed), its selector and priority;
        ``selector``, ``priority`` and ``where`` None: as they are (``where`` "": none)."""
        if name == FLEET_LAYER and (selector or where):
            raise ValidationFailed("the fleet layer applies to every device: it takes no labels and no where")
        before = self._layers.get(name)
        if content is None and before is None:
            raise UnknownLayer(f"no layer {name!r} is in force")
        if content is not None and name != FLEET_LAYER and selector is None and not where and before is None:
            raise ValidationFailed(f"a new layer needs its labels (--label k=v) or a --where, or use the name "
                                   f"{FLEET_LAYER!r}")
        sel = selector if selector is not None else (before.selector if before else {})
        prio = priority if priority is not None else (before.priority if before else 0)
        chosen = where if where is not None else (before.where if before else "")
        if where:
            try:
                parse_where(where, allowed=STANDING_ROOTS)
            except WhereError as exc:
                raise ValidationFailed(f"where: {exc}") from None
        row = self._db.execute("SELECT MAX(version) FROM layers WHERE name = ?", (name,)).fetchone()
        version = int(row[0] or 0) + 1
        layer = Layer(name, version, sel, prio, content, where=chosen) if content is not None else None
        return layer, sel, prio

    def _set_layer(self, name: str, content: dict[str, Any] | None, *, actor: str, message: str,
                   selector: dict[str, str] | None, priority: int | None, where: str | None = None,
                   devices: list[str] | None = None, last: bool = True,
                   ) -> tuple[int, list[ConfigVersion], dict[str, Layer]]:
        """Inside the caller's transaction; the caller installs the returned layers once it commits.
        ``devices`` None: every device (a rollout completing a staged change); unless ``last``, the
        rest follow (:meth:`begin_layer_change`)."""
        layer, sel, prio = self.candidate_layer(name, content, selector=selector, priority=priority, where=where)
        chosen = layer.where if layer is not None else None
        row = self._db.execute("SELECT MAX(version) FROM layers WHERE name = ?", (name,)).fetchone()
        version = int(row[0] or 0) + 1
        self._db.execute(
            "INSERT INTO layers (name, version, selector, priority, content, message, created_at, actor, where_expr) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, json.dumps(sel, sort_keys=True), prio,
             json.dumps(content, sort_keys=True) if content is not None else None, message, ts(utc_now()), actor,
             chosen or None))
        candidate = dict(self._layers)
        if layer is None:
            candidate.pop(name, None)
        else:
            candidate[name] = Layer(name, version, sel, prio, layer.content, message, where=layer.where)
        note = message or f"layer {name}@{version}"
        rows = self._refresh(sorted(self._hashes) if devices is None else [d for d in devices if d in self._hashes],
                             candidate, actor=actor, message=note)
        summary: dict[str, Any] = {"layer": name, "version": version, "labels": sel, "priority": prio}
        if chosen:
            summary["where"] = chosen
        action = "layer.remove" if content is None else "layer.set"
        if last:
            self._audit(actor, action, None, summary | {"devices": len(rows)})
        else:
            self._mark_layer_change({"actor": actor, "message": note, "action": action, "summary": summary,
                                     "devices": len(rows)})
        return version, rows, candidate

    def layers_read_reported(self) -> bool:
        """Whether a layer in force has a where over reported state (memory only: safe on the loop)."""
        return any(layer.reads_reported for layer in self._layers.values())

    def refresh_for_reported(self, devices: list[str]) -> tuple[list[ConfigVersion], list[tuple[str, str]]]:
        """After their reported states changed: a new version for each of ``devices`` whose layers
        (those with a ``where`` over ``reported``) now give another config, each in its own
        transaction; a device whose new config a schema refuses keeps its version, and is named
        with the reason (the report itself was stored: it says what the device is)."""
        if not self.layers_read_reported():
            return [], []
        rows: list[ConfigVersion] = []
        refused: list[tuple[str, str]] = []
        for device in devices:
            if device not in self._hashes:
                continue
            try:
                with self._tx():
                    rows += self._refresh([device], self._layers, actor="henge", message="reported state changed")
            except SchemaViolation as exc:
                refused.append((device, str(exc)))
        return rows, refused

    def _staging(self, name: str) -> str | None:
        """The active rollout staging a change of layer ``name``, if any."""
        for rid, layer in self._db.execute("SELECT id, layer FROM rollouts WHERE layer IS NOT NULL AND state IN "
                                           "('running', 'paused', 'reverting')"):
            if json.loads(layer)["name"] == name:
                return str(rid)
        return None

    def layer_change_targets(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                             priority: int | None, where: str | None = None) -> list[str]:
        """The devices whose config a layer change would alter (a staged layer change's targets)."""
        return [device for device, _, _, _ in self.layer_change_plan(name, content, selector=selector,
                                                                     priority=priority, where=where)]

    def layer_change_plan(self, name: str, content: dict[str, Any] | None, *, selector: dict[str, str] | None,
                          priority: int | None, where: str | None = None
                          ) -> list[tuple[str, int, dict[str, Any] | None, dict[str, Any]]]:
        """``(device, current version, current config, config after)`` of each device whose config
        a layer change would alter, by id; stored nowhere."""
        layer, _, _ = self.candidate_layer(name, content, selector=selector, priority=priority, where=where)
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
            effective, used = self.effective(labels.get(device, {}), own, candidate, device=device)
            if (version or used) and config_sha256(effective) != sha:
                out.append((device, version, json.loads(config_text) if config_text is not None else None, effective))
        return out

    def layer_history(self, name: str) -> list[LayerVersion]:
        rows = self._db.execute(
            "SELECT version, selector, priority, content, message, created_at, actor, where_expr FROM layers "
            "WHERE name = ? ORDER BY version", (name,)).fetchall()
        if not rows:
            raise UnknownLayer(f"no layer {name!r}")
        return [{"layer": name, "version": v, "labels": json.loads(sel), "priority": prio,
                 "content": json.loads(c) if c is not None else None, "removed": c is None, "message": msg,
                 "created_at": at, "actor": actor, "where": where or None}
                for v, sel, prio, c, msg, at, actor, where in rows]

    def explain(self, device: str, version: int | None = None) -> list[Explained]:
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
        leaves: list[Explained] = []

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
