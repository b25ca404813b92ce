"""The session table: which connection is *the* connection of each device.

Pure logic: no I/O, no asyncio, no clock. The broker layer feeds it events with the time they
happened and carries out the actions it returns. Keeping it pure lets a hypothesis state machine
drive it through interleavings no end-to-end test would find.

Rules (docs/sessions.md explains them at length):
- every accepted connection gets an epoch, one higher than any the device had before;
- an accepted connection replaces the current one (takeover), whatever either's flags;
- an event that carries an epoch other than the current one changes nothing (fencing);
- takeovers of a connection that was still alive are counted; too many in a window is an
  identity conflict, which is flagged and, by policy, quarantined;
- a per-device token bucket bounds how fast a device may (re)connect.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

ConflictPolicy = Literal["flag", "quarantine"]
TakeoverWill = Literal["suppress", "publish"]

# Reasons that mean the connection ended without the client saying goodbye: its will goes out.
ABNORMAL_REASONS = frozenset({
    "connection_lost", "keepalive_timeout", "protocol_error", "packet_too_large", "slow_consumer",
    "publish_rate_exceeded", "server_error", "quota_exceeded", "disconnect_with_will",
})


@dataclass(frozen=True, slots=True)
class SessionSettings:
    takeover_will: TakeoverWill = "suppress"
    conflict_policy: ConflictPolicy = "flag"
    conflict_takeovers: int = 4
    conflict_window: float = 60.0
    conflict_clear_after: float = 600.0
    quarantine_initial: float = 30.0
    quarantine_max: float = 3600.0
    connect_burst: float = 20.0
    connect_rate: float = 2.0


# ---- actions the broker layer carries out ---------------------------------------------------
# Named tuples: made for every connect, disconnect and (10,000 at once) shutdown, at a third of a
# frozen dataclass's cost. Equality is a tuple's: PublishWill("d", 1) == SaveEpoch("d", 1), so
# compare types too where two kinds could hold the same fields.


class Close(NamedTuple):
    """Close this connection now; publish its will only if ``publish_will``."""

    device: str
    epoch: int
    reason: str
    publish_will: bool


class PublishWill(NamedTuple):
    device: str
    epoch: int


class PresenceChange(NamedTuple):
    device: str
    online: bool
    epoch: int
    since: float
    reason: str
    remote: str | None


class SaveEpoch(NamedTuple):
    device: str
    epoch: int


class Emit(NamedTuple):
    """A service event: ``takeover``, ``conflict``, ``quarantine``, ``conflict_cleared``, ..."""

    type: str
    device: str
    data: tuple[tuple[str, object], ...] = ()


class SaveSession(NamedTuple):
    """A persistent MQTT session to keep in the store: its expiry, subscriptions, and when its last
    connection ended (wall clock; None while one is attached). Sessions survive a restart."""

    device: str
    expiry: int
    subs: tuple[tuple[str, int], ...]
    ended_at: float | None


class EndSession(NamedTuple):
    """The device's persistent session ended (expired, replaced by a clean one, kicked, removed)."""

    device: str


Action = Close | PublishWill | PresenceChange | SaveEpoch | Emit | SaveSession | EndSession


@dataclass(frozen=True, slots=True)
class ConnectResult:
    accepted: bool
    epoch: int
    actions: tuple[Action, ...]
    refusal: str | None = None


def take_token(full_at: float, now: float, rate: float, burst: float) -> tuple[bool, float]:
    """A token bucket (it starts full with ``burst`` tokens and refills at ``rate`` a second) kept
    as one number, the time it will be full again (GCRA): a float in a slot instead of an object
    per device and per connection. ``full_at`` is 0.0 for a new bucket. Returns whether a token was
    taken and the number to keep. A clock that steps back leaves the bucket at worst empty, never
    in debt."""
    if full_at < now:
        full_at = now
    elif full_at - now > burst / rate:  # the clock stepped back
        full_at = now + burst / rate
    if (full_at - now) * rate > burst - 1:  # fewer than one token left
        return False, full_at
    return True, full_at + 1 / rate


