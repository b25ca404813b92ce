"""The roles of the HTTP API's tokens, least first: each can do what the ones before it can.

Plain data with no imports, so the op table, the models, the store and the CLI share one list.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}


def allows(has: str, needed: str) -> bool:
    """Whether a token with role ``has`` may run what needs ``needed``."""
    return RANK.get(has, -1) >= RANK[needed]
