"""What devices say they are and run: the latest reported document of each, and its recent history.

A device sends a whole document or an RFC 7396 merge patch of the one it sent before; the merge
happens here, inside the transaction that stores it, so two messages of one device can never
both start from the same old document. A message that changes nothing stores only its arrival
time: no history entry, no event (a device that reports every ten seconds costs one row update).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..layering import merge_patch
from ..models import canonical_json, utc_now
from .core import StoreCore, ts


@dataclass(frozen=True, slots=True)
class ReportedMessage:
    """One reported-state message, parsed and checked on the event loop."""

    device: str
    body: dict[str, Any]
    patch: bool  # True: a merge patch of the last document; False: the whole document
    epoch: int | None = None
    digest: bytes = b""  # of the message's bytes: the same bytes again change nothing


@dataclass(frozen=True, slots=True)
class ReportedOutcome:
    """``ok``: stored (``changed``: top-level members that changed, empty when nothing did);
    ``unknown``: the device was removed meanwhile; ``too_large``: the merged document would be
    over ``max_reported_bytes`` (``size``), nothing stored."""

    outcome: str
    seq: int = 0
    changed: tuple[str, ...] = ()
    size: int = 0


def _changed(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k for k in old.keys() | new.keys() if old.get(k, _GONE) != new.get(k, _GONE)))


_GONE = object()


class Reported(StoreCore):
    def _record_reported(self, messages: list[ReportedMessage], max_bytes: int, keep: int) -> list[ReportedOutcome]:
        """Many devices' messages, inside the caller's transaction (``Store.record_device_words``),
        in arrival order (``keep``: documents of history per device, the current one included)."""
        now = ts(utc_now())
        return [self._record_one(message, max_bytes, keep, now) for message in messages]

    def _record_one(self, m: ReportedMessage, max_bytes: int, keep: int, now: str) -> ReportedOutcome:
        if m.device not in self._hashes:
            return ReportedOutcome("unknown")
        row = self._db.execute("SELECT document, seq FROM reported WHERE device = ?", (m.device,)).fetchone()
        old: dict[str, Any] = json.loads(row[0]) if row else {}
        new = merge_patch(old, m.body) if m.patch else m.body
        encoded = canonical_json(new)
        text, size = encoded.decode(), len(encoded)
        if size > max_bytes:
            return ReportedOutcome("too_large", size=size)
        if row is not None and text == row[0]:
            self._db.execute("UPDATE reported SET at = ?, epoch = ? WHERE device = ?", (now, m.epoch, m.device))
            return ReportedOutcome("ok", row[1])
        seq = (row[1] if row else 0) + 1
        sha = new.get("config_sha256")
        self._db.execute(
            "INSERT INTO reported (device, document, config_sha256, seq, changed_at, at, epoch) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET document = excluded.document, "
            "config_sha256 = excluded.config_sha256, seq = excluded.seq, changed_at = excluded.changed_at, "
            "at = excluded.at, epoch = excluded.epoch",
            (m.device, text, sha if isinstance(sha, str) else None, seq, now, now, m.epoch))
        self._db.execute("INSERT INTO reported_history (device, seq, document, at, epoch) VALUES (?, ?, ?, ?, ?)",
                         (m.device, seq, text, now, m.epoch))
        self._db.execute("DELETE FROM reported_history WHERE device = ? AND seq <= ?", (m.device, seq - keep))
        return ReportedOutcome("ok", seq, _changed(old, new))

    def touch_reported(self, arrivals: dict[str, str]) -> None:
        """When unchanged messages arrived, many devices at once (``epoch`` stays that of the last
        message stored: an unchanged one is not worth a look-up of its connection)."""
        with self._tx():
            self._db.executemany("UPDATE reported SET at = ? WHERE device = ?",
                                 [(at, device) for device, at in arrivals.items()])

    def _reported_doc(self, device: str) -> dict[str, Any] | None:
        """The device's latest reported document (None: it never reported), for layers with a where."""
        row = self._db.execute("SELECT document FROM reported WHERE device = ?", (device,)).fetchone()
        return json.loads(row[0]) if row else None

    def reported_of(self, device: str, history: bool = False) -> dict[str, Any]:
        """The device's latest document (``None`` before its first report) with when it arrived and
        when it last changed; with ``history``, its kept documents, newest first."""
        self.require_device(device)
        row = self._db.execute("SELECT document, seq, changed_at, at, epoch FROM reported WHERE device = ?",
                               (device,)).fetchone()
        answer: dict[str, Any] = {
            "device": device, "document": json.loads(row[0]) if row else None, "seq": row[1] if row else 0,
            "changed_at": row[2] if row else None, "at": row[3] if row else None, "epoch": row[4] if row else None,
        }
        if history:
            answer["history"] = [
                {"seq": seq, "at": at, "epoch": epoch, "document": json.loads(doc)}
                for seq, doc, at, epoch in self._db.execute(
                    "SELECT seq, document, at, epoch FROM reported_history WHERE device = ? ORDER BY seq DESC",
                    (device,))]
        return answer
