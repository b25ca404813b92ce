"""henge in front of an existing broker (Mosquitto, EMQX, HiveMQ): the service as a privileged client.

The external broker does the MQTT work, takeovers included (each of them closes the old
connection of a client id). Who is connected comes from the broker's own connection events where
it has them (a NATS cluster: ``events=``, see :mod:`henge_mqtt.broker_events`); otherwise devices
announce their own sessions on ``henge/devices/{id}/presence/device``:

- a will ``{"state": "offline", "session": S}`` set at CONNECT, with a fresh ``S`` per connection;
- ``{"state": "online", "session": S}`` right after connecting;
- ``{"state": "offline", "session": S, "reason": "client_disconnect"}`` before a clean disconnect.

Each new session is a connect in the same :class:`SessionTable` the embedded broker uses, so an
offline message of an older session (a displaced connection's late will) is fenced exactly like a
stale disconnect there. The broker's ACL (``henge broker-config mosquitto``) guarantees that only
a device can write its own topics and only the admin identity the admin topics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from . import dynsec
from .backoff import Backoff
from .broker_events import BrokerConnection, ConnectionTracker, Ended
from .errors import SettingsError
from .models import is_valid_device_id
from .mqtt_client import MqttClient, MqttClientError
from .nats_events import NatsEvents
from .ports import IDENTITY_REPAIR, BrokerHooks, IdentitySync, KickResult, Principal
from .sessions import Close, PublishWill, SessionSettings, SessionTable, TableViews
from .tasks import TaskSet
from .topics import Topics

log = logging.getLogger(__name__)
# What devices publish that the service reads as a device's own message (reports, reported state):
# subscribed to on the broker and handed to the service with the device named by the topic.
DEVICE_WORDS = ("report", "reported")

SESSION_REASONS = frozenset({"client_disconnect"})
MAX_INFLIGHT = 2000
# NATS stores each retained QoS 1 message in JetStream before it acknowledges (~200 a second on this
# machine's 3-node cluster): a smaller window keeps an urgent message (an answer) within a second.
NATS_INFLIGHT = 200
FORWARD_SLICE = 500  # session actions handled per loop turn when a snapshot brings thousands at once
SYNC_TIMEOUT = 10.0  # the longest presence waits for the broker's retained announcements
DYNSEC_PROBE = 3.0  # the longest we wait to learn whether the broker runs Mosquitto's dynamic security
DYNSEC_TIMEOUT = 10.0  # the longest one batch of identity commands may take
DYNSEC_BATCH = 400  # the most commands in one message (an import of 100,000 devices is many messages, in order)
# Mosquitto 2.0's plugin rewrites its whole state file after every command, so a command costs more the
# more identities the broker holds (measured: 22 ms each at 2,600 devices; docs/scaling.md): a message's
# commands are as many as its broker answers in about this long, learnt from the last answer, so no
# one answer nears DYNSEC_TIMEOUT until one command alone takes seconds (hundreds of thousands of them).
DYNSEC_PACE = 2.0
PASSWORD_FILE = ("the broker does not run Mosquitto's dynamic security for henge: if it reads a password file, run "
                 "henge broker-config mosquitto --identities password-file again and reload it (SIGHUP); other "
                 "brokers: change the identity with their own tools")
CLAIMS_PASSWORD_FILE = ("the broker does not run Mosquitto's dynamic security for henge, and a password file cannot "
                        "hold a claim's user name (claim:ID): devices claim behind Mosquitto with its dynamic security "
                        "plugin (henge broker-config mosquitto --identities dynamic-security), or behind a NATS "
                        "cluster (--nats-accounts); other brokers: add the user with their own tools")


NATS_ACCOUNT = "HENGE"  # natsconf.ACCOUNT: the account broker-config nats puts every identity in
TAKEN_OVER = "Duplicate Client ID"  # NATS's reason when a newer connection took the client id
# NATS says "Client Closed" for a DISCONNECT and for a TCP close alike: henge cannot tell them apart.
NATS_REASONS = {"Client Closed": "connection_closed", "Stale Connection": "keepalive_timeout",
                "Authentication Expired": "credentials_revoked",
                "Authentication Failure": "credentials_revoked", "Credentials Revoked": "credentials_revoked",
                "Authorization Violation": "credentials_revoked", "Server Shutdown": "server_shutdown"}


EMQX_CONNECTED = "$SYS/brokers/+/clients/+/connected"
EMQX_DISCONNECTED = "$SYS/brokers/+/clients/+/disconnected"
EMQX_TAKEN_OVER = frozenset({"takenover", "discarded"})
EMQX_REASONS = {"normal": "client_disconnect", "tcp_closed": "connection_lost", "sock_closed": "connection_lost",
                "keepalive_timeout": "keepalive_timeout", "kicked": "kicked", "not_authorized": "credentials_revoked"}


def _reason(said: str) -> str:
    """A broker's reason in henge's words (docs/sessions.md); anything else is a lost connection."""
    return NATS_REASONS.get(said) or EMQX_REASONS.get(said, "connection_lost")


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SettingsError(f"invalid broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class ExternalBroker(TableViews):
    """:class:`~henge_mqtt.ports.BrokerPort` over an MQTT client connection to an existing broker."""

    observes_deliveries = False  # the broker acknowledges to us, devices to the broker

    def __init__(
        self,
        url: str,
        *,
        hooks: BrokerHooks,
        topics: Topics,
        sessions: SessionSettings | None,
        username: str,
        password: str,
        tls_context: ssl.SSLContext | None = None,
        client_id: str = "henge-service",
        will_grace: float = 2.0,
        events: str | None = None,
        events_user: str = "henge-events",
        events_password: str = "",
        events_resync: float = 15.0,
    ) -> None:
        self.host, self.port, tls = parse_broker_url(url)
        if tls and tls_context is None:
            tls_context = ssl.create_default_context()
        self.tls_context = tls_context
        self.hooks = hooks
        self.topics = topics
        # The broker owns takeover, so there is nothing to refuse: no rate limit, no quarantine.
        base = sessions or SessionSettings()
        self.table = SessionTable(replace(base, conflict_policy="flag", connect_burst=math.inf,
                                          connect_rate=math.inf))
        self.username, self.password, self.client_id = username, password, client_id
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.sessions: dict[str, dict[str, int]] = {}  # device -> {session id: epoch}
        self.connected = asyncio.Event()
        self._client: MqttClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks = TaskSet(log, "external.publish_failed")
        self._backlog: collections.deque[Any] | None = None  # session actions waiting for their slice
        self.backoff = Backoff(base=0.5, cap=15.0)
        self.will_grace = will_grace
        self.dropped = 0  # messages whose handling failed (logged)
        self._wills: dict[int, asyncio.TimerHandle] = {}  # wills waiting out their grace
        self._will_ids = itertools.count()
        # Presence waits until the retained announcements are read: a marker we publish to ourselves
        # after subscribing arrives after them (one ordered stream), or after SYNC_TIMEOUT at worst.
        self._sync_topic = f"{topics.prefix}/admin/sync/{client_id}"
        self._on_synced: list[Callable[[set[str]], None]] = []
        self._sync_timer: asyncio.TimerHandle | None = None
        # Mosquitto's dynamic security plugin, if the broker runs it (probed on every connection).
        self._dynsec: asyncio.Future[bool] | None = None
        self._dynsec_pending: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._dynsec_ids = itertools.count()
        self._dynsec_lock = asyncio.Lock()  # one batch in flight: the commands apply in order
        self._dynsec_size = DYNSEC_BATCH  # commands in the next message (DYNSEC_PACE)
        # The broker's connection events (NATS), when it has them: presence for plain clients.
        self.tracker: ConnectionTracker | None = None
        self._events: NatsEvents | None = None
        self._events_runner: asyncio.Task[None] | None = None
        self._answers_runner: asyncio.Task[None] | None = None
        self._answers: MqttClient | None = None  # NATS: the admin protocol's own connection
        self._answering = asyncio.Event()
        self._snapshot_mark = 0
        self._refused_topics: set[str] = set()
        self._missing_servers: dict[str, int] = {}  # nodes absent from consecutive snapshots
        self._emqx: dict[str, list[str]] | None = None  # EMQX: client id -> its live connections' keys, oldest first
        if events:
            self.tracker = ConnectionTracker(self.table, known=lambda user: user != username)
            if events == "emqx":
                self._emqx = {}
            else:
                self._events = NatsEvents(events, user=events_user, password=events_password,
                                          account=NATS_ACCOUNT, listener=self, resync=events_resync)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run())
        if self._events is not None:
            self._events_runner = asyncio.create_task(self._events.run())
            self._answers_runner = asyncio.create_task(self._run_answers())

    async def nats_load_times(self) -> dict[str, str]:
        """Each NATS node's configuration load time (``{}`` without the cluster's events)."""
        return await self._events.load_times() if self._events is not None else {}

    def when_presence_known(self, callback: Callable[[set[str]], None]) -> None:
        self._on_synced.append(callback)

    def _synced(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        callbacks, self._on_synced = self._on_synced, []
        if callbacks:
            online = set(self.table.online_devices())
            log.info("external.presence_known online=%d", len(online))
            for callback in callbacks:
                callback(online)

    async def stop(self, *, exiting: bool = False) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        for handle in self._wills.values():
            handle.cancel()
        self._wills.clear()
        for runner in (self._runner, self._events_runner, self._answers_runner):
            if runner is not None:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
        await self._tasks.cancel_all(1.0)

    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    @property
    def admin_socket(self) -> str | None:
        return None

    async def _keep(self, what: str, backoff: Backoff, *, client_id: str, clean_session: bool, max_inflight: int,
                    up: Callable[[MqttClient], Awaitable[None]], down: Callable[[], None]) -> None:
        """One connection to the broker, for ever: connect, ``up``, wait until it closes, ``down``,
        back off (from the start again once a connection lived 10 s), and again."""
        while True:
            client: MqttClient | None = None
            started = time.monotonic()
            try:
                client = await MqttClient.connect(
                    self.host, self.port, client_id=client_id, username=self.username, password=self.password,
                    on_message=self._on_message, keepalive=30, clean_session=clean_session, tls=self.tls_context,
                    timeout=10, max_inflight=max_inflight)
                started = time.monotonic()
                await up(client)
                await client.closed
                log.warning("external.%s broker=%s:%d", what, self.host, self.port)
            except (MqttClientError, OSError, TimeoutError) as exc:
                log.warning("external.%s broker=%s:%d error=%s", what, self.host, self.port, exc)
            finally:
                down()
                if client is not None:
                    client.close()
            if time.monotonic() - started > 10:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def _run(self) -> None:
        """The main connection: reports, presence, syncs, the retained configs (and, but on NATS,
        the admin protocol)."""
        await self._keep("disconnected", self.backoff, client_id=self.client_id, clean_session=False,
                         max_inflight=MAX_INFLIGHT if self._events is None else NATS_INFLIGHT,
                         up=self._main_up, down=self._main_down)

    async def _main_up(self, client: MqttClient) -> None:
        self._client = client
        filters = [(f"{self.topics.prefix}/devices/+/{leaf}", 1) for leaf in DEVICE_WORDS]
        filters.append((self.topics.claim_request("+"), 1))  # new devices claiming (docs/onboarding.md)
        filters.append((self._sync_topic, 1))
        if self._events is None:  # (NATS: on the admin protocol's own connection)
            filters.append((self.topics.admin_requests, 1))
        if self.tracker is None:  # the devices' announcements are the only presence there is
            filters.append((f"{self.topics.prefix}/devices/+/presence/device", 1))
        if self._emqx is not None:  # EMQX's client events, on this connection
            filters += [(EMQX_CONNECTED, 0), (EMQX_DISCONNECTED, 0)]
        await client.subscribe(filters)
        self._dynsec = asyncio.get_running_loop().create_future()
        if self._events is None:
            self._tasks.spawn(self._probe_dynsec(client, self._dynsec))
        else:  # NATS has no such plugin: the probe's subscription was a "Subscription Violation" in its log
            self._dynsec.set_result(False)
        if self._on_synced and self._events is None:  # after the retained announcements the subscription brings
            client.publish(self._sync_topic, b"sync", qos=1)
            if self._sync_timer is None:
                self._sync_timer = asyncio.get_running_loop().call_later(SYNC_TIMEOUT, self._synced)
        # The broker may have restarted without persistence: the store's truth again.
        for topic, (data, qos) in list(self.retained.items()):
            client.publish(topic, data, qos=qos, retain=True)
        self.connected.set()
        log.info("external.connected broker=%s:%d republished=%d", self.host, self.port, len(self.retained))

    def _main_down(self) -> None:
        self._client = None
        self._dynsec = None
        self.connected.clear()

    async def _run_answers(self) -> None:
        """NATS: the admin protocol on a connection of its own (requests in, answers and events out).
        NATS stores each retained message in JetStream before it takes the next from a connection,
        so on the main one an answer would wait behind a republish of 10,000 configs (minutes)."""
        await self._keep("admin_connection_lost", Backoff(base=0.5, cap=15.0), client_id=f"{self.client_id}-admin",
                         clean_session=True, max_inflight=MAX_INFLIGHT, up=self._answers_up, down=self._answers_down)

    async def _answers_up(self, client: MqttClient) -> None:
        await client.subscribe([(self.topics.admin_requests, 1)])
        self._answers = client
        self._answering.set()

    def _answers_down(self) -> None:
        self._answers = None
        self._answering.clear()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self._route(topic, payload)
        except Exception:  # one bad message must never end the connection: log, count, go on
            self.dropped += 1
            log.exception("external.message_failed topic=%s", topic)

    # ---- what the service asks of a broker ---------------------------------------------------------

    def publish(self, topic: str, data: bytes, *, qos: int = 1, retain: bool = False, track: bool = False,
                props: dict[int, object] | None = None, for_device: str | None = None) -> list[asyncio.Future[None]]:
        """Tracked futures say the broker took the message, not that a device has it: we cannot see
        that, so with ``for_device`` there is no future at all (the device's report is the answer)."""
        if retain:
            if data:
                self.retained[topic] = (data, qos)
            else:
                self.retained.pop(topic, None)
        if self._events is not None and "." in topic:
            # NATS closes a connection that publishes a '.' in a topic: a device whose id has one (made
            # before the broker was NATS) must never cut henge off. Said once per topic.
            if topic not in self._refused_topics and len(self._refused_topics) < 1000:
                self._refused_topics.add(topic)
                log.warning("external.topic_not_carried topic=%s why=NATS MQTT carries no '.' in topics", topic)
            return []
        client = self._client if retain or self._answers is None else self._answers  # answers and events
        if client is None:
            return []  # retained state goes out on the next connect; the rest had no one to reach
        future = client.publish(topic, data, qos=qos, retain=retain, urgent=not retain)
        return [future] if track and for_device is None else []

    def clear_retained(self, topic: str) -> None:
        self.publish(topic, b"", qos=1, retain=True)

    def has_subscribers(self, topic: str) -> bool:
        return self._client is not None  # the broker knows, we do not: assume someone listens

    async def kick(self, device: str) -> KickResult:
        return KickResult(kicked=False, supported=False,
                          detail="kick needs the embedded broker; with an external broker use its own admin tools")

    def forget(self, device: str) -> None:
        self.table.forget(device)
        self.sessions.pop(device, None)
        if self.tracker is not None:
            self.tracker.forget(device)

    # ---- presence from the broker's connection events (nats_events.Listener) ---------------------

    def broker_connected(self, conn: BrokerConnection) -> None:
        assert self.tracker is not None
        self._forward(self.tracker.connected(conn, time.time()))

    def broker_disconnected(self, key: str, reason: str) -> None:
        assert self.tracker is not None
        if reason == TAKEN_OVER:
            # The newer connection of this client id may be reported after this end (another node):
            # wait a grace for it, as for a will; if it came, this end is stale by then.
            ended = self.tracker.end(key)
            if ended is not None:
                handle = next(self._will_ids)
                self._wills[handle] = asyncio.get_running_loop().call_later(
                    self.will_grace, self._broker_end_due, handle, ended, "takeover")
            return
        self._forward(self.tracker.disconnected(key, time.time(), _reason(reason)))

    def _broker_end_due(self, handle: int, ended: Ended, reason: str) -> None:
        self._wills.pop(handle, None)
        assert self.tracker is not None
        self._forward(self.tracker.settle(ended, time.time(), reason))

    def _on_emqx_event(self, topic: str, payload: bytes) -> None:
        """EMQX's documented client events: ``$SYS/brokers/{node}/clients/{clientid}/connected`` with
        ``username``, ``ipaddress``, ``connected_at`` (ms); ``.../disconnected`` with ``reason``.
        EMQX names no connection, so a connection is its client id and its ``connected_at``; a
        ``takenover`` or ``discarded`` end is the oldest of a client id's connections, any other
        the newest."""
        assert self.tracker is not None and self._emqx is not None
        parts = topic.split("/", 4)
        if len(parts) != 5 or parts[3] != "clients":
            return
        client_id, _, what = parts[4].rpartition("/")
        try:
            body = json.loads(payload)
        except ValueError:
            log.info("external.bad_emqx_event what=%s", what)
            return
        if not isinstance(body, dict) or not client_id:
            return
        keys = self._emqx.setdefault(client_id, [])
        if what == "connected":
            key = f"{parts[2]}/{client_id}@{body.get('connected_at', '')}"
            if key in keys:
                return
            keys.append(key)
            if len(keys) > 8:  # ends never reported: forget the oldest
                del keys[0]
            user = body.get("username")
            remote = body.get("ipaddress")
            conn = BrokerConnection(key, user if isinstance(user, str) else None, client_id,
                                    remote if isinstance(remote, str) else None, str(body.get("connected_at", "")))
            self._forward(self.tracker.connected(conn, time.time()))
        elif what == "disconnected" and keys:
            reason = str(body.get("reason", ""))
            key = keys.pop(0) if reason in EMQX_TAKEN_OVER else keys.pop()
            if not keys:
                del self._emqx[client_id]
            self.broker_disconnected(key, TAKEN_OVER if reason in EMQX_TAKEN_OVER else reason)

    def snapshot_begins(self) -> None:
        assert self.tracker is not None
        self._snapshot_mark = self.tracker.mark()

    def snapshot(self, connections: list[BrokerConnection], servers: set[str]) -> None:
        """Reconcile with every node's list. A node that did not answer keeps its connections until
        it has missed two snapshots in a row (then it is gone: killed, or cut off)."""
        assert self.tracker is not None
        known = self.tracker.servers() | set(self._missing_servers)
        self._missing_servers = {s: self._missing_servers.get(s, 0) + 1 for s in known - servers}
        gone = {s for s, n in self._missing_servers.items() if n >= 2}
        for server in gone:
            log.warning("external.node_gone server=%s", server)
            del self._missing_servers[server]
        covered = servers | gone  # nodes whose list is complete: the ones that answered, and the gone
        actions = self.tracker.snapshot(connections, self._snapshot_mark, time.time(),
                                        complete=lambda key: key.partition("/")[0] in covered)
        self._forward(actions)
        self._synced()

    # ---- identities: Mosquitto's dynamic security ------------------------------------------------------

    async def sync_identities(self, *, created: dict[str, str] | None = None, changed: dict[str, str] | None = None,
                              removed: list[str] | None = None, claims: dict[str, str] | None = None,
                              claims_removed: list[str] | None = None) -> IdentitySync:
        prefix = self.topics.prefix
        commands = [c for d, s in (created or {}).items() for c in dynsec.create(d, s, prefix=prefix)]
        # A new secret re-creates the identity (the broker disconnects the old connection): the same
        # commands whether or not the broker had it, so rotate-secret also repairs a change it missed.
        commands += [c for d, s in (changed or {}).items() for c in dynsec.create(d, s, prefix=prefix)]
        commands += [c for d in removed or [] for c in dynsec.delete(d)]
        commands += [c for user, s in (claims or {}).items() for c in dynsec.create_claim(user, s, prefix=prefix)]
        commands += [c for user in claims_removed or [] for c in dynsec.delete_claim(user)]
        detection = self._dynsec
        try:
            if detection is None:
                raise MqttClientError("not connected to the broker")
            if not await asyncio.wait_for(asyncio.shield(detection), DYNSEC_PROBE + 1):
                return IdentitySync(applied=False, how="password-file",
                                    detail=CLAIMS_PASSWORD_FILE if claims or claims_removed else PASSWORD_FILE)
            errors: list[str] = []
            async with self._dynsec_lock:
                start = 0
                while start < len(commands):
                    batch = commands[start:start + self._dynsec_size]
                    began = time.monotonic()
                    errors += dynsec.failures(await self._dynsec_command(batch))
                    start += len(batch)
                    took = max(time.monotonic() - began, 0.001)
                    self._dynsec_size = max(2, min(DYNSEC_BATCH, int(len(batch) * DYNSEC_PACE / took)))
        except (MqttClientError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {DYNSEC_TIMEOUT:g} s"
            return IdentitySync(applied=False, how="dynamic-security", detail=(
                f"the broker did not take the change ({why}): the store has it; {IDENTITY_REPAIR}"))
        if errors:
            return IdentitySync(applied=False, how="dynamic-security",
                                detail="the broker refused: " + "; ".join(errors[:3]))
        return IdentitySync(applied=True, how="dynamic-security")

    async def _probe_dynsec(self, client: MqttClient, found: asyncio.Future[bool]) -> None:
        """Whether this broker runs the dynamic security plugin and lets us use it: a refused
        subscription, or no answer to a harmless command, means password files."""
        result = False
        try:
            codes = await client.subscribe([(dynsec.RESPONSES, 1)])
            if codes and codes[0] < 0x80:
                await self._dynsec_command([{"command": "getDefaultACLAccess"}], client=client, timeout=DYNSEC_PROBE)
                result = True
        except (MqttClientError, TimeoutError):
            result = False
        finally:
            if not found.done():
                found.set_result(result)
        log.info("external.identities broker=%s:%d mode=%s", self.host, self.port,
                 "dynamic-security" if result else "password-file")

    async def _dynsec_command(self, commands: list[dict[str, Any]], *, client: MqttClient | None = None,
                              timeout: float = DYNSEC_TIMEOUT) -> list[dict[str, Any]]:
        client = client or self._client
        if client is None:
            raise MqttClientError("not connected to the broker")
        tag = f"henge-{next(self._dynsec_ids)}"
        first = dict(commands[0]) | {"correlationData": tag}  # the response echoes it: ours, not another's
        answer: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._dynsec_pending[tag] = answer
        try:
            sent = client.publish(dynsec.TOPIC, json.dumps({"commands": [first, *commands[1:]]}).encode(), qos=1)
            sent.add_done_callback(_retrieved)  # a lost connection shows as no answer, here
            return await asyncio.wait_for(answer, timeout)
        finally:
            self._dynsec_pending.pop(tag, None)

    def _on_dynsec_response(self, payload: bytes) -> None:
        try:
            responses = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.info("external.bad_dynsec_response")
            return
        if not isinstance(responses, list):
            return
        for response in responses:
            tag = response.get("correlationData") if isinstance(response, dict) else None
            answer = self._dynsec_pending.get(tag) if isinstance(tag, str) else None
            if answer is not None and not answer.done():
                answer.set_result([r for r in responses if isinstance(r, dict)])
                return

    def clear_conflict(self, device: str) -> bool:
        actions = self.table.clear_conflict(device)
        self._forward(actions)
        return bool(actions)

    def stats(self) -> dict[str, int]:
        stats = {"connected_to_broker": int(self._client is not None), "retained": len(self.retained),
                 "dropped": self.dropped}
        if self.tracker is not None:
            stats |= {"broker_connections": len(self.tracker), "identity_mismatches": self.tracker.mismatches}
        if self._events is not None:
            stats["broker_events_connected"] = int(self._events.connected.is_set())
        return stats

    # ---- incoming ----------------------------------------------------------------------------------

    def _route(self, topic: str, payload: bytes) -> None:
        if topic == self._sync_topic:
            self._synced()
            return
        if self._emqx is not None and topic.startswith("$SYS/brokers/"):
            self._on_emqx_event(topic, payload)
            return
        if topic == dynsec.RESPONSES:
            self._on_dynsec_response(payload)
            return
        if topic == self.topics.admin_requests:
            # Only the admin identity may write here (the broker's ACL).
            self.hooks.message(Principal("admin", self.username), topic, payload)
            return
        nonce = self.topics.nonce_of_request(topic)
        if nonce is not None:  # a claim's user may write here: whose claim, the request itself says
            self.hooks.message(Principal("claim", nonce), topic, payload)
            return
        found = self.topics.device_of(topic)
        if found is None or not is_valid_device_id(found[0]):
            return
        device, leaf = found
        if leaf in DEVICE_WORDS:
            self.hooks.message(Principal("device", device), topic, payload)
        elif leaf == "presence/device":
            self._on_device_presence(device, payload)

    def _on_device_presence(self, device: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            state, session = body["state"], str(body["session"])
        except (ValueError, KeyError, TypeError):
            log.info("external.bad_presence device=%s", device)
            return
        known = self.sessions.setdefault(device, {})
        now = time.time()
        if state == "online":
            if session in known:
                return  # a duplicate (QoS 1 redelivery)
            result = self.table.connect(device, now, None, math.inf)
            known[session] = result.epoch
            if len(known) > 16:  # forget the oldest sessions; their late wills are stale anyway
                for old in list(known)[:-16]:
                    del known[old]
            self._forward(result.actions)
        elif state == "offline":
            epoch = known.get(session)
            if epoch is None:
                return  # an unknown or forgotten session: stale
            reason = body.get("reason") if body.get("reason") in SESSION_REASONS else "connection_lost"
            if reason in SESSION_REASONS:  # the device said goodbye itself: believed at once
                self._forward(self.table.disconnect(device, epoch, now, reason))
                return
            # A will. On a takeover the broker publishes the displaced session's will before the new
            # session announces itself: believed only after a grace, within which a newer session
            # makes it stale (fenced by epoch, like any late event). A real loss shows within it.
            key = next(self._will_ids)
            self._wills[key] = asyncio.get_running_loop().call_later(self.will_grace, self._will_due, key, device,
                                                                     epoch, now)

    def _will_due(self, key: int, device: str, epoch: int, at: float) -> None:
        self._wills.pop(key, None)
        self._forward(self.table.disconnect(device, epoch, at, "connection_lost"))

    def _forward(self, actions: Any) -> None:
        # Takeover and wills are the external broker's job; the rest (presence, events) is ours.
        kept = [a for a in actions if not isinstance(a, Close | PublishWill)]
        if not kept:
            return
        if self._backlog is not None:  # a large batch is going out in slices: behind it, in order
            self._backlog.extend(kept)
        elif len(kept) <= FORWARD_SLICE:
            self.hooks.session_actions(kept)
        else:
            # A snapshot of a whole fleet (a failover, a restart) is thousands of presence records and
            # events: sent a slice per loop turn, so an admin request is answered meanwhile (the
            # session table already counts every connection); later actions queue behind, in order.
            self._backlog = collections.deque(kept)
            self._tasks.spawn(self._drain())

    async def _drain(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog:
                self.hooks.session_actions([backlog.popleft() for _ in range(min(FORWARD_SLICE, len(backlog)))])
                await asyncio.sleep(0)
        finally:
            if backlog:  # stopped meanwhile: the rest at once (presence and epochs are never dropped)
                self.hooks.session_actions(list(backlog))
            self._backlog = None

    async def wait_connected(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.connected.wait()
                if self._events is not None:
                    await self._answering.wait()
