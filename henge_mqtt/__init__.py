"""henge-mqtt: a config broker for fleets of edge devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import HengeError

if TYPE_CHECKING:
    from .models import ConfigVersion, Presence, Snapshot
    from .service import HengeService
    from .settings import Settings

__all__ = ["ConfigVersion", "HengeError", "HengeService", "Presence", "Settings", "Snapshot"]
__version__ = "0.1.0"

_LAZY = {"ConfigVersion": "models", "Presence": "models", "Snapshot": "models", "Settings": "settings",
         "HengeService": "service"}


def __getattr__(name: str) -> object:
    # Loaded on first use: `import henge_mqtt` stays light for the CLI and for device-side users.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
