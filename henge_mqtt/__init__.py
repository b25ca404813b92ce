"""henge-mqtt: a config broker for fleets of edge devices.

The library's front door (docs/library.md lists every name; a test checks the list): the service
and its settings, the models its answers are made of, and every error of the tree. Errors are
imported at once (a small module); the rest on first use, so ``import henge_mqtt`` stays light for
the CLI and for device-side users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    AuthenticationFailed,
    ClaimRefused,
    ConfigTooLarge,
    DuplicateDevice,
    DuplicateToken,
    Fenced,
    Forbidden,
    HengeError,
    InvalidConfig,
    InvalidDeviceId,
    InvalidSchema,
    LabelsConflict,
    NotSupported,
    RemoteError,
    RolloutConflict,
    SchemaViolation,
    ServiceUnavailable,
    SettingsError,
    StoreError,
    UnknownClaim,
    UnknownDevice,
    UnknownLayer,
    UnknownRollout,
    UnknownToken,
    UnknownVersion,
    ValidationFailed,
    VersionConflict,
    WaitTimeout,
)

if TYPE_CHECKING:
    from .models import ConfigVersion, Device, Event, Presence, Snapshot, VersionReport
    from .service import HengeService
    from .settings import Settings

__all__ = [
    "AuthenticationFailed", "ClaimRefused", "ConfigTooLarge", "ConfigVersion", "Device", "DuplicateDevice",
    "DuplicateToken", "Event", "Fenced", "Forbidden", "HengeError", "HengeService", "InvalidConfig",
    "InvalidDeviceId", "InvalidSchema", "LabelsConflict", "NotSupported", "Presence", "RemoteError", "RolloutConflict",
    "SchemaViolation", "ServiceUnavailable", "Settings", "SettingsError", "Snapshot", "StoreError", "UnknownClaim",
    "UnknownDevice", "UnknownLayer", "UnknownRollout", "UnknownToken", "UnknownVersion", "ValidationFailed",
    "VersionConflict", "VersionReport", "WaitTimeout",
]
__version__ = "0.1.0"

_LAZY = {"ConfigVersion": "models", "Device": "models", "Event": "models", "Presence": "models",
         "Snapshot": "models", "VersionReport": "models", "Settings": "settings", "HengeService": "service"}


def __getattr__(name: str) -> object:
    # Loaded on first use: `import henge_mqtt` stays light for the CLI and for device-side users.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
