"""Session epochs, last-seen times and persistent MQTT sessions, saved by the service's group commit.
"""

from __future__ import annotations

import json
from typing import Any

from .core import StoreCore


class Sessions(StoreCore):
    def epochs(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT device, epoch FROM device_sessions"))

    def sessions(self) -> list[tuple[str, int, float | None, str | None]]:
        """``(device, epoch high-water mark, last seen, last remote)`` for every device."""
        return list(self._db.execute("SELECT device, epoch, last_seen, last_remote FROM device_sessions"))

    def mqtt_sessions(self) -> list[tuple[str, int, list[tuple[str, int]], float | None]]:
        """``(device, expiry, [(filter, options)], ended at)`` of every persistent MQTT session."""
        return [(device, int(expiry), [(str(f), int(o)) for f, o in json.loads(subs)], ended_at)
                for device, expiry, subs, ended_at in
                self._db.execute("SELECT device, expiry, subs, ended_at FROM mqtt_sessions")]

    def save_sessions(self, epochs: dict[str, int], seen: dict[str, tuple[float, str | None, str]],
                      mqtt: dict[str, tuple[int, list[tuple[str, int]], float | None] | None] | None = None,
                      history: list[tuple[str, float, str, str | None, int | None]] | None = None,
                      shutdown: dict[float, list[str]] | None = None) -> None:
        """Epochs (the group commit of a reconnect storm), last-seen records, persistent MQTT
        sessions (None: ended), presence changes ``(device, at, state, reason, epoch)`` and the
        devices the service's shutdown took offline (``{at: [device]}``) in one transaction.

        An epoch high-water mark only goes up, even if saved out of order. A shutdown's devices are
        written set-wise, one statement per time for all of them (10,000 devices: 40 ms, not 105 a
        row at a time): each is offline since then for ``server_shutdown``, from the address it was
        last seen at, on its latest epoch (saved before its connection was acknowledged).
        """
        with self._tx():
            if mqtt:
                self._db.executemany("DELETE FROM mqtt_sessions WHERE device = ?",
                                     [(d,) for d, s in mqtt.items() if s is None or d not in self._hashes])
                self._db.executemany(
                    "INSERT INTO mqtt_sessions (device, expiry, subs, ended_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET expiry = excluded.expiry, subs = excluded.subs, "
                    "ended_at = excluded.ended_at",
                    [(d, s[0], json.dumps(s[1]), s[2]) for d, s in mqtt.items() if s is not None and d in self._hashes])
            kept = [h for h in history or () if h[0] in self._hashes]
            if self.url is None:  # SQLite, in process: a statement a row is cheap
                # In key order: a row's index page is then most likely the one the last row used
                # (10,000 last-seen records in the order devices connected: 80 ms; sorted: 50).
                self._db.executemany(
                    "UPDATE device_sessions SET epoch = MAX(epoch, ?) WHERE device = ?",
                    [(e, d) for d, e in sorted(epochs.items())],
                )
                self._db.executemany(
                    "UPDATE device_sessions SET last_seen = ?, last_remote = ?, last_reason = ? WHERE device = ?",
                    [(at, remote, reason, d) for d, (at, remote, reason) in sorted(seen.items())],
                )
                self._db.executemany("INSERT INTO presence_history (device, at, state, reason, epoch) "
                                     "VALUES (?, ?, ?, ?, ?)", kept)
            else:  # PostgreSQL: 500 rows a statement
                self._in_values("UPDATE device_sessions SET epoch = GREATEST(device_sessions.epoch, v.column2::bigint) "
                                "FROM (VALUES {values}) AS v WHERE device_sessions.device = v.column1", 2,
                                list(epochs.items()))
                self._in_values("UPDATE device_sessions SET last_seen = v.column2::double precision, "
                                "last_remote = v.column3, last_reason = v.column4 "
                                "FROM (VALUES {values}) AS v WHERE device_sessions.device = v.column1", 4,
                                [(d, at, remote, reason) for d, (at, remote, reason) in seen.items()])
                self._in_values("INSERT INTO presence_history (device, at, state, reason, epoch) VALUES {values}", 5,
                                kept)
            for at, devices in (shutdown or {}).items():
                table, ids = self._among(devices)
                among = f"IN (SELECT j.value FROM {table})"
                self._db.execute(f"UPDATE device_sessions SET last_seen = ?, last_reason = 'server_shutdown' "
                                 f"WHERE device {among}",
                                 (at, ids))
                self._db.execute("INSERT INTO presence_history (device, at, state, reason, epoch) SELECT device, ?, "
                                 f"'offline', 'server_shutdown', epoch FROM device_sessions WHERE device {among}",
                                 (at, ids))

    def presence_timeline(self, device: str, since: float) -> tuple[tuple[Any, ...] | None, list[tuple[Any, ...]]]:
        """The device's last presence change before ``since`` (what it was then: None if none is
        kept) and its changes from then on, oldest first: ``(at, state, reason, epoch)``."""
        before = self._db.execute("SELECT at, state, reason, epoch FROM presence_history WHERE device = ? AND at < ? "
                                  "AND state IN ('online', 'offline', 'takeover') ORDER BY at DESC LIMIT 1",
                                  (device, since)).fetchone()
        rows = self._db.execute("SELECT at, state, reason, epoch FROM presence_history WHERE device = ? AND at >= ? "
                                "ORDER BY at", (device, since)).fetchall()
        return (tuple(before) if before else None), [tuple(r) for r in rows]

    def prune_presence(self, before: float) -> int:
        """Forget presence changes older than ``before``; how many."""
        with self._tx():
            return int(self._db.execute("DELETE FROM presence_history WHERE at < ?", (before,)).rowcount or 0)
