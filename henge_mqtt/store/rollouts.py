"""Staged rollouts: their waves, the devices of each wave and the outcomes frozen when a wave is decided.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import (
    RolloutConflict,
    UnknownRollout,
)
from ..layering import Layer
from ..models import ConfigVersion, utc_now
from .core import StoreCore, ts


class Rollouts(StoreCore):
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
                (rollout_id, ts(utc_now()), actor, json.dumps(target, sort_keys=True),
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

    def wave_pending(self, rollout_id: str, wave: int) -> list[str]:
        """The wave's devices that have no version of it yet (all of them, unless a service stopped
        part-way through publishing it), by id; none once the wave went out."""
        ro = self.rollout(rollout_id)
        if ro["state"] != "running" or ro["wave"] != wave or ro["wave_published"]:
            return []
        devices = [r[0] for r in self._db.execute(
            "SELECT device FROM rollout_devices WHERE rollout = ? AND wave = ? AND new_version IS NULL ORDER BY device",
            (rollout_id, wave))]
        return [d for d in devices if d in self._hashes]  # a device removed meanwhile is skipped

    def publish_wave(self, rollout_id: str, wave: int, online: set[str], *, now: float,
                     devices: list[str] | None = None, last: bool = True) -> list[ConfigVersion]:
        """The versions of ``devices`` of the wave (None: every one still without one) in one
        transaction; with ``last``, the mark that the wave went out (and its audit) too. A wave is
        streamed in chunks, each its own transaction; a device stores its version of the wave once,
        whatever crashes when: a service that stops part-way publishes the rest when it resumes
        the rollout (a restart republishes every current version anyway)."""
        ro = self.rollout(rollout_id)
        if ro["state"] != "running" or ro["wave"] != wave or ro["wave_published"]:
            return []
        # (the caller's chunk comes from wave_pending, and nothing else gives a wave's devices a version)
        devices = self.wave_pending(rollout_id, wave) if devices is None else [d for d in devices if d in self._hashes]
        note = ro["message"] or f"rollout {rollout_id} wave {wave + 1}"
        with self._tx():
            current = self._current_heads(devices)
            if ro["layer"] is not None:  # a staged layer change: these devices get it now, the layer at the end
                spec = ro["layer"]
                layer, _, _ = self.candidate_layer(spec["name"], spec["content"], selector=spec["labels"],
                                                   priority=spec["priority"])
                candidate = dict(self._layers)
                if layer is None:
                    candidate.pop(spec["name"], None)
                else:
                    candidate[spec["name"]] = Layer(spec["name"], layer.version, layer.selector, layer.priority,
                                                    layer.content, staged_by=rollout_id, where=layer.where)
                rows = self._refresh(devices, candidate, actor=ro["actor"], message=note)  # checks the schemas
            else:
                rows = self._push_many(devices, ro["config"], actor=ro["actor"], message=note, skip_unchanged=False)
                if rows and self.validate_many is not None:  # a schema set since the start: the wave halts
                    labels = self.labels_by_device(devices)
                    self.validate_many([(r.device, labels.get(r.device, {}), r.config) for r in rows])
            self._db.executemany(
                "UPDATE rollout_devices SET prev_version = ?, new_version = ?, online_at_start = ? "
                "WHERE rollout = ? AND device = ?",
                [(current.get(r.device, (0,))[0], r.version, int(r.device in online), rollout_id, r.device)
                 for r in rows])
            if last:
                published = self._db.execute(
                    "SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND wave = ? AND new_version IS NOT NULL",
                    (rollout_id, wave)).fetchone()[0]
                self._audit(ro["actor"], "rollout.wave", None, {"rollout": rollout_id, "wave": wave + 1,
                                                                "devices": int(published)})
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
                                 (ts(utc_now()), rollout_id))
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
                             (final, ts(utc_now()), rollout_id))
            self._audit(ro["actor"], "rollout.reverted", None, {"rollout": rollout_id, "devices": len(rows),
                                                                "kept": len(notes)})
        return rows
