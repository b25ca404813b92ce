"""henge's own MQTT server core (3.1.1 and 5.0): codec, connections, routing, sessions, limits, listeners.

No class here derives from amqtt; see docs/sessions.md for why henge owns this layer. The names are
imported on first use, so that a listener process (``python -m henge_mqtt.server.relay_process``),
which needs none of them, stays small.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import EmbeddedBroker, Listener
    from .limits import Limits

__all__ = ["EmbeddedBroker", "Limits", "Listener"]
_WHERE = {"EmbeddedBroker": ".broker", "Listener": ".broker", "Limits": ".limits"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
