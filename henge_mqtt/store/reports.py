"""What devices report of each version: applied or rejected, with the reason and the connection's epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import VersionReport, utc_now
from .core import StoreCore, parse_ts, ts


@dataclass(frozen=True, slots=True)
class DeviceReports:
    applied_version: int | None = None
    applied_at: str | None = None
    rejected_version: int | None = None
    rejected_error: str | None = None
    rejected_at: str | None = None

    def sync(self, desired: int, drift: bool = False) -> str:
        """in_sync / drift / pending / rejected / unknown, as documented in docs/protocol.md
        (``drift``: the config the device reports having is not the version it applied)."""
        if self.applied_version is None and self.rejected_version is None:
            return "unknown"
        if self.applied_version is not None and self.applied_version >= desired:
            return "drift" if drift else "in_sync"
        if self.rejected_version == desired:
            return "rejected"
        return "pending"


class Reports(StoreCore):
    def record_reports(self, reports: list[tuple[str, int, str, str | None, int | None]]) -> list[str]:
        """Many reports ``(device, version, status, error, epoch)`` in one transaction (a wave's
        devices answer together): per report ``ok``, ``unknown`` (a device removed meanwhile) or
        ``newer`` (a version it was never sent)."""
        with self._tx():
            return self._record_reports(reports)

    def _record_reports(self, reports: list[tuple[str, int, str, str | None, int | None]]) -> list[str]:
        outcomes: list[str] = []
        now = ts(utc_now())
        current: dict[str, int] = {}
        for device, version, status, error, epoch in reports:
            if device not in self._hashes:
                outcomes.append("unknown")
                continue
            if device not in current:
                current[device] = self._current_version(device)
            if version > current[device]:
                outcomes.append("newer")
                continue
            self._store_report(device, version, status, error, now, epoch)
            outcomes.append("ok")
        return outcomes

    def _store_report(self, device: str, version: int, status: str, error: str | None, now: str,
                      epoch: int | None = None) -> None:
        # The version's own report (its latest word on that version), kept as long as the version is.
        self._db.execute(
            "INSERT INTO version_reports (device, version, status, error, at, epoch) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device, version) DO UPDATE SET status = excluded.status, error = excluded.error, "
            "at = excluded.at, epoch = excluded.epoch",
            (device, version, status, (error or "") if status == "rejected" else None, now, epoch))
        # The device's summary: the newest applied and the newest rejected version.
        self._db.execute("INSERT OR IGNORE INTO device_reports (device) VALUES (?)", (device,))
        if status == "applied":
            self._db.execute(
                "UPDATE device_reports SET applied_version = ?, applied_at = ? "
                "WHERE device = ? AND (applied_version IS NULL OR applied_version <= ?)",
                (version, now, device, version),
            )
        else:
            self._db.execute(  # never lowered either: a late rejection of an older version changes nothing
                "UPDATE device_reports SET rejected_version = ?, rejected_error = ?, rejected_at = ? "
                "WHERE device = ? AND (rejected_version IS NULL OR rejected_version <= ?)",
                (version, error or "", now, device, version),
            )

    def record_report(self, device: str, version: int, status: str, error: str | None,
                      epoch: int | None = None) -> None:
        """Record an applied/rejected report; an older version never lowers a newer one, of either kind."""
        with self._tx():
            self._store_report(device, version, status, error, ts(utc_now()), epoch)

    def version_reports(self, device: str) -> dict[int, VersionReport]:
        """Each version's own report (versions with none are absent)."""
        return {v: VersionReport(status=s, error=e, at=parse_ts(at), epoch=ep) for v, s, e, at, ep in self._db.execute(
            "SELECT version, status, error, at, epoch FROM version_reports WHERE device = ?", (device,))}

    def reports(self) -> dict[str, DeviceReports]:
        rows = self._db.execute(
            "SELECT device, applied_version, applied_at, rejected_version, rejected_error, rejected_at "
            "FROM device_reports"
        )
        return {row[0]: DeviceReports(*row[1:]) for row in rows}

    def device_reports(self, device: str) -> DeviceReports:
        row = self._db.execute(
            "SELECT applied_version, applied_at, rejected_version, rejected_error, rejected_at "
            "FROM device_reports WHERE device = ?",
            (device,),
        ).fetchone()
        return DeviceReports(*row) if row else DeviceReports()
