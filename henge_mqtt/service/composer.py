"""The composer: wires the store, a broker (behind :class:`~henge_mqtt.ports.BrokerPort`) and the
service's parts, and answers the broker's hooks. ``async with HengeService(settings)`` runs it;
its library API (the operations) is :class:`~henge_mqtt.service.api.ServiceAPI`.

It holds no logic of its own beyond ordering: what happens when the service starts and stops, and
who is called when a device connects or publishes. Auth, presence, events, reports, configs, the
library API and the admin protocol each have a module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..datadir import DataDirLock
from ..errors import ServiceUnavailable
from ..models import Event
from ..paths import ADMIN_SOCKET, SERVICE_FILE
from ..ports import BrokerPort, PeerCert, Principal, Refusal
from ..sessions import Action, Emit, EndSession, PresenceChange, SaveEpoch, SaveSession, SessionSettings
from ..settings import Settings
from ..store import DatabaseError, Store, StoreWorker
from ..tasks import TaskSet
from ..topics import Topics
from .admin import handle as handle_admin
from .api import ServiceAPI
from .auth import Auth, admin_secret, write_private
from .claims import Onboarding, ca_subject, trust_claim_ca
from .configs import Configs
from .context import current_actor
from .events import EventListener, Events
from .presence import PresencePublisher, iso
from .reports import Reports
from .rollouts import Rollouts
from .schemas import Schemas

if TYPE_CHECKING:
    from ..store.pg import Lease

log = logging.getLogger("henge_mqtt.service")

LEASE_TTL = 3.0  # seconds: a standby takes over at most this long after the active one stops renewing
FD_RESERVE = 64  # descriptors kept for the store, logs, the admin socket and the CLI
HISTORY_KEEP = 7 * 86400.0  # seconds of presence history kept (the console's timeline band: 24 h and 7 days)
HISTORY_PENDING = 200_000  # presence changes one group commit carries at most (a storm's excess is counted)


def default_max_connections(limit: int | None = None) -> int:
    """Device sockets one process may hold: its open-file limit (``limit``, or this process's) minus a
    reserve."""
    if limit is None:
        limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, limit - max(FD_RESERVE, limit // 20))


class HengeService(ServiceAPI):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.events = Events(self.topics)
        self.presence_known = asyncio.Event()
        self.admin_secret = ""
        self._worker: StoreWorker | None = None
        self._broker: BrokerPort | None = None
        self._auth: Auth | None = None
        self._tasks = TaskSet(log, "service.task_failed")
        self._pending_epochs: dict[str, int] = {}
        self._pending_seen: dict[str, tuple[float, str | None, str]] = {}  # last seen, for after a restart
        # Presence changes for the timeline (device, at, state, reason, epoch), in the same group commit.
        self._pending_history: list[tuple[str, float, str, str | None, int | None]] = []
        # Devices that went offline as this service stopped, by the time they did: written as one
        # statement per time, not a row per device (store.save_sessions), in the same group commit.
        self._pending_shutdown: dict[float, list[str]] = {}
        self._stopping = False
        # Persistent MQTT sessions to keep (None: ended), in the same group commit.
        self._pending_mqtt: dict[str, tuple[int, list[tuple[str, int]], float | None] | None] = {}
        self._epochs_saved: asyncio.Future[None] | None = None
        self._flushing = False
        self._inflight: asyncio.Future[None] | None = None  # the group commit being written
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.fenced = asyncio.Event()  # set when another instance took the PostgreSQL store's lease
        self._lease: Lease | None = None
        self._claim_tls: list[ssl.SSLContext] = []  # TLS listeners asking for client certificates: claim CAs join
        self._listener_trust: Callable[[str], None] | None = None  # ... and the listener processes' copies of them

    # ---- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> HengeService:
        if self._broker is None:  # `henge serve` starts it first (a standby waits there)
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        self._stopping = False
        self._lock = DataDirLock(s.data_dir)
        self._lock.acquire()  # before the store: a second service on this data dir touches nothing
        try:
            store = Store(s.data_dir, synchronous=s.store_synchronous, url=s.store)
        except BaseException:
            self._lock.release()
            raise
        self._worker = StoreWorker(store)
        try:
            if store.url is not None:  # several instances may share this store: one writes at a time
                from ..store.pg import Lease

                self._lease = await asyncio.to_thread(Lease, store.url)
                self._write_standby_file()
                store.fence = (self._holder, await self._take_lease(self._lease))
                await self.worker.run(store.reload)  # what the last active instance wrote meanwhile
                self._tasks.spawn(self._keep_lease(self._lease, store.fence))
            self.admin_secret = admin_secret(s.data_dir, s.admin_name)
            await self.worker.run(store.ensure_admin, s.admin_name, self.admin_secret)
            self._auth = Auth(s, self.topics, store)
            self._broker = broker = self._make_broker()
            self.events.broker = broker
            self.presence = PresencePublisher(self.topics, broker, self.events, store.has_device)
            self.reports = Reports(self.worker, self.events, s.max_report_bytes,
                                   lambda d: broker.session(d, time.time()).online, self._tasks.spawn,
                                   max_reported_bytes=s.max_reported_bytes, reported_history=s.reported_history)
            self.schemas = Schemas(store)
            await self.worker.run(self.schemas.load)
            store.validate = self.schemas.check  # inside every transaction that stores a version
            store.validate_many = self.schemas.check_each
            finished, refused = await self.worker.run(store.finish_layer_change)  # one stopped part-way
            if finished or refused:
                log.warning("service.layer_change_finished devices=%d refused=%s", len(finished), refused or "")
            self.configs = Configs(self.worker, broker, self.topics, self.events, s.max_config_bytes, self.schemas)
            self.reports.on_reported_changed = self.configs.refresh_for_reported
            self.onboarding = Onboarding(
                self.worker, broker, self.topics, self.events, rate=s.claim_rate, burst=s.claim_burst,
                spawn=self._tasks.spawn, check_id=lambda device: self._check_new_id(device, ""),
                external=bool(s.external_broker), tell_broker=self._tell_broker_claimed,
                publish_rows=lambda rows: self.configs.publish_rows(rows, event="layer_applied",
                                                                    reason="a claimed device gets its layers"))
            self._auth.onboarding = self.onboarding
            for pem in await self.worker.run(store.claim_cas):  # devices with their certificates may claim
                trust_claim_ca(self._claim_tls, pem, ca_subject(pem), new=False)
            sessions = await self.worker.run(store.sessions)
            broker.seed_sessions(sessions)
            broker.restore_sessions(await self.worker.run(store.mqtt_sessions))  # before the republish: queued
            count = await self.configs.republish_all()
            # Every device not connected now is offline since it was last seen; behind an external broker
            # that is known only once its retained announcements are read (a failover flips nobody).
            def known(online: set[str]) -> None:
                self.presence.server_start(s for s in sessions if s[0] not in online)
                self.presence_known.set()

            broker.when_presence_known(known)
            log.info("service.republished snapshots=%d", count)
            await broker.start()
            self.rollouts = Rollouts(self)
            await self.rollouts.resume_all()  # a rollout goes on where it stood when the service stopped
            self._tasks.spawn(self._each_minute())
        except BaseException:
            if self._lease is not None:  # a standby stopped while it waited, or a start that failed
                self._lease.close()
                self._lease = None
                with contextlib.suppress(OSError):
                    (s.data_dir / SERVICE_FILE).unlink()
            self.worker.close()
            self._worker = self._broker = None
            self._lock.release()
            raise
        host, port = self.address
        write_private(s.data_dir / SERVICE_FILE, json.dumps({
            "host": host, "port": port, "topic_prefix": s.topic_prefix, "admin_name": s.admin_name,
            "pid": os.getpid(), "admin_socket": self.broker.admin_socket,
        }))
        self._lock.record(f"mqtt://{host}:{port}")
        log.info("service.started host=%s port=%d data=%s", host, port, s.data_dir)

    async def _each_minute(self) -> None:
        """At each minute: the fleet's counts kept (the console's charts: store/series.py), and
        presence history older than a week dropped."""
        while True:
            try:
                await self.record_fleet_point()
                await self.worker.run(self.store.prune_presence, time.time() - HISTORY_KEEP)
            except DatabaseError as exc:  # a point missed is a gap in a chart, not a reason to stop
                log.warning("service.series_point_failed error=%s", exc)
            await asyncio.sleep(60 - time.time() % 60 + 0.5)

    async def _tell_broker_claimed(self, device: str, secret: str) -> None:
        await self._tell_broker(None, created={device: secret})

    def _write_standby_file(self) -> None:
        """A standby's data dir still leads the CLI to the service: behind an external broker the
        active instance answers admin requests on the broker's admin listener, whichever instance's
        data dir (and admin.json, shared) the CLI was pointed at. ``standby`` says this one waits."""
        s = self.settings
        if not s.external_broker:
            return
        from ..external import parse_broker_url

        host, port, _ = parse_broker_url(s.external_broker)
        write_private(s.data_dir / SERVICE_FILE, json.dumps({
            "host": host, "port": port, "topic_prefix": s.topic_prefix, "admin_name": s.admin_name,
            "pid": os.getpid(), "admin_socket": None, "standby": True,
        }))

    async def _take_lease(self, lease: Lease) -> int:
        """Wait (as a standby) until this instance holds the PostgreSQL store's lease."""
        said = False
        while True:
            token, holder = await asyncio.to_thread(lease.take, self._holder, LEASE_TTL)
            if token is not None:
                log.info("store.active holder=%s token=%d", self._holder, token)
                return token
            if not said:
                log.info("store.standby active=%s: waiting for the lease", holder)
                said = True
            await asyncio.sleep(LEASE_TTL / 6)

    async def _keep_lease(self, lease: Lease, fence: tuple[str, int]) -> None:
        """Renew the lease on its own connection; if another instance took it (this one stalled
        past its TTL), stop writing at once: every transaction checks the token, and ``fenced``
        tells ``serve`` to exit."""
        holder, token = fence
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            try:
                kept = await asyncio.to_thread(lease.renew, holder, token, LEASE_TTL)
            except DatabaseError as exc:  # the database is unreachable: the lease runs out on its own
                log.error("store.lease_renewal_failed error=%s", " ".join(str(exc).split()))
                continue
            if not kept:
                log.error("store.fenced token=%d: another instance took the lease; this one stops", token)
                self.fenced.set()
                return

    def _make_broker(self) -> BrokerPort:
        s = self.settings
        sessions = SessionSettings(**s.sessions.model_dump())
        if s.external_broker:
            from ..external import ExternalBroker

            events_secret = ""
            if (s.external_events and s.external_events != "emqx") or s.nats_accounts:
                from ..natsconf import EVENTS_USER
                from ..paths import EVENTS_FILE
                from .nats import NatsAccounts

                events_secret = admin_secret(s.data_dir, EVENTS_USER, EVENTS_FILE)
                if s.nats_accounts is not None:
                    self._nats_accounts = NatsAccounts(s.nats_accounts, s.nats_reload, admin_name=s.admin_name,
                                                      prefix=s.topic_prefix, events_secret=events_secret)
            external = ExternalBroker(s.external_broker, hooks=_BrokerHooks(self), topics=self.topics,
                                      sessions=sessions, username=s.admin_name, password=self.admin_secret,
                                      tls_context=s.external_tls_context(), events=s.external_events,
                                      events_password=events_secret, events_resync=s.external_events_resync)
            if self._nats_accounts is not None:  # a reload is confirmed by asking the nodes
                self._nats_accounts.load_times = external.nats_load_times
            return external
        from ..server import EmbeddedBroker, Limits, Listener

        listeners = []
        for name, spec in s.listeners.items():
            host, port = spec.host_port()
            context = spec.ssl_context(s.tls_client_auth)  # (loaded here too: a bad file fails the start)
            if context is not None and s.tls_client_auth != "off":
                self._claim_tls.append(context)
            files = (str(spec.certfile), str(spec.keyfile)) if context is not None else None
            listeners.append(Listener(name, host, port, context, files))
        limits = Limits(
            max_keepalive=s.max_keepalive, connect_timeout=s.connect_timeout, max_packet=s.max_packet_bytes,
            max_device_publish=s.max_publish_bytes, max_inflight=s.max_inflight,
            receive_maximum=s.receive_maximum, pubrel_timeout=s.pubrel_timeout,
            session_expiry_max=s.session_expiry_max,
            publish_rate=s.device_publish_rate, publish_burst=s.device_publish_burst,
            max_filters_per_subscribe=s.max_filters_per_subscribe, max_subscriptions=s.max_subscriptions,
            max_wildcard_subscriptions=s.max_wildcard_subscriptions,
            max_connections=s.max_connections or default_max_connections(), tls_client_auth=s.tls_client_auth,
        )
        per_process = 0
        if s.listener_processes:
            # Each listener process raises its own limit to the hard one; the core holds only links.
            per_process = default_max_connections(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            if s.max_connections is None:
                limits = dataclasses.replace(limits, max_connections=per_process * s.listener_processes)
        socket_path = s.data_dir / ADMIN_SOCKET if s.admin_socket else None
        if socket_path is not None and len(str(socket_path.resolve())) > 100:
            log.warning("service.admin_socket_path_too_long path=%s: no admin socket", socket_path)
            socket_path = None
        log.info("service.limits max_connections=%d", limits.max_connections)
        broker = EmbeddedBroker(listeners, hooks=_BrokerHooks(self), sessions=sessions, limits=limits,
                                admin_socket=socket_path.resolve() if socket_path else None,
                                listener_processes=s.listener_processes, process_max_connections=per_process)
        self._listener_trust = broker.trust_client_ca
        return broker

    async def stop(self, *, exiting: bool = False) -> None:
        """Stop serving, everything flushed. ``exiting``: the process ends right after (as
        ``henge serve`` does), so the broker leaves the devices' sockets for the kernel to close."""
        if self._broker is None or self._worker is None:
            return
        self.rollouts.close()
        self._stopping = True
        await self._broker.stop(exiting=exiting)
        await self.reports.write_arrivals()
        await self._drain_sessions()
        await self._tasks.cancel_all(1.0)
        pending = (self._pending_epochs or self._pending_seen or self._pending_mqtt or self._pending_history
                   or self._pending_shutdown)
        if pending and not self.fenced.is_set():
            await self.worker.run(self.store.save_sessions, self._pending_epochs, self._pending_seen,
                                  self._pending_mqtt, self._pending_history, self._pending_shutdown)
        fence, lease = self.store.fence, self._lease
        if lease is not None:
            if fence is not None and not self.fenced.is_set():  # a standby need not wait out the TTL
                await asyncio.to_thread(lease.release, *fence)
            await asyncio.to_thread(lease.close)
            self._lease = None
        self._worker.close()
        with contextlib.suppress(OSError):
            (self.settings.data_dir / SERVICE_FILE).unlink()
        self._lock.release()
        self._broker = self._worker = None
        log.info("service.stopped")

    @property
    def address(self) -> tuple[str, int]:
        addresses = self.broker.addresses()
        if not addresses:
            raise ServiceUnavailable("the broker has no TCP listener")
        return addresses[0]

    @property
    def counters(self) -> dict[str, int]:
        return self.events.counters

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A background task the service owns (cancelled when it stops)."""
        return self._tasks.spawn(coro)

    def add_event_listener(self, listener: EventListener) -> Callable[[], None]:
        return self.events.add_listener(listener)

    # ---- BrokerHooks ---------------------------------------------------------------------------

    def _authenticate(self, username: str | None, password: str | None, client_id: str,
                      cert: PeerCert | None = None) -> Principal | Refusal:
        assert self._auth is not None
        return self._auth.authenticate(username, password, client_id, cert)

    def _may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        assert self._auth is not None
        return self._auth.may_subscribe(principal, topic_filter)

    def _may_publish(self, principal: Principal, topic: str) -> bool:
        assert self._auth is not None
        return self._auth.may_publish(principal, topic)

    def _on_message(self, principal: Principal, topic: str, payload: bytes) -> int:
        if principal.kind == "admin" and topic == self.topics.admin_requests:
            self._tasks.spawn(self._admin(payload, principal.name))
        elif principal.kind == "device" and topic == self.topics.report(principal.name):
            report = self.reports.parse(principal.name, payload)
            if isinstance(report, int):
                return report  # refused: a 5.0 device hears why in its PUBACK
            epoch = self.broker.session(principal.name, time.time()).epoch  # the connection it came in on
            self.reports.submit(principal.name, report, epoch or None)
        elif principal.kind == "claim" and topic == self.topics.claim_request(principal.name):
            return self.onboarding.on_request(principal.name, payload)
        elif principal.kind == "device" and topic == self.topics.reported(principal.name):
            name = principal.name  # its connection's epoch, looked up only for a message that is kept
            return self.reports.take_reported(name, payload,
                                              lambda: self.broker.session(name, time.time()).epoch or None)
        return 0

    async def _admin(self, payload: bytes, actor: str) -> None:
        current_actor.set(actor)  # this task's context only
        await handle_admin(self, payload)

    def _on_session_actions(self, actions: Sequence[Action]) -> None:
        stopping = self._stopping
        if stopping:
            # The session table's shutdown: every device offline at once, stored set-wise, and the
            # store's thread starts writing it now, while each change is published below.
            for action in actions:
                if action.__class__ is PresenceChange and action.reason == "server_shutdown":
                    self._pending_shutdown.setdefault(action.since, []).append(action.device)
            if self._pending_shutdown:
                self._schedule_flush()
                self._flush_epochs()
        for action in actions:
            if isinstance(action, PresenceChange):
                self.presence.on_change(action)
                if not (stopping and action.reason == "server_shutdown"):
                    self._pending_seen[action.device] = (action.since, action.remote, action.reason)
                    state = "offline" if not action.online else "takeover" if action.reason == "takeover" else "online"
                    self._keep_history(action.device, action.since, state, action.reason, action.epoch)
                    self._schedule_flush()
            elif isinstance(action, SaveEpoch):
                self._pending_epochs[action.device] = max(action.epoch, self._pending_epochs.get(action.device, 0))
                self._schedule_flush()
            elif isinstance(action, SaveSession):
                self._pending_mqtt[action.device] = (action.expiry, list(action.subs), action.ended_at)
                self._schedule_flush()
            elif isinstance(action, EndSession):
                self._pending_mqtt[action.device] = None
                self._schedule_flush()
            elif isinstance(action, Emit):
                if action.type in ("conflict", "quarantine") and action.device:
                    self._keep_history(action.device, time.time(), "conflict", action.type, None)
                    self._schedule_flush()
                self.events.count(action.type)
                self.events.emit(action.type, action.device, **dict(action.data))
                if action.type == "delivery_too_large":  # shown by status until a later config is sent
                    self.configs.undeliverable[action.device] = dict(action.data) | {"at": iso(time.time())}

    def _keep_history(self, device: str, at: float, state: str, reason: str | None, epoch: int | None) -> None:
        if len(self._pending_history) < HISTORY_PENDING:
            self._pending_history.append((device, at, state, reason, epoch))
        else:  # a storm beyond what one commit should carry: the timeline has a hole, the rest goes on
            self.events.count("presence_history_dropped")

    def _schedule_flush(self) -> None:
        if self._epochs_saved is None:
            self._epochs_saved = asyncio.get_running_loop().create_future()
            if not self._flushing:
                asyncio.get_running_loop().call_soon(self._flush_epochs)

    def _flush_epochs(self) -> None:
        """Group commit: every epoch handed out (and every last-seen record) since the last flush,
        in one transaction."""
        if self._flushing or self._epochs_saved is None or self._worker is None:
            return
        pending, self._pending_epochs = self._pending_epochs, {}
        seen, self._pending_seen = self._pending_seen, {}
        mqtt, self._pending_mqtt = self._pending_mqtt, {}
        history, self._pending_history = self._pending_history, []
        shutdown, self._pending_shutdown = self._pending_shutdown, {}
        saved, self._epochs_saved = self._epochs_saved, None
        self._flushing = True
        self._inflight = saved
        # Queued on the store's thread now, not on the task's first turn.
        job = self.worker.submit(self.store.save_sessions, pending, seen, mqtt, history, shutdown)
        self._tasks.spawn(self._save_epochs(job, saved))

    async def _save_epochs(self, job: asyncio.Future[None], saved: asyncio.Future[None]) -> None:
        try:
            await job
        except Exception as exc:  # the waiting connects are refused; nothing is acknowledged
            log.error("store.epochs_failed error=%s", exc)
            if not saved.done():
                saved.set_exception(exc)
        else:
            if not saved.done():
                saved.set_result(None)
        finally:
            self._flushing = False
            if self._epochs_saved is not None:
                self._flush_epochs()

    async def _drain_sessions(self) -> None:
        """Let every group commit in flight finish before the tasks are cancelled: cancelling one
        would hand its successor (the last presence changes, e.g. the shutdown itself) to a task
        that is then cancelled too, and the last-seen records a restart shows would be lost."""
        deadline = asyncio.get_running_loop().time() + 10.0
        while self._flushing or self._epochs_saved is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.error("store.epochs_drain_timeout")
                return
            if not self._flushing:
                self._flush_epochs()
            waiting = self._inflight if self._flushing else self._epochs_saved
            if waiting is not None:
                await asyncio.wait({waiting}, timeout=left)  # a failed save was logged where it failed

    def _epochs_durable(self) -> Awaitable[None]:
        if self._epochs_saved is not None:
            return self._epochs_saved
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

__all__ = ["Event", "HengeService", "current_actor"]


class _BrokerHooks:
    """The service as the broker sees it (:class:`~henge_mqtt.ports.BrokerHooks`): a part of its own,
    so the hooks stay off :class:`HengeService`'s public surface (docs/library.md lists that)."""

    __slots__ = ("_svc",)

    def __init__(self, svc: HengeService) -> None:
        self._svc = svc

    def authenticate(self, username: str | None, password: str | None, client_id: str,
                     cert: PeerCert | None = None) -> Principal | Refusal:
        return self._svc._authenticate(username, password, client_id, cert)

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return self._svc._may_subscribe(principal, topic_filter)

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return self._svc._may_publish(principal, topic)

    def message(self, principal: Principal, topic: str, payload: bytes) -> int:
        return self._svc._on_message(principal, topic, payload)

    def session_actions(self, actions: Sequence[Action]) -> None:
        self._svc._on_session_actions(actions)

    def epochs_durable(self) -> Awaitable[None]:
        return self._svc._epochs_durable()
