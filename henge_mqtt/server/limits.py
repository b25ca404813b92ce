"""Every bound a peer can push against, in one place, and a limiter for the log lines they cause.

A client that misbehaves is cut off, never the others slowed: each resource a connection can make
the server hold (bytes buffered, packets in flight, filters, sockets, log lines) has a number
here, set from ``henge:`` settings (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Limits:
    max_keepalive: float = 300.0
    connect_timeout: float = 10.0
    max_packet: int = 1024 * 1024  # devices; admins get admin_max_packet
    admin_max_packet: int = 64 * 1024 * 1024
    max_device_publish: int = 64 * 1024
    max_inflight: int = 50  # unacknowledged QoS 1 deliveries to one device
    receive_maximum: int = 16  # QoS 2 PUBLISHes from one device awaiting PUBREL
    pubrel_timeout: float = 10.0
    puback_timeout: float = 10.0
    publish_rate: float = 10.0  # PUBLISH/SUBSCRIBE/UNSUBSCRIBE per second per device ...
    publish_burst: float = 50.0  # ... with this burst
    max_filters_per_subscribe: int = 16
    max_subscriptions: int = 64  # filters one device may hold
    max_wildcard_subscriptions: int = 8  # of those, with + or #
    max_connections: int = 10_000
    max_admin_connections: int = 64
    max_write_buffer: int = 4 * 1024 * 1024  # bytes queued to a device that does not read
    tls_client_auth: Literal["off", "optional", "required"] = "off"
    log_lines_per_second: float = 5.0
    session_expiry_max: int = 7 * 86400  # seconds a persistent session outlives its connection, at most
