"""henge's own MQTT 3.1.1 server core: codec, connections, routing, limits, listeners.

No class here derives from amqtt; see docs/sessions.md for why henge owns this layer.
"""

from __future__ import annotations

from .broker import EmbeddedBroker, Listener
from .limits import Limits

__all__ = ["EmbeddedBroker", "Limits", "Listener"]
