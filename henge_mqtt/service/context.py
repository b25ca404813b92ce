"""What every part of the service shares without importing the others: who is acting (the audit
trail's actor) and the one format of times and diffs henge shows."""

from __future__ import annotations

import contextvars
import difflib
import json
from datetime import datetime
from typing import Any

from ..models import rfc3339

# Who is acting: the admin identity of the request being served, else the embedding application.
current_actor: contextvars.ContextVar[str] = contextvars.ContextVar("henge_actor", default="library")


def unified_diff(old: Any, new: Any, old_name: str, new_name: str) -> str:
    """Two JSON documents as a unified diff of their indented, key-sorted text (as ``henge diff``)."""
    return "\n".join(difflib.unified_diff(json.dumps(old, indent=2, sort_keys=True).splitlines(),
                                          json.dumps(new, indent=2, sort_keys=True).splitlines(),
                                          fromfile=old_name, tofile=new_name, lineterm=""))


def utc_text(stamp: str | None) -> str | None:
    """The store's ISO time as the one format of every time henge shows: RFC 3339, UTC, ``Z``."""
    return rfc3339(datetime.fromisoformat(stamp)) if stamp else None
