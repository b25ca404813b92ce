"""henge-mqtt: a config broker for fleets of edge devices."""

from __future__ import annotations

from .errors import HengeError
from .models import ConfigVersion, Presence, Snapshot
from .settings import Settings

__all__ = ["ConfigVersion", "HengeError", "HengeService", "Presence", "Settings", "Snapshot"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The service pulls in amqtt; keep `import henge_mqtt` light for device-side users.
    if name == "HengeService":
        from .service import HengeService

        return HengeService
    raise AttributeError(name)
