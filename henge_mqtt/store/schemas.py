"""JSON Schema documents per selector, with their history.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import VersionConflict
from ..models import utc_now
from ..results import SchemaVersion
from .core import StoreCore, ts


class Schemas(StoreCore):
    def schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The schemas in force: ``{selector: (version, document)}``."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for selector, version, document in self._db.execute(
                "SELECT s.selector, s.version, s.document FROM schemas s JOIN (SELECT selector, MAX(version) AS m "
                "FROM schemas GROUP BY selector) x ON x.selector = s.selector AND x.m = s.version"):
            if document is not None:
                out[selector] = (version, json.loads(document))
        return out

    def schema_history(self, selector: str) -> list[SchemaVersion]:
        return [
            {"selector": selector, "version": v, "removed": d is None, "created_at": at, "actor": actor,
             "document": json.loads(d) if d is not None else None}
            for v, d, at, actor in self._db.execute(
                "SELECT version, document, created_at, actor FROM schemas WHERE selector = ? ORDER BY version",
                (selector,))
        ]

    def put_schema(self, selector: str, document: dict[str, Any] | None, *, actor: str, forced: bool = False,
                   if_version: int | None = None, name: str = "") -> int:
        """A new version of the schema for ``selector`` (``None``: removed); audited with it. With
        ``if_version``, only if that is its current version (0: none yet): else VersionConflict."""
        with self._tx():
            row = self._db.execute("SELECT MAX(version) FROM schemas WHERE selector = ?", (selector,)).fetchone()
            if if_version is not None and int(row[0] or 0) != if_version:
                raise VersionConflict(name or f"schema {selector}", expected=if_version, current=int(row[0] or 0))
            version = int(row[0] or 0) + 1
            self._db.execute(
                "INSERT INTO schemas (selector, version, document, created_at, actor) VALUES (?, ?, ?, ?, ?)",
                (selector, version, json.dumps(document, sort_keys=True) if document is not None else None,
                 ts(utc_now()), actor))
            action = "schema.remove" if document is None else "schema.set"
            self._audit(actor, action, None, {"schema": selector or "fleet", "version": version}
                        | ({"forced": True} if forced else {}))
        return version
