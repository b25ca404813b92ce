"""Secrets and their hashes: ours (SHA-256: secrets are 128-bit random tokens), and the two an
external broker checks: Mosquitto's ``$7$`` and bcrypt (NATS).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

# The column that keeps each kind of broker hash, for devices, admins and claims alike.
BROKER_HASH_COLUMNS = {"mosquitto": "broker_hash", "bcrypt": "bcrypt_hash"}


def hash_secret(secret: str) -> str:
    """Secrets are >= 128-bit random tokens, so a fast hash is enough and keeps connect storms cheap."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mosquitto_hash(secret: str, iterations: int = 101) -> str:
    """Mosquitto's ``$7$`` password hash (PBKDF2-HMAC-SHA512), for an external broker's password file.

    Kept beside our own hash because we never keep the secret itself, and an external broker
    (issue: beyond one gateway) must be able to check the same secret.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def bcrypt_hash(secret: str, rounds: int = 4) -> str:
    """A bcrypt hash, the one form of password NATS checks without keeping the secret (its accounts
    file). Kept beside our own for the same reason as :func:`mosquitto_hash`.

    Cost 4 (the least bcrypt allows), on purpose: the secrets are 144-bit random tokens, which no
    cost factor makes easier or harder to guess, while NATS pays the cost on every CONNECT and henge
    on every device it creates (about 1 ms here; cost 10 would make a 10,000-device import 10 minutes).
    """
    import bcrypt  # only when a secret is made: not on the CLI's start-up path

    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()


def digest_of(text: str) -> bytes:
    """A stored hex digest as bytes; anything else (a corrupt row) matches no secret."""
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    return digest if len(digest) == 32 else b"\xff" * 33


def new_secret() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class Credential:
    """A new secret and every hash henge keeps of it."""

    secret: str
    digest: str  # ours (SHA-256, hex)
    mosquitto: str  # ``$7$``
    bcrypt: str

    @classmethod
    def new(cls) -> Credential:
        """A new secret and its hashes: about 2 ms here, mostly bcrypt and PBKDF2."""
        secret = new_secret()
        return cls(secret, hash_secret(secret), mosquitto_hash(secret), bcrypt_hash(secret))


def make_credentials(devices: list[str]) -> dict[str, Credential]:
    """A new credential for each device; bcrypt and PBKDF2 let go of the GIL, so an import makes
    them off the store's thread, in chunks."""
    return {device: Credential.new() for device in devices}