# ---- per-device state ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    epoch: int
    remote: str | None
    keepalive: float
    connected_at: float
    last_heard: float


@dataclass(slots=True)
class DeviceSession:
    device: str
    epoch_hwm: int = 0
    current: _Conn | None = None
    since: float = 0.0
    reason: str = "never_connected"
    remote: str | None = None
    # Created on the first takeover: most devices never have one, and a fleet has many devices.
    takeovers: deque[tuple[float, str | None, str | None]] | None = None
    all_takeovers: deque[float] | None = None
    conflict_since: float | None = None
    conflict_remotes: tuple[str, ...] = ()
    quarantine_until: float = 0.0
    quarantine_count: int = 0
    connects_full_at: float = 0.0  # its connect rate's bucket (``take_token``)

    @property
    def online(self) -> bool:
        return self.current is not None

    @property
    def epoch(self) -> int:
        return self.current.epoch if self.current else self.epoch_hwm


@dataclass(frozen=True, slots=True)
class SessionView:
    """A read-only copy of one device's session, for status and tests."""

    device: str
    online: bool
    epoch: int
    since: float
    reason: str
    remote: str | None
    takeovers_last_hour: int
    conflict: bool
    conflict_remotes: tuple[str, ...]
    quarantined_until: float | None

    @property
    def state(self) -> str:
        """online, quarantined or offline: what status rows and the fleet's counts say."""
        return presence_state(self.online, self.quarantined_until is not None)


def presence_state(online: bool, quarantined: bool) -> str:
    return "online" if online else "quarantined" if quarantined else "offline"


