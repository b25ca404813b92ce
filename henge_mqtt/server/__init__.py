"""henge's own MQTT server core (3.1.1 and 5.0): codec, connections, routing, sessions, limits, listeners.

No class here derives from amqtt; see docs/sessions.md for why henge owns this layer.
"""

from __future__ import annotations

from .broker import EmbeddedBroker, Listener
from .limits import Limits

__all__ = ["EmbeddedBroker", "Limits", "Listener"]
