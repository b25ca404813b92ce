"""The whole store: one repository per aggregate, composed over one connection."""

from __future__ import annotations

from .admins import Admins
from .audit import Audit
from .claims import Claims
from .devices import Devices
from .layers import Layers
from .reported import Reported, ReportedMessage, ReportedOutcome
from .reports import Reports
from .rollouts import Rollouts
from .schemas import Schemas
from .series import Series
from .sessions import Sessions
from .tokens import Tokens
from .versions import Versions


class Store(Devices, Versions, Reports, Reported, Sessions, Audit, Admins, Layers, Rollouts, Schemas, Tokens,
            Claims, Series):
    """The whole store: every repository over one connection (see the modules of this package)."""

    def record_device_words(self, reports: list[tuple[str, int, str, str | None, int | None]],
                            reported: list[ReportedMessage], max_bytes: int,
                            keep: int) -> tuple[list[str], list[ReportedOutcome]]:
        """Reports and reported-state messages that arrived together, in one transaction, the
        reported states first: a device that says "my config is now X" and then "applied v4" is
        never seen between the two (applied v4 with the old file's hash would read as drift)."""
        with self._tx():
            said = self._record_reported(reported, max_bytes, keep)
            return self._record_reports(reports), said
