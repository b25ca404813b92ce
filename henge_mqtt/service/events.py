"""Service events and counters: logged, published on the events topic, handed to listeners.

Connects and disconnects are the bulk of events in a fleet; they are built only if someone
subscribes or listens, and logged at debug level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ..models import Event, rfc3339, utc_now
from ..ports import BrokerPort
from ..topics import Topics

log = logging.getLogger("henge_mqtt.service")

EventListener = Callable[[Event], None]
ROUTINE_EVENTS = frozenset({"connected", "disconnected", "report", "reported"})


class Events:
    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.broker: BrokerPort | None = None
        self.counters: dict[str, int] = {}
        self._listeners: list[EventListener] = []

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def emit(self, type_: str, device: str | None = None, **data: Any) -> None:
        level = logging.DEBUG if type_ in ROUTINE_EVENTS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "event.%s device=%s %s", type_, device, json.dumps(data, default=str, sort_keys=True))
        broker = self.broker
        wanted = broker is not None and broker.has_subscribers(self.topics.events)
        if not wanted and not self._listeners:
            return
        event = Event(type=type_, at=rfc3339(utc_now()), device=device, data=data)
        if wanted and broker is not None:
            broker.publish(self.topics.events, event.model_dump_json().encode(), qos=0)
        for listener in list(self._listeners):
            listener(event)
