"""Presence from a broker's own connection events, fenced by the session table's epochs.

Pure: events in, session-table actions out. A broker that reports every connection (NATS's system
events, EMQX's ``$SYS`` client events) tells henge the truth about plain MQTT clients, with no
announcement convention. What it does not guarantee is order across nodes: a takeover's new
connection (on node B) and the old one's end (on node A) may arrive either way round, and a node
lost to kill -9 reports nothing at all. So the tracker keeps the set of live connections per
device, keyed by the broker's own connection id, and holds one invariant:

    a device is online exactly while the broker has at least one live connection for it.

Each connection gets an epoch from the :class:`SessionTable` when it is first heard of; when the
connection of the current epoch ends while another live connection of the device remains (the
order across nodes was reversed), the remaining one becomes current with a new epoch (a takeover,
never an offline); the end of a connection that is not current changes nothing (stale, as in the
embedded broker). A periodic snapshot of every node's connections (:meth:`snapshot`) repairs what
events cannot say: a node that vanished, an event lost while henge was not listening.

The device is the authenticated user name; a connection whose MQTT client id differs is flagged
(``identity_mismatch``): brokers like NATS do not tie the two together.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .ids import is_valid_device_id
from .sessions import Action, Emit, SessionTable

RECENTLY_ENDED = 8192  # ended connections remembered, so a snapshot taken before the end cannot revive them


@dataclass(frozen=True, slots=True)
class BrokerConnection:
    """One connection as the broker reports it."""

    key: str  # the broker's id for this connection (NATS: server id / client id number), unique while it lives
    user: str | None  # who it authenticated as: the device
    client_id: str
    remote: str | None = None
    started: str = ""  # the broker's start time, sortable (RFC 3339): the newest live one wins a tie


@dataclass(frozen=True, slots=True)
class Ended:
    """A connection the broker said is over, until its end is settled."""

    device: str
    epoch: int


@dataclass(slots=True)
class _Live:
    device: str
    epoch: int
    started: str
    remote: str | None
    seq: int  # when we heard of it (the tracker's own clock)


class ConnectionTracker:
    def __init__(self, table: SessionTable, known: Callable[[str], bool] = lambda _: True) -> None:
        self.table = table
        self.known = known  # whether a user name is a device (the admin and unknown users are not)
        self._live: dict[str, _Live] = {}
        self._by_device: dict[str, set[str]] = {}
        self._ended: OrderedDict[str, int] = OrderedDict()  # key -> seq it ended at
        self._seq = 0
        self.mismatches = 0

    def __len__(self) -> int:
        return len(self._live)

    def mark(self) -> int:
        """The tracker's clock now: pass it to :meth:`snapshot` for a snapshot requested after this."""
        self._seq += 1
        return self._seq

    def device_of(self, conn: BrokerConnection) -> str | None:
        user = conn.user
        if user is None or not is_valid_device_id(user) or not self.known(user):
            return None
        return user

    def connected(self, conn: BrokerConnection, now: float) -> list[Action]:
        if conn.key in self._live or conn.key in self._ended:
            return []  # heard before (a snapshot and an event both said so), or already over
        device = self.device_of(conn)
        if device is None:
            return []
        self._seq += 1
        actions: list[Action] = []
        if conn.client_id != device:
            self.mismatches += 1
            actions.append(Emit("identity_mismatch", device, (("client_id", conn.client_id),
                                                              ("remote", conn.remote))))
        result = self.table.connect(device, now, conn.remote, float("inf"))
        self._live[conn.key] = _Live(device, result.epoch, conn.started, conn.remote, self._seq)
        self._by_device.setdefault(device, set()).add(conn.key)
        return actions + list(result.actions)

    def disconnected(self, key: str, now: float, reason: str) -> list[Action]:
        ended = self.end(key)
        return self.settle(ended, now, reason) if ended is not None else []

    def end(self, key: str) -> Ended | None:
        """The broker says connection ``key`` ended: it can no longer be a device's live connection.
        What that does to presence is :meth:`settle`'s, which the caller may defer (a takeover's end
        may arrive before the newer connection's start: settled after a grace, it is stale by then)."""
        self._seq += 1
        self._ended[key] = self._seq
        while len(self._ended) > RECENTLY_ENDED:
            self._ended.popitem(last=False)
        live = self._live.pop(key, None)
        if live is None:
            return None
        keys = self._by_device.get(live.device, set())
        keys.discard(key)
        if not keys:
            self._by_device.pop(live.device, None)
        return Ended(live.device, live.epoch)

    def settle(self, ended: Ended, now: float, reason: str) -> list[Action]:
        if not self.table.is_current(ended.device, ended.epoch):
            return []  # not the current connection: stale
        keys = self._by_device.get(ended.device)
        if keys:  # another connection of this device still lives (events crossed between nodes)
            heir = max((self._live[k] for k in keys), key=lambda live: (live.started, live.seq))
            result = self.table.connect(ended.device, now, heir.remote, float("inf"))
            heir.epoch = result.epoch
            return list(result.actions)
        return list(self.table.disconnect(ended.device, ended.epoch, now, reason))

    def snapshot(self, connections: Iterable[BrokerConnection], since: int, now: float,
                 complete: Callable[[str], bool] = lambda _: True) -> list[Action]:
        """Reconcile with every live connection the broker listed in answer to a request made at
        ``since`` (:meth:`mark`): connections heard of before it and not listed have ended; listed
        ones not heard of have begun (unless they ended since). ``complete(key)`` says whether the
        listing covers the node a connection is on (a node that did not answer is left alone)."""
        listed = {c.key: c for c in connections}
        actions: list[Action] = []
        for key, live in list(self._live.items()):
            if live.seq <= since and key not in listed and complete(key):
                actions += self.disconnected(key, now, "connection_lost")
        for key, conn in listed.items():
            if key not in self._live and self._ended.get(key, 0) <= since:
                self._ended.pop(key, None)
                actions += self.connected(conn, now)
        return actions

    def forget(self, device: str) -> None:
        for key in self._by_device.pop(device, set()):
            self._live.pop(key, None)

    def servers(self) -> set[str]:
        """The nodes (the part of a key before ``/``) that hold live connections."""
        return {key.partition("/")[0] for key in self._live}
