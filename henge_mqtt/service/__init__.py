"""The service: the composer and the parts it wires (auth, presence, events, reports, configs, admin)."""

from __future__ import annotations

from .auth import write_private
from .composer import HengeService
from .context import current_actor

__all__ = ["HengeService", "current_actor", "write_private"]
