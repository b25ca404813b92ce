"""HTTP API tokens (only their hashes), checked from memory on the loop.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ..errors import (
    DuplicateToken,
    UnknownToken,
    ValidationFailed,
)
from ..models import utc_now
from ..results import TokenInfo, TokenRevoked
from ..roles import ROLES
from .core import StoreCore, ts
from .credentials import hash_secret


class Tokens(StoreCore):
    def create_token(self, name: str, role: str, *, actor: str) -> tuple[str, str]:
        """``(id, token)``: the token is shown once; only its hash is kept."""
        if role not in ROLES:
            raise ValidationFailed(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        token_id = secrets.token_hex(4)
        token = f"henge_{token_id}_{secrets.token_urlsafe(24)}"
        with self._tx():
            if self._db.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise DuplicateToken(f"a token named {name!r} exists; revoke it first or pick another name")
            self._db.execute(
                "INSERT INTO api_tokens (id, name, role, secret_hash, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, name, role, hash_secret(token), ts(utc_now()), actor),
            )
            self._audit(actor, "token.create", None, {"token": name, "role": role})
        self._tokens[token_id] = (bytes.fromhex(hash_secret(token)), role, name)
        return token_id, token

    def list_tokens(self) -> list[TokenInfo]:
        return [
            {"id": r[0], "name": r[1], "role": r[2], "created_at": r[3], "created_by": r[4]}
            for r in self._db.execute("SELECT id, name, role, created_at, created_by FROM api_tokens ORDER BY name")
        ]

    def revoke_token(self, ref: str, *, actor: str) -> TokenRevoked:
        """By id or name; the token stops working at once."""
        with self._tx():
            row = self._db.execute("SELECT id, name, role FROM api_tokens WHERE id = ? OR name = ?",
                                   (ref, ref)).fetchone()
            if row is None:
                raise UnknownToken(f"no token with id or name {ref!r}")
            self._db.execute("DELETE FROM api_tokens WHERE id = ?", (row[0],))
            self._audit(actor, "token.revoke", None, {"token": row[1], "role": row[2]})
        self._tokens.pop(row[0], None)
        return {"id": row[0], "name": row[1], "role": row[2], "revoked": True}

    def verify_token(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of a live token, from memory: safe to call on the event loop."""
        parts = token.split("_")
        if len(parts) < 3 or parts[0] != "henge":
            return None
        entry = self._tokens.get(parts[1])
        if entry is None or not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), entry[0]):
            return None
        return entry[2], entry[1]

    def has_tokens(self) -> bool:
        return bool(self._tokens)
