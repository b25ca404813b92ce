"""Server-owned presence: the retained record on ``{prefix}/devices/{id}/presence``.

The session table decides; this turns its :class:`~henge_mqtt.sessions.PresenceChange` actions
into retained messages and events. One payload format, from the :class:`Presence` model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from ..models import Presence, rfc3339
from ..ports import BrokerPort
from ..sessions import PresenceChange
from ..topics import Topics
from .configs import JSON_PROPS
from .events import Events


def iso(ts: float) -> str:
    return rfc3339(datetime.fromtimestamp(ts, UTC))


class PresencePublisher:
    def __init__(self, topics: Topics, broker: BrokerPort, events: Events, known: Callable[[str], bool]) -> None:
        self.topics = topics
        self.broker = broker
        self.events = events
        self.known = known

    def on_change(self, change: PresenceChange) -> None:
        if not self.known(change.device):
            return
        topic = self.topics.presence(change.device)
        if change.reason == "server_shutdown" and not self.broker.has_subscribers(topic):
            return  # retained messages die with the broker: only live subscribers need to hear it
        presence = Presence.model_construct(
            device=change.device, state="online" if change.online else "offline", epoch=change.epoch,
            since=iso(change.since), reason=change.reason, remote=change.remote,
        )
        self.broker.publish(topic, presence.to_payload(), qos=1, retain=True, props=JSON_PROPS)
        if change.online:
            self.events.count("connects")
        if change.reason == "keepalive_timeout":
            self.events.count("keepalive_timeouts")
        self.events.emit("connected" if change.online else "disconnected", change.device,
                         epoch=change.epoch, reason=change.reason, remote=change.remote)

    def server_start(self, sessions: Iterable[tuple[str, int, float | None, str | None]]) -> None:
        """Every known device starts offline: nothing is connected to a broker that just started.
        A device seen before is offline since it was last seen, from where it was last seen."""
        now = time.time()
        for device, epoch, last_seen, remote in sessions:
            presence = Presence.model_construct(device=device, state="offline", epoch=epoch,
                                                since=iso(last_seen or now), reason="server_start",
                                                remote=remote if last_seen else None)
            self.broker.publish(self.topics.presence(device), presence.to_payload(), qos=1, retain=True,
                                props=JSON_PROPS)
