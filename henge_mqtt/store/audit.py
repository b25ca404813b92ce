"""The audit trail: who did what, when (secrets never appear).
"""

from __future__ import annotations

import json
from typing import Any

from ..results import AuditEntry
from .core import StoreCore


class Audit(StoreCore):
    def record_audit(self, actor: str, action: str, device: str | None, summary: dict[str, Any]) -> None:
        with self._tx():
            self._audit(actor, action, device, summary)

    def audit(self, device: str | None = None, limit: int = 100) -> list[AuditEntry]:
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
        entries: list[AuditEntry] = [
            {"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "device": r[4], "summary": json.loads(r[5])}
            for r in rows
        ]
        return entries[::-1]
