"""The service: the composer and the parts it wires (auth, presence, events, reports, configs, admin)."""

from __future__ import annotations

from .api import current_actor
from .auth import write_private
from .composer import HengeService

__all__ = ["HengeService", "current_actor", "write_private"]
