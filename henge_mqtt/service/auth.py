"""Who may connect, subscribe and publish: credentials from the store, the topic ACL from Topics.

Runs on the event loop for every CONNECT, SUBSCRIBE and PUBLISH, so it reads only memory: the
store keeps every credential digest in a dict (no thread hop, no query per connect).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HengeError
from ..paths import ADMIN_FILE
from ..ports import PeerCert, Principal, Refusal
from ..settings import Settings
from ..store import Store
from ..topics import CLAIM_USER, Topics

if TYPE_CHECKING:
    from .claims import Onboarding

log = logging.getLogger(__name__)

BAD_CREDENTIALS = Refusal("bad_credentials")
NOT_AUTHORIZED = Refusal("not_authorized")


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def admin_secret(data_dir: Path, name: str, file: str = ADMIN_FILE) -> str:
    """The admin identity's secret from DATA/admin.json (0600), made on first start; ``file``: another
    of henge's own identities at a broker (NATS's events user, DATA/broker-events.json)."""
    path = data_dir / file
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("name") == name:
                return str(saved["secret"])
        except (OSError, ValueError, KeyError) as exc:
            raise HengeError(f"cannot read admin credentials {path}: {exc}") from exc
    secret = secrets.token_urlsafe(24)
    write_private(path, json.dumps({"name": name, "secret": secret}))
    return secret


class Auth:
    def __init__(self, settings: Settings, topics: Topics, store: Store) -> None:
        self.settings = settings
        self.topics = topics
        self.store = store
        self.onboarding: Onboarding | None = None  # claims (docs/onboarding.md), once the service wired it

    def authenticate(
        self, username: str | None, password: str | None, client_id: str, cert: PeerCert | None
    ) -> Principal | Refusal:
        settings = self.settings
        if username and username == settings.admin_name:
            ok = password is not None and self.store.verify_admin(username, password)
            return Principal("admin", username) if ok else BAD_CREDENTIALS
        if username and username.startswith(CLAIM_USER) and self.onboarding is not None:
            return self.onboarding.authenticate(username[len(CLAIM_USER):], password, client_id, cert)
        # A claim CA's certificate is for claiming only: as a device's, it counts as none.
        cert_cn = cert.cn if cert is not None and not self.store.claim_ca_issued(cert.issuer) else None
        device = username or client_id
        if client_id != device or not self.store.has_device(device):
            # Still hash the secret: an unknown id costs the same as a wrong secret.
            self.store.verify_device(device, password or "")
            return NOT_AUTHORIZED
        if cert_cn is not None and cert_cn != device:
            log.info("auth.cert_mismatch device=%s cn=%s", device, cert_cn)
            return NOT_AUTHORIZED  # a device certificate is good for its own identity only
        if settings.tls_client_auth == "required" and cert_cn is None:
            return NOT_AUTHORIZED
        if cert_cn is not None and settings.tls_cert_replaces_password and password is None:
            return Principal("device", device)
        if username is None or password is None:
            return BAD_CREDENTIALS
        return Principal("device", device) if self.store.verify_device(device, password) else BAD_CREDENTIALS

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        if principal.kind == "admin":
            return True
        if principal.kind == "claim":
            return self.topics.claim_response(principal.name) == topic_filter
        return self.topics.device_may_subscribe(principal.name, topic_filter)

    def may_publish(self, principal: Principal, topic: str) -> bool:
        if principal.kind == "admin":
            return True
        if principal.kind == "claim":
            return self.topics.claim_request(principal.name) == topic
        return self.topics.device_may_publish(principal.name, topic)
