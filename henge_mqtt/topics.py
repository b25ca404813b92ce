"""Topic names and the topic ACL, derived from one configurable prefix.

Pure functions only: the service asks these questions on every SUBSCRIBE and PUBLISH (through the
broker's hooks); topic syntax and matching are the server's (``henge_mqtt.server.router``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "henge"

    def config(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/config"

    def report(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/report"

    def presence(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/presence"

    def device_presence(self, device: str) -> str:
        """Where a device announces its own sessions (external-broker mode; see docs/scaling.md)."""
        return f"{self.prefix}/devices/{device}/presence/device"

    def device_root(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}"

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
        return topic == self.report(device) or topic == self.device_presence(device)
