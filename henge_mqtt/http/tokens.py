"""The first-run token: the console is usable from the first start without a token in any log."""

from __future__ import annotations

from pathlib import Path

from ..service.api import ServiceAPI
from ..service.auth import write_private
from ..service.context import current_actor

TOKEN_FILE = "http-token"


async def first_run_token(service: ServiceAPI) -> Path | None:
    """With no token at all, create an admin token ``first-run`` and write it, mode 0600, to
    ``DATA/http-token``; returns that file while it exists (revoke the token and delete the file
    once real tokens exist)."""
    path = service.settings.data_dir / TOKEN_FILE
    if not service.store.has_tokens():
        current_actor.set("serve")
        created = await service.create_token("first-run", "admin")
        write_private(path, created["token"] + "\n")
    return path if path.exists() else None
