"""Onboarding by claim: credentials a batch of devices shares, each use creating one device.

A claim's secret is kept as a hash (it is a random token: SHA-256, as device secrets), in memory
too, so a claiming CONNECT never waits for the store's thread. A device's claim is one
transaction: the claim checked (not revoked, not expired, a use left), the nonce never seen (a
replay is refused), the device created with the claim's labels and its layers' first version,
the use counted, the nonce kept, the audit written: all of it or none.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ClaimRefused, DuplicateDevice, UnknownClaim, ValidationFailed
from ..models import ConfigVersion, utc_now
from ..results import ClaimRevoked
from .core import StoreCore, ts
from .credentials import BROKER_HASH_COLUMNS, bcrypt_hash, hash_secret, mosquitto_hash, new_secret
from .db import IntegrityError


@dataclass(slots=True)
class ClaimRecord:
    """What the event loop needs to answer a claiming CONNECT from memory."""

    id: str
    name: str
    digest: bytes
    labels: dict[str, str]
    uses: int
    used: int
    expires_at: float
    revoked: bool
    ca_issuer: tuple[tuple[tuple[str, str], ...], ...] | None = None  # a claim CA's name: its certificates claim

    def refusal(self, now: float) -> ClaimRefused | None:
        if self.revoked:
            return ClaimRefused("revoked", f"claim {self.name} was revoked")
        if now >= self.expires_at:
            return ClaimRefused("expired", f"claim {self.name} expired")
        if self.used >= self.uses:
            return ClaimRefused("used_up", f"claim {self.name} is used up ({self.uses} devices)")
        return None


class Claims(StoreCore):
    _claims: dict[str, ClaimRecord]  # by id, as the loop checks them
    _claim_nonces: dict[str, str]  # every nonce that ever claimed, and its device (a replay is told from memory)

    def reload(self) -> None:
        super().reload()
        self._claims = self._load_claims()
        self._claim_nonces = dict(self._db.execute("SELECT nonce, device FROM claim_uses").fetchall())

    def _load_claims(self) -> dict[str, ClaimRecord]:
        return {row[0]: ClaimRecord(row[0], row[1], bytes.fromhex(row[2]), json.loads(row[3]), row[4], row[5], row[6],
                                    row[7] is not None, _name(row[8]))
                for row in self._db.execute("SELECT id, name, secret_hash, labels, uses, used, expires_at, revoked_at, "
                                            "ca_subject FROM claims")}

    def claim_cas(self) -> list[str]:
        """The PEM of every claim CA of a claim not revoked (the TLS listeners trust them)."""
        return [pem for (pem,) in self._db.execute("SELECT ca_pem FROM claims WHERE ca_pem IS NOT NULL AND "
                                                   "revoked_at IS NULL")]

    def claim_ca_issued(self, issuer: tuple[tuple[tuple[str, str], ...], ...]) -> bool:
        """Whether a certificate with this issuer was signed by a claim CA (memory only: on the loop)."""
        return bool(issuer) and any(c.ca_issuer == issuer for c in self._claims.values())

    def create_claim(self, name: str, labels: dict[str, str], uses: int, expires_at: float, *,
                     actor: str, ca_pem: str | None = None,
                     ca_subject: tuple[tuple[tuple[str, str], ...], ...] | None = None) -> tuple[str, str]:
        """``(id, secret)``: the secret is shown once; only its hash is kept."""
        if uses < 1:
            raise ValidationFailed("a claim needs at least one use")
        if expires_at <= time.time():
            raise ValidationFailed("a claim must expire in the future")
        claim_id = "c-" + secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        digest = hash_secret(secret)
        broker_hashes = (mosquitto_hash(secret), bcrypt_hash(secret))  # for its user behind an external broker
        with self._tx():
            if self._db.execute("SELECT 1 FROM claims WHERE name = ?", (name,)).fetchone():
                raise ValidationFailed(f"a claim named {name!r} exists; pick another name")
            self._db.execute(
                "INSERT INTO claims (id, name, secret_hash, labels, uses, expires_at, created_at, created_by, ca_pem, "
                "ca_subject, broker_hash, bcrypt_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (claim_id, name, digest, json.dumps(labels, sort_keys=True), uses, expires_at, ts(utc_now()), actor,
                 ca_pem, json.dumps(ca_subject) if ca_subject else None, *broker_hashes))
            self._audit(actor, "claim.create", None, {"claim": name, "id": claim_id, "labels": labels, "uses": uses,
                                                      "expires_at": expires_at, "ca": _text(ca_subject)})
        self._claims[claim_id] = ClaimRecord(claim_id, name, bytes.fromhex(digest), labels, uses, 0, expires_at, False,
                                             ca_subject)
        return claim_id, secret

    def list_claims(self) -> list[dict[str, Any]]:
        return [{"id": r[0], "name": r[1], "labels": json.loads(r[2]), "uses": r[3], "used": r[4],
                 "expires_at": r[5], "created_at": r[6], "created_by": r[7], "revoked_at": r[8],
                 "ca": _text(_name(r[9]))}
                for r in self._db.execute("SELECT id, name, labels, uses, used, expires_at, created_at, created_by, "
                                          "revoked_at, ca_subject FROM claims ORDER BY created_at, id")]

    def claim_hashes(self, kind: Literal["mosquitto", "bcrypt"] = "mosquitto") -> dict[str, str]:
        """``{claim id: hash}`` of every claim not revoked, as an external broker checks its secret
        (Mosquitto's ``$7$`` or bcrypt); claims made before henge kept those are not there."""
        column = BROKER_HASH_COLUMNS[kind]
        return dict(self._db.execute(f"SELECT id, {column} FROM claims WHERE revoked_at IS NULL AND {column} IS NOT "
                                     "NULL ORDER BY id"))

    def claim_devices(self, claim: str) -> list[tuple[str, str]]:
        """``(device, at)`` of each device the claim created, oldest first."""
        return [(d, at) for d, at in self._db.execute(
            "SELECT device, at FROM claim_uses WHERE claim = ? ORDER BY at", (claim,))]

    def revoke_claim(self, ref: str, *, actor: str) -> ClaimRevoked:
        """By id or name: it stops working at once (devices it created keep their own identities)."""
        with self._tx():
            row = self._db.execute("SELECT id, name, used, revoked_at FROM claims WHERE id = ? OR name = ?",
                                   (ref, ref)).fetchone()
            if row is None:
                raise UnknownClaim(f"no claim with id or name {ref!r}")
            if row[3] is None:
                self._db.execute("UPDATE claims SET revoked_at = ? WHERE id = ?", (ts(utc_now()), row[0]))
                self._audit(actor, "claim.revoke", None, {"claim": row[1], "id": row[0], "used": row[2]})
        record = self._claims.get(row[0])
        if record is not None:
            record.revoked = True
        return {"id": row[0], "name": row[1], "used": row[2], "revoked": True}

    def check_claim(self, claim: str, secret: str) -> ClaimRecord | None:
        """The claim, if ``secret`` is its secret (constant time; an unknown id costs the same)."""
        record = self._claims.get(claim)
        given = bytes.fromhex(hash_secret(secret))
        if record is None:
            hmac.compare_digest(given, given)
            return None
        return record if hmac.compare_digest(given, record.digest) else None

    def claim_record(self, claim: str) -> ClaimRecord | None:
        """The claim as memory has it (uses counted as they commit), for the loop's checks."""
        return self._claims.get(claim)

    def nonce_used(self, nonce: str) -> str | None:
        """The device this nonce claimed, if it claimed."""
        return self._claim_nonces.get(nonce)

    def reclaim_device(self, nonce: str, device: str, secret: str | None = None, *, keep: bool = False) -> str:
        """A new secret (``secret``, or one made here) for the device ``nonce`` claimed, if it never
        connected as itself: the answer with its first secret may have been lost with the claiming
        connection, and only the holder of the nonce (128 random bits, kept on the device) can ask.
        The secret it has already is answered as is; with ``keep`` (behind an external broker,
        where the nonce is no secret) no other is taken."""
        secret = secret or new_secret()
        digest = hash_secret(secret)
        if hmac.compare_digest(bytes.fromhex(digest), self._hashes.get(device, b"")):
            return secret
        if keep:
            raise ClaimRefused("replay", "this nonce claimed with another secret: use a new nonce")
        with self._tx():
            row = self._db.execute("SELECT u.claim, c.name, d.epoch FROM claim_uses u JOIN claims c ON c.id = u.claim "
                                   "JOIN device_sessions d ON d.device = u.device WHERE u.nonce = ? AND u.device = ?",
                                   (nonce, device)).fetchone()
            if row is None or row[2]:
                raise ClaimRefused("replay", "this nonce claimed before: use a new one")
            self._db.execute("UPDATE devices SET secret_hash = ?, broker_hash = ?, bcrypt_hash = ? WHERE id = ?",
                             (digest, mosquitto_hash(secret), bcrypt_hash(secret), device))
            self._audit(f"claim:{row[1]}", "device.reclaim", device, {"claim": row[1]})
        self._hashes[device] = bytes.fromhex(digest)
        return secret

    def claim_device(self, claim: str, nonce: str, device: str, extra: dict[str, str],
                     layered: list[ConfigVersion], secret: str | None = None) -> tuple[str, dict[str, str]]:
        """``(secret, labels)`` of the device ``claim`` creates for ``nonce`` (with ``secret``, the
        one the device chose, or one made here), in one transaction (``layered`` receives its first
        version from its layers); ClaimRefused otherwise, nothing stored."""
        now = time.time()
        secret = secret or new_secret()
        digest = hash_secret(secret)
        with self._tx():
            row = self._db.execute("SELECT name, labels, uses, used, expires_at, revoked_at FROM claims WHERE id = ?",
                                   (claim,)).fetchone()
            if row is None:
                raise UnknownClaim(f"no claim {claim!r}")
            record = ClaimRecord(claim, row[0], b"", json.loads(row[1]), row[2], row[3], row[4], row[5] is not None)
            refused = record.refusal(now)
            if refused is not None:
                raise refused
            if self._db.execute("SELECT 1 FROM claim_uses WHERE nonce = ?", (nonce,)).fetchone():
                raise ClaimRefused("replay", "this claim request was answered before (a nonce claims once)")
            labels = extra | record.labels  # the claim's labels win over what the device says of itself
            try:
                self._db.execute(
                    "INSERT INTO devices (id, secret_hash, labels, created_at, broker_hash, bcrypt_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (device, digest, json.dumps(labels, sort_keys=True), ts(utc_now()), mosquitto_hash(secret),
                     bcrypt_hash(secret)))
            except IntegrityError as exc:
                raise ClaimRefused("duplicate_device", f"device {device!r} already exists") from exc
            self._new_device_sessions([device])
            self._db.execute("UPDATE claims SET used = used + 1 WHERE id = ?", (claim,))
            self._db.execute("INSERT INTO claim_uses (nonce, claim, device, at) VALUES (?, ?, ?, ?)",
                             (nonce, claim, device, ts(utc_now())))
            self._audit(f"claim:{record.name}", "device.claim", device, {"claim": record.name, "labels": labels})
            if self._layers:
                layered.extend(self._refresh([device], self._layers, actor=f"claim:{record.name}",
                                             message="a claimed device gets its layers"))
        self._hashes[device] = bytes.fromhex(digest)
        self._claim_nonces[nonce] = device
        return secret, labels  # the loop counts the use in memory (ClaimRecord.used), where it counts those in flight


def _name(text: str | None) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """A distinguished name as ssl decodes it, from its JSON."""
    if not text:
        return None
    return tuple(tuple((str(k), str(v)) for k, v in rdn) for rdn in json.loads(text))


def _text(name: tuple[tuple[tuple[str, str], ...], ...] | None) -> str | None:
    """A distinguished name as people read it: ``CN=claim CA, O=factory``."""
    if not name:
        return None
    return ", ".join(f"{ABBREVIATIONS.get(k, k)}={v}" for rdn in name for k, v in rdn)


ABBREVIATIONS = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                 "localityName": "L", "stateOrProvinceName": "ST"}

__all__ = ["ClaimRecord", "Claims", "DuplicateDevice"]
