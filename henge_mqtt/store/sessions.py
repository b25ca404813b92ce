"""Session epochs, last-seen times and persistent MQTT sessions, saved by the service's group commit.
"""

from __future__ import annotations

import json

from .core import StoreCore


class Sessions(StoreCore):
    def epochs(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT id, epoch FROM devices"))

    def sessions(self) -> list[tuple[str, int, float | None, str | None]]:
        """``(device, epoch high-water mark, last seen, last remote)`` for every device."""
        return list(self._db.execute("SELECT id, epoch, last_seen, last_remote FROM devices"))

    def mqtt_sessions(self) -> list[tuple[str, int, list[tuple[str, int]], float | None]]:
        """``(device, expiry, [(filter, options)], ended at)`` of every persistent MQTT session."""
        return [(device, int(expiry), [(str(f), int(o)) for f, o in json.loads(subs)], ended_at)
                for device, expiry, subs, ended_at in
                self._db.execute("SELECT device, expiry, subs, ended_at FROM mqtt_sessions")]

    def save_sessions(self, epochs: dict[str, int], seen: dict[str, tuple[float, str | None, str]],
                      mqtt: dict[str, tuple[int, list[tuple[str, int]], float | None] | None] | None = None,
                      ) -> None:
        """Epochs (the group commit of a reconnect storm), last-seen records and persistent MQTT
        sessions (None: ended) in one transaction.

        An epoch high-water mark only goes up, even if saved out of order.
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
            self._db.executemany(
                "UPDATE devices SET epoch = MAX(epoch, ?) WHERE id = ?", [(e, d) for d, e in epochs.items()]
            )
            self._db.executemany(
                "UPDATE devices SET last_seen = ?, last_remote = ?, last_reason = ? WHERE id = ?",
                [(at, remote, reason, d) for d, (at, remote, reason) in seen.items()],
            )
