"""The whole store: one repository per aggregate, composed over one connection."""

from __future__ import annotations

from .admins import Admins
from .audit import Audit
from .devices import Devices
from .layers import Layers
from .reports import Reports
from .rollouts import Rollouts
from .schemas import Schemas
from .sessions import Sessions
from .tokens import Tokens
from .versions import Versions


class Store(Devices, Versions, Reports, Sessions, Audit, Admins, Layers, Rollouts, Schemas, Tokens):
    """The whole store: every repository over one connection (see the modules of this package)."""
