"""The one seam between the service and an MQTT broker, whichever broker it is.

The service talks to :class:`BrokerPort` only; the embedded server (``henge_mqtt.server``) and the
client of an external broker (``henge_mqtt.external``) both implement it, the way httpx's
transports implement one interface. In the other direction a broker calls :class:`BrokerHooks`,
which the service implements: the broker never imports the service, and the service never
reaches into a broker's session table or connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .sessions import Action, SessionView


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection authenticated as: a device, the admin identity, or a new device claiming
    its identity with a shared claim credential (``name``: its nonce, the client id)."""

    kind: Literal["device", "admin", "claim"]
    name: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a CONNECT was refused: ``bad_credentials`` (a wrong or missing secret),
    ``not_authorized`` (an unknown device, client id != user name, a certificate for another id, a
    claim that cannot be used) or ``rate_limited`` (claiming too often: retry later); ``text``: the
    5.0 Reason String, when the default would not say it."""

    why: Literal["bad_credentials", "not_authorized", "rate_limited"]
    text: str = ""


@dataclass(frozen=True, slots=True)
class KickResult:
    """What a kick did, as data: external brokers cannot kick, and say so here instead of raising."""

    kicked: bool
    supported: bool = True
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class IdentitySync:
    """What a broker did with identity changes (devices added, removed, given a new secret).

    ``applied``: the broker knows them now (the embedded broker reads the store; Mosquitto's dynamic
    security plugin took the commands). Otherwise ``detail`` says what an operator must do.
    """

    applied: bool
    how: str  # "store", "dynamic-security" or "password-file"
    detail: str = ""


# What an operator does when the broker missed identity changes the store has (said in IdentitySync.detail).
IDENTITY_REPAIR = ("henge device rotate-secret ID puts a device in the broker again (behind Mosquitto, henge "
                   "broker-config mosquitto, with the broker stopped, writes every identity)")


Name = tuple[tuple[tuple[str, str], ...], ...]  # a distinguished name: its RDNs, as ``ssl`` decodes them


def name_of(decoded: Any) -> Name:
    """A name as ``ssl`` decodes it (``getpeercert()``, ``get_ca_certs()``), hashable and comparable."""
    return tuple(tuple((str(k), str(v)) for k, v in rdn) for rdn in decoded)


@dataclass(frozen=True, slots=True)
class PeerCert:
    """A verified TLS client certificate: its subject's CN and its issuer's name, which tells a
    device CA's certificate from a claim CA's."""

    cn: str | None
    issuer: Name = ()


class BrokerHooks(Protocol):
    """What a broker needs from the service."""

    def authenticate(
        self, username: str | None, password: str | None, client_id: str, cert: PeerCert | None
    ) -> Principal | Refusal:
        """``cert``: the verified TLS client certificate, if the connection presented one."""
        ...

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool: ...

    def may_publish(self, principal: Principal, topic: str) -> bool: ...

    def message(self, principal: Principal, topic: str, payload: bytes) -> int:
        """An authorized PUBLISH from a client (the admin protocol and reports listen here).

        Returns a 5.0 reason code: 0 to route it on, 0x99 (payload format invalid) or another
        refusal to drop it and say so in the PUBACK of a 5.0 client.
        """
        ...

    def session_actions(self, actions: Sequence[Action]) -> None:
        """Presence changes, epochs to save and events, in the order the session table made them."""
        ...

    def epochs_durable(self) -> Awaitable[None]:
        """Resolves once every epoch handed out so far is on disk (group commit)."""
        ...


class BrokerPort(Protocol):
    """What the service needs from a broker."""

    async def start(self) -> None: ...

    async def stop(self, *, exiting: bool = False) -> None:
        """``exiting``: the process ends right after; sockets may be left for the kernel to close."""
        ...

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each TCP listener devices use, port 0 resolved."""
        ...

    @property
    def admin_socket(self) -> str | None:
        """Path of the admin Unix socket, if this broker has one."""
        ...

    def publish(self, topic: str, data: bytes, *, qos: int = 1, retain: bool = False, track: bool = False,
                props: dict[int, object] | None = None, for_device: str | None = None) -> list[asyncio.Future[None]]:
        """Publish as the broker. With ``track``, one future per subscriber, done when it acknowledged;
        with ``for_device`` too, only the future of that device's own current connection (none if it
        is not connected and subscribed, or if the broker cannot tell, as an external one cannot).

        ``props``: MQTT 5.0 properties for 5.0 subscribers (e.g. a snapshot's content type).
        """
        ...

    def clear_retained(self, topic: str) -> None: ...

    #: whether ``publish(..., for_device=...)`` can tell a device's own acknowledgement
    observes_deliveries: bool

    def has_subscribers(self, topic: str) -> bool: ...

    async def kick(self, device: str) -> KickResult: ...

    def seed_sessions(self, sessions: list[tuple[str, int, float | None, str | None]]) -> None:
        """``(device, epoch high-water mark, last seen, last remote)`` from the store, at start."""
        ...

    def forget(self, device: str) -> None: ...

    def session(self, device: str, now: float) -> SessionView: ...

    def presence(self, device: str, now: float) -> tuple[str, bool]:
        """``(online|quarantined|offline, in conflict)``: a session's counts without its view."""
        ...

    def online_devices(self) -> list[str]: ...

    def restore_sessions(self, sessions: list[tuple[str, int, list[tuple[str, int]], float | None]]) -> None:
        """Persistent MQTT sessions the store kept ``(device, expiry, [(filter, options)], ended at)``."""
        ...

    def persistent_session(self, device: str, now: float) -> tuple[int, float | None] | None:
        """``(expiry, ends at)`` of the device's persistent session (ends at: None while connected)."""
        ...

    def when_presence_known(self, callback: Callable[[set[str]], None]) -> None:
        """``callback(devices online)`` once the broker knows who is connected (an external broker:
        after it has handed over the retained announcements), before any presence is published."""
        ...

    def clear_conflict(self, device: str) -> bool: ...

    async def sync_identities(self, *, created: dict[str, str] | None = None, changed: dict[str, str] | None = None,
                              removed: list[str] | None = None, claims: dict[str, str] | None = None,
                              claims_removed: list[str] | None = None) -> IdentitySync:
        """Tell the broker about identities the store just changed: ``created`` and ``changed`` map a
        device to its new secret (henge keeps only hashes: this is the one moment it has them),
        ``removed`` lists devices gone (their connections closed); ``claims`` maps a new claim's
        user name to its secret, ``claims_removed`` lists claims revoked (docs/onboarding.md)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counts for metrics and status (connections, subscriptions, retained), read on the loop."""
        ...
