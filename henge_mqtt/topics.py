"""Topic names and the topic ACL, derived from one configurable prefix.

Pure functions only: the service asks these questions on every SUBSCRIBE and PUBLISH (through the
broker's hooks); topic syntax and matching are the server's (``henge_mqtt.server.router``).
"""

from __future__ import annotations

from typing import NamedTuple

# What a device may publish, under its own ``{prefix}/devices/{id}/``: the one list every ACL is
# written from (the embedded broker's check, Mosquitto's ACL file and dynamic-security roles, NATS
# permissions), so a new device topic cannot be allowed in one and refused in another.
DEVICE_PUBLISHES = ("report", "reported", "presence/device")
# The user name a claiming device connects with: CLAIM_USER + the claim's id (never a device id:
# those cannot hold a ':'), its password the claim's secret, its client id a random nonce.
CLAIM_USER = "claim:"


def claim_user(claim: str) -> str:
    """The user name of a claim (behind an external broker too, where it is a user of its own)."""
    return CLAIM_USER + claim

# What a device may read under its own root in an external broker's ACL (the embedded broker lets
# it subscribe to anything under its root: nothing else is ever published there).
DEVICE_READS = ("config", "presence", "presence/device")


class Topics(NamedTuple):
    """A NamedTuple, not a dataclass: ``dataclasses`` (with ``inspect``) was a tenth of the CLI's start."""

    prefix: str = "henge"

    def config(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/config"

    def report(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/report"

    def reported(self, device: str) -> str:
        """Where a device says what it is and runs (its reported state, docs/protocol.md)."""
        return f"{self.prefix}/devices/{device}/reported"

    def presence(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/presence"

    def device_presence(self, device: str) -> str:
        """Where a device announces its own sessions (external-broker mode; see docs/scaling.md)."""
        return f"{self.prefix}/devices/{device}/presence/device"

    def device_root(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}"

    def claim_request(self, nonce: str) -> str:
        """Where a new device asks for its identity (docs/onboarding.md)."""
        return f"{self.prefix}/claim/{nonce}/request"

    def claim_response(self, nonce: str) -> str:
        """Where it gets the answer: only the connection with that nonce may read it."""
        return f"{self.prefix}/claim/{nonce}/response"

    def nonce_of_request(self, topic: str) -> str | None:
        """The nonce of a claim request topic (None: not one)."""
        head, tail = f"{self.prefix}/claim/", "/request"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        nonce = topic[len(head):-len(tail)]
        return nonce if nonce and "/" not in nonce else None

    @property
    def admin_requests(self) -> str:
        return f"{self.prefix}/admin/request"

    def admin_reply(self, client_id: str) -> str:
        return f"{self.prefix}/admin/reply/{client_id}"

    @property
    def events(self) -> str:
        return f"{self.prefix}/admin/events"

    def device_of(self, topic: str) -> tuple[str, str] | None:
        """``(device, leaf)`` for a topic under ``{prefix}/devices/``, else None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        device, sep, leaf = topic[len(head):].partition("/")
        if not sep or not device:
            return None
        return device, leaf

    # ---- ACL -----------------------------------------------------------------------------

    def device_may_subscribe(self, device: str, topic_filter: str) -> bool:
        """A device may subscribe only within its own subtree, and never to presence of others.

        Any filter that begins with the device's own root (no wildcard before it) can only match
        the device's own topics, so it cannot leak another device's messages.
        """
        root = self.device_root(device)
        return topic_filter == root or topic_filter.startswith(root + "/")

    def device_may_publish(self, device: str, topic: str) -> bool:
        root = self.device_root(device)
        return topic.startswith(root + "/") and topic[len(root) + 1:] in DEVICE_PUBLISHES