class SessionTable:
    def __init__(self, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()
        self._devices: dict[str, DeviceSession] = {}

    # ---- set-up and queries --------------------------------------------------------------------

    def seed(self, device: str, epoch_hwm: int, last_seen: float | None = None, remote: str | None = None) -> None:
        """Restore a persisted epoch high-water mark (never lowers one already known) and, for a
        device seen before a restart, when and from where: it is offline since then (``server_start``)."""
        entry = self._entry(device)
        entry.epoch_hwm = max(entry.epoch_hwm, epoch_hwm)
        if last_seen and entry.current is None and entry.since <= last_seen:
            entry.since, entry.reason, entry.remote = last_seen, "server_start", remote

    def forget(self, device: str) -> None:
        self._devices.pop(device, None)

    def _entry(self, device: str) -> DeviceSession:
        entry = self._devices.get(device)
        if entry is None:
            entry = self._devices[device] = DeviceSession(device)
        return entry

    def is_current(self, device: str, epoch: int) -> bool:
        entry = self._devices.get(device)
        return entry is not None and entry.current is not None and entry.current.epoch == epoch

    def current_epoch(self, device: str) -> int | None:
        entry = self._devices.get(device)
        return entry.current.epoch if entry and entry.current else None

    def online_devices(self) -> list[str]:
        return [d for d, e in self._devices.items() if e.current is not None]

    def view(self, device: str, now: float) -> SessionView:
        entry = self._devices.get(device) or DeviceSession(device)
        self._expire_takeovers(entry, now)
        hour = sum(1 for t in entry.all_takeovers or () if now - t <= 3600.0)
        return SessionView(
            device=device,
            online=entry.online,
            epoch=entry.epoch,
            since=entry.since,
            reason=entry.reason,
            remote=entry.remote,
            takeovers_last_hour=hour,
            conflict=entry.conflict_since is not None,
            conflict_remotes=entry.conflict_remotes,
            quarantined_until=entry.quarantine_until if entry.quarantine_until > now else None,
        )

    def presence(self, device: str, now: float) -> tuple[str, bool]:
        """``(state, in conflict)`` of :class:`SessionView`, without making one: a fleet summary asks
        for every device (each minute, and for every console overview), and the views of 18,000
        devices held the loop 60-80 ms per batch."""
        entry = self._devices.get(device)
        if entry is None:
            return "offline", False
        return (presence_state(entry.current is not None, entry.quarantine_until > now),
                entry.conflict_since is not None)

    # ---- events ------------------------------------------------------------------------------

    def heard(self, device: str, epoch: int, now: float) -> None:
        """The connection of ``epoch`` sent something at ``now`` (it is alive)."""
        entry = self._devices.get(device)
        if entry and entry.current and entry.current.epoch == epoch:
            entry.current.last_heard = max(entry.current.last_heard, now)

    def connect(self, device: str, now: float, remote: str | None, keepalive: float) -> ConnectResult:
        """An authenticated CONNECT for ``device`` arrived; decide and say what to do."""
        entry = self._entry(device)
        s = self.settings
        if entry.quarantine_until > now:
            return ConnectResult(False, entry.epoch, (), refusal="quarantined")
        if not self._take_token(entry, now):
            return ConnectResult(False, entry.epoch, (Emit("rate_limited", device),), refusal="rate_limited")

        actions: list[Action] = []
        old = entry.current
        if old is not None:
            alive = now - old.last_heard <= old.keepalive
            actions.append(Close(device, old.epoch, "takeover", publish_will=s.takeover_will == "publish"))
            actions.append(
                Emit(
                    "takeover",
                    device,
                    (("old_epoch", old.epoch), ("old_remote", old.remote), ("new_remote", remote),
                     ("old_alive", alive)),
                )
            )
            if entry.all_takeovers is None:
                entry.all_takeovers, entry.takeovers = deque(), deque()
            entry.all_takeovers.append(now)
            if alive:
                assert entry.takeovers is not None
                entry.takeovers.append((now, old.remote, remote))

        entry.epoch_hwm += 1
        epoch = entry.epoch_hwm
        entry.current = _Conn(epoch, remote, keepalive, now, now)
        actions.append(SaveEpoch(device, epoch))
        self._set_presence(entry, actions, online=True, now=now, reason="takeover" if old else "connected",
                           remote=remote)

        self._expire_takeovers(entry, now)
        if entry.takeovers is not None and len(entry.takeovers) >= s.conflict_takeovers:
            remotes = sorted({r for _, a, b in entry.takeovers for r in (a, b) if r})
            if entry.conflict_since is None:
                entry.conflict_since = now
                entry.conflict_remotes = tuple(remotes)
                actions.append(Emit("conflict", device, (("remotes", tuple(remotes)),
                                                         ("takeovers", len(entry.takeovers)))))
            else:
                entry.conflict_remotes = tuple(sorted(set(entry.conflict_remotes) | set(remotes)))
            if s.conflict_policy == "quarantine":
                cooldown = min(s.quarantine_initial * (2 ** entry.quarantine_count), s.quarantine_max)
                entry.quarantine_count += 1
                entry.quarantine_until = now + cooldown
                entry.takeovers.clear()
                entry.current = None  # the new connection is refused: it never becomes current
                self._set_presence(entry, actions, online=False, now=now, reason="quarantined", remote=remote)
                actions.append(Emit("quarantine", device, (("until", entry.quarantine_until),
                                                           ("cooldown", cooldown))))
                return ConnectResult(False, epoch, tuple(actions), refusal="quarantined")
        return ConnectResult(True, epoch, tuple(actions))

    def disconnect(self, device: str, epoch: int, now: float, reason: str) -> tuple[Action, ...]:
        """The connection of ``epoch`` ended for ``reason``; stale epochs change nothing."""
        entry = self._devices.get(device)
        if entry is None or entry.current is None or entry.current.epoch != epoch:
            return ()
        actions: list[Action] = []
        if reason in ABNORMAL_REASONS:
            actions.append(PublishWill(device, epoch))
        entry.current = None
        self._set_presence(entry, actions, online=False, now=now, reason=reason, remote=entry.remote)
        return tuple(actions)

    def kick(self, device: str, now: float) -> tuple[Action, ...]:
        entry = self._devices.get(device)
        if entry is None or entry.current is None:
            return ()
        epoch = entry.current.epoch
        entry.current = None
        actions: list[Action] = [Close(device, epoch, "kicked", publish_will=False)]
        self._set_presence(entry, actions, online=False, now=now, reason="kicked", remote=entry.remote)
        return tuple(actions)

    def clear_conflict(self, device: str) -> tuple[Action, ...]:
        entry = self._devices.get(device)
        if entry is None or (entry.conflict_since is None and entry.quarantine_until == 0.0):
            return ()
        entry.conflict_since = None
        entry.conflict_remotes = ()
        if entry.takeovers is not None:
            entry.takeovers.clear()
        entry.quarantine_until = 0.0
        entry.quarantine_count = 0
        return (Emit("conflict_cleared", device, (("by", "operator"),)),)

    def tick(self, now: float) -> tuple[Action, ...]:
        """Housekeeping: clear conflict flags after a quiet period."""
        actions: list[Action] = []
        quiet = self.settings.conflict_clear_after
        for entry in self._devices.values():
            if entry.conflict_since is None:
                continue
            last = entry.takeovers[-1][0] if entry.takeovers else entry.conflict_since
            if now - last >= quiet and entry.quarantine_until <= now:
                entry.conflict_since = None
                entry.conflict_remotes = ()
                if entry.takeovers is not None:
                    entry.takeovers.clear()
                actions.append(Emit("conflict_cleared", entry.device, (("by", "quiet_period"),)))
        return tuple(actions)

    def shutdown(self, now: float) -> tuple[Action, ...]:
        actions: list[Action] = []
        for entry in self._devices.values():
            if entry.current is not None:
                actions.append(Close(entry.device, entry.current.epoch, "server_shutdown", publish_will=False))
                entry.current = None
                self._set_presence(entry, actions, online=False, now=now, reason="server_shutdown",
                                   remote=entry.remote)
        return tuple(actions)

    # ---- helpers -------------------------------------------------------------------------------

    def _set_presence(
        self, entry: DeviceSession, actions: list[Action], *, online: bool, now: float, reason: str,
        remote: str | None,
    ) -> None:
        entry.since = now
        entry.reason = reason
        entry.remote = remote
        actions.append(PresenceChange(entry.device, online, entry.epoch, now, reason, remote))

    def _take_token(self, entry: DeviceSession, now: float) -> bool:
        taken, entry.connects_full_at = take_token(entry.connects_full_at, now, self.settings.connect_rate,
                                                   self.settings.connect_burst)
        return taken

    def _expire_takeovers(self, entry: DeviceSession, now: float) -> None:
        window = self.settings.conflict_window
        if entry.takeovers is None or entry.all_takeovers is None:
            return
        while entry.takeovers and now - entry.takeovers[0][0] > window:
            entry.takeovers.popleft()
        while entry.all_takeovers and now - entry.all_takeovers[0] > 3600.0:
            entry.all_takeovers.popleft()


class TableViews:
    """The read side of the broker port that both brokers answer from their session table."""

    table: SessionTable

    def seed_sessions(self, sessions: list[tuple[str, int, float | None, str | None]]) -> None:
        for device, epoch, last_seen, remote in sessions:
            self.table.seed(device, epoch, last_seen, remote)

    def session(self, device: str, now: float) -> SessionView:
        return self.table.view(device, now)

    def presence(self, device: str, now: float) -> tuple[str, bool]:
        return self.table.presence(device, now)

    def online_devices(self) -> list[str]:
        return self.table.online_devices()

    def restore_sessions(self, sessions: list[tuple[str, int, list[tuple[str, int]], float | None]]) -> None:
        """Persistent MQTT sessions from the store, at start: a broker that keeps none ignores them."""

    def persistent_session(self, device: str, now: float) -> tuple[int, float | None] | None:
        """``(expiry, ends at: wall clock, None while connected)`` of the device's persistent session."""
        return None

    def when_presence_known(self, callback: Callable[[set[str]], None]) -> None:
        """``callback(devices online)`` once this broker knows who is connected; a broker that just
        started knows at once: nobody."""
        callback(set())
