"""Topic names and the topic ACL, derived from one configurable prefix.

Pure functions only: the broker layer asks these questions on every SUBSCRIBE and PUBLISH.
"""

from __future__ import annotations

from dataclasses import dataclass


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic matching, including the rule that wildcards never match ``$`` topics."""
    if topic_filter == topic:
        return True
    if "+" not in topic_filter and "#" not in topic_filter:
        return False
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


Retained = dict[str, tuple[bytes, int]]


def keep_retained(retained: Retained, topic: str, data: bytes, qos: int) -> None:
    """Store a retained message; an empty payload clears the topic [MQTT-3.3.1-10, -11]."""
    if data:
        retained[topic] = (data, qos)
    else:
        retained.pop(topic, None)


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


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
