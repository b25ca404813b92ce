"""A device's MQTT session when it asked to keep one (3.1.1 CleanSession 0, 5.0 Session Expiry > 0).

MQTT §4.1: the session is the subscriptions, the QoS 1 messages sent and not yet acknowledged, the
messages that arrived for it while no connection was attached, and the QoS 2 packet ids the client
sent and has not released. It outlives its connections until it expires (``expiry`` seconds after
the last one ended, at most ``session_expiry_max``), a clean connection replaces it, or an operator
ends it (kick, device removal).

While a connection is attached every delivery goes straight to it; while none is, QoS 1 messages
wait here, in order. A retained message (every config snapshot, every presence record) supersedes
the one queued before it on its topic, as it supersedes it on the broker: a device away for a month
gets one snapshot, not thirty, so what henge itself publishes costs a session one message per topic,
never one per push. Other messages queue as they came (MQTT 3.1.1 §3.1.2.4), at most ``max_queued``
in all, the oldest dropped first. It is the subscriber in the broker's index for as
long as it lives; which connection is attached is decided by the broker under the session table's
epochs, so a displaced connection's own state (its will, its buckets, its futures) never reaches the
new one: only what MQTT says a session holds does.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal, cast

from ..ports import Principal
from .meta import Meta, Sent

if TYPE_CHECKING:
    from .connection import Connection

# The same waiting in the session: its properties may be a Meta, whose expiry counts down meanwhile
Message = tuple[str, bytes, bool, "bytes | Meta | None"]


class Session:
    __slots__ = (
        "conn",
        "device",
        "dropped",
        "ends_at",
        "expiry",
        "in_qos2",
        "kind",
        "max_queued",
        "queued",
        "serial",
        "stored_ended",
        "subs",
        "unacked",
        "wild",
    )

    def __init__(self, device: str, expiry: int, max_queued: int,
                 kind: Literal["device", "admin", "claim"] = "device") -> None:
        self.device = device  # the connection key: a device id, or admin:CLIENT_ID
        self.kind = kind
        self.expiry = expiry  # seconds it outlives its last connection
        self.subs: dict[str, int] = {}  # filter -> options, as a connection keeps them
        self.wild = 0
        self.conn: Connection | None = None
        self.ends_at: float | None = None  # monotonic, while no connection is attached
        # Sent and not acknowledged when the last connection ended: re-sent first, with DUP and
        # their packet ids [MQTT-4.4.0-1], in the order they were sent.
        self.unacked: list[tuple[int, Sent]] | None = None  # (made when needed: most sessions never need it)
        # In order of arrival: a retained message under its topic (the latest supersedes), others by number.
        self.queued: dict[str | int, Message] | None = None
        self.in_qos2: dict[int, float] | None = None  # QoS 2 ids from the client awaiting PUBREL
        self.max_queued = max_queued
        self.dropped = 0
        self.serial = 0
        self.stored_ended = False  # the store's row says its last connection ended (ended_at not NULL)

    @property
    def key(self) -> str:
        return self.device

    @property
    def principal(self) -> Principal:
        return Principal(self.kind, self.device)

    def deliver(self, topic: str, data: bytes, qos: int, retain: bool, track: bool,
                props: bytes | None = None, *, retained: bool = False,
                meta: Meta | None = None) -> asyncio.Future[None] | None:
        """As :meth:`Connection.deliver` while a connection is attached; otherwise QoS 1 waits here
        (``retained``: the latest per topic) and QoS 0 is not kept (a server may drop it for a session
        with no connection)."""
        conn = self.conn
        if conn is not None:
            return conn.deliver(topic, data, qos, retain, track, props)
        if qos:  # with its Meta, if it expires: what is left of its interval is told when it is sent
            self.queue((topic, data, retain, meta if meta is not None else props), latest_only=retained)
        return None

    def queue(self, message: Message, *, latest_only: bool = True) -> None:
        queued = self.queued
        if queued is None:
            queued = self.queued = {}
        key: str | int = message[0]
        if latest_only:
            queued.pop(key, None)  # the newer one supersedes it, and moves to the end
        else:
            self.serial += 1
            key = self.serial
        if len(queued) >= self.max_queued:
            del queued[next(iter(queued))]  # the oldest goes: bounded whatever is published
            self.dropped += 1
        queued[key] = message

    def detach(self, conn: Connection, now: float) -> None:
        """The attached connection ended: keep what it had not got acknowledged, then start the clock."""
        sent, out = conn.sent, conn.out
        self.unacked = [(packet_id, sent[packet_id]) for packet_id in (out or {}) if sent and packet_id in sent] or None
        waiting = conn.v5.queue if conn.v5 is not None else None
        for topic, data, props, retain, _ in waiting or ():  # never sent (the client's Receive Maximum)
            self.queue((topic, data, retain, props), latest_only=False)
        self.in_qos2 = conn.in_qos2
        self.conn = None
        self.ends_at = now + self.expiry

    def resume(self, conn: Connection) -> None:
        """Attach ``conn`` (its CONNACK is on its way): re-send the unacknowledged messages with DUP
        and their packet ids, in order, then what arrived meanwhile."""
        self.conn = conn
        self.ends_at = None
        conn.subs, conn.wild, conn.in_qos2 = self.subs, self.wild, self.in_qos2
        unacked, self.unacked = self.unacked, None
        for packet_id, message in unacked or ():
            conn.resend(packet_id, message)
        queued, self.queued = self.queued, None
        now = time.monotonic()
        waiting = list((queued or {}).items())
        for i, (_, (topic, data, retain, kept)) in enumerate(waiting):
            if self.conn is not conn:  # the connection ended on the way: the rest wait for the next one
                for later_key, later in waiting[i:]:
                    self.queue(later, latest_only=isinstance(later_key, str))
                return
            props = kept.encoded(now) if isinstance(kept, Meta) else kept
            if props is None and isinstance(kept, Meta):
                continue  # its Message Expiry Interval ran out while it waited [MQTT-3.3.2-5]
            conn.deliver(topic, data, 1, retain, False, props)

    def memory_parts(self) -> tuple[int, int, int]:
        """(subscriptions, unacknowledged, queued): what an expired session must have freed."""
        return len(self.subs), len(self.unacked or ()), len(self.queued or ())

    def __repr__(self) -> str:
        return f"Session({self.device!r}, expiry={self.expiry}, attached={self.conn is not None})"


def session_of(conn: Connection) -> Session | None:
    """The session a connection is attached to, as the broker knows it: a connection holds it only
    through the narrow :class:`~.connection.Attached` interface (connection.py imports nothing here)."""
    return cast("Session | None", conn.session)
