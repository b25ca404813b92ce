"""Every use of the API in the audit trail, bounded: one row per token per minute.

Changes are audited where they happen (the store writes the row in the same transaction, with
actor ``token:NAME``). On top of that every request is counted here, per token and per minute,
and written as one ``http.use`` row (reads, writes, first and last request); refused requests
are counted the same way under the actor ``http`` (``http.refused``). A console polling all day,
or a flood of bad tokens, costs the audit trail one row a minute, not one per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..service.api import ServiceAPI

WINDOW = 60.0


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@dataclass(slots=True)
class _Window:
    start: float
    counts: dict[str, int] = field(default_factory=dict)
    last: float = 0.0


class UseLog:
    def __init__(self, service: ServiceAPI) -> None:
        self.service = service
        self.last_used: dict[str, float] = {}
        self._open: dict[tuple[str, str], _Window] = {}

    async def note(self, actor: str, action: str, kind: str) -> None:
        """Count one request; write the actor's previous minute if it is over."""
        now = time.time()
        if actor.startswith("token:"):
            self.last_used[actor.removeprefix("token:")] = now
        key = (actor, action)
        window = self._open.get(key)
        if window is not None and now - window.start >= WINDOW:
            await self._write(key, window)
            window = None
        if window is None:
            window = self._open[key] = _Window(now)
        window.counts[kind] = window.counts.get(kind, 0) + 1
        window.last = now

    async def flush(self) -> None:
        for key, window in list(self._open.items()):
            await self._write(key, window)

    async def _write(self, key: tuple[str, str], window: _Window) -> None:
        self._open.pop(key, None)
        actor, action = key
        summary: dict[str, Any] = dict(window.counts) | {"from": _iso(window.start), "to": _iso(window.last)}
        await self.service.worker.run(self.service.store.record_audit, actor, action, None, summary)
