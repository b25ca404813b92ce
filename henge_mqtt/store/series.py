"""The fleet over time: one point a minute (devices, online, in sync, pending, rejected, drift,
conflicts), kept for a week, so the console can draw the last day and the last week after any
restart.

Bounded by time: a point is one row keyed by its minute (a second sample in the same minute
replaces the first), and every write deletes what is older than the window, so the table holds
at most ``SERIES_KEEP`` minutes (10,080 rows, under a megabyte).
"""

from __future__ import annotations

from .core import StoreCore

SERIES_KEEP = 7 * 24 * 60  # minutes
SERIES_FIELDS = ("devices", "online", "in_sync", "pending", "rejected", "drift", "conflicts")


class Series(StoreCore):
    def record_point(self, minute: int, counts: dict[str, int]) -> None:
        """The fleet's counts at ``minute`` (unix time // 60), and nothing older than the window."""
        values = [int(counts.get(field, 0)) for field in SERIES_FIELDS]
        with self._tx():
            self._db.execute(
                f"INSERT INTO fleet_series (minute, {', '.join(SERIES_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (minute) DO UPDATE SET "
                + ", ".join(f"{field} = excluded.{field}" for field in SERIES_FIELDS), (minute, *values))
            self._db.execute("DELETE FROM fleet_series WHERE minute <= ?", (minute - SERIES_KEEP,))

    def series(self, since: int, step: int) -> list[tuple[int, ...]]:
        """``(minute, devices, online, ...)`` from ``since`` on, one row per ``step`` minutes: the
        averages of its points (rounded), at the step's first minute."""
        averages = ", ".join(f"ROUND(AVG({field}))" for field in SERIES_FIELDS)
        return [tuple(int(v) for v in row) for row in self._db.execute(
            f"SELECT (minute / ?) * ? AS bucket, {averages} FROM fleet_series WHERE minute >= ? "
            "GROUP BY bucket ORDER BY bucket", (step, step, since))]
