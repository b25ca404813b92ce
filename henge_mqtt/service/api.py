"""The library API: every operation of the service, as coroutines (the CLI reaches the same ones
over the admin protocol). Store work runs on the store's thread; the broker is reached through
its port only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from .. import models
from .. import where as where_lang
from ..errors import (
    DuplicateDevice,
    InvalidDeviceId,
    SchemaViolation,
    ServiceUnavailable,
    UnknownDevice,
    UnknownVersion,
    ValidationFailed,
)
from ..models import ConfigVersion, Device
from ..paths import BROKER_FILE
from ..ports import IDENTITY_REPAIR, BrokerPort, IdentitySync, KickResult
from ..results import (
    AuditEntry,
    BackupResult,
    BrokerNote,
    ClaimCreated,
    ClaimInfo,
    ClaimRevoked,
    Diff,
    Explained,
    FleetAnswer,
    FleetSeries,
    FleetSummary,
    LayerChange,
    LayerInForce,
    LayerPreview,
    LayerVersion,
    PresenceTimeline,
    PushPreview,
    PushPreviewDiff,
    Reconciled,
    ReportedState,
    ReportOutcome,
    RolloutPreview,
    RolloutStatus,
    RolloutSummary,
    SchemaChange,
    SchemaInForce,
    SchemaPreview,
    SchemaVersion,
    SessionInfo,
    StatusRow,
    TimelineMark,
    TimelineSegment,
    TokenCreated,
    TokenInfo,
    TokenRevoked,
    fleet_summary,
)
from ..rollout_plan import Policy, check_waves, parse_max_rejected
from ..settings import Settings
from ..store import DeviceReports, Store, StoreWorker
from ..store.credentials import Credential, make_credentials
from ..tasks import TaskSet
from ..topics import Topics, claim_user
from ..where import Where
from .claims import ca_subject, trust_claim_ca
from .configs import Configs
from .context import current_actor, unified_diff, utc_text
from .events import Events
from .fleet import FleetWatch, Progress
from .fleet import answer as fleet_answer
from .fleet import counts as fleet_counts
from .nats import HOW as NATS_HOW
from .nats import NatsAccounts
from .presence import iso
from .reports import Reports
from .rollouts import Rollouts
from .schemas import Schemas, display, selector_of

log = logging.getLogger("henge_mqtt.service")
PREVIEW_DEVICES = 200  # the devices a fleet push's preview names (it counts them all)
# Status rows a summary reads per trip to the store's thread; the loop's share of a batch holds it
# (bench/summary_lag.py: 20-30 ms at 18,000 here, 60-80 with batches of 5,000 and a view per device).
SUMMARY_BATCH = 2_000
PRESENCE_WAIT = 5.0  # the longest a status or summary waits, after a start, for the broker to say who is online
# The longest an answer waits for an external broker to take identity changes (devices added, removed,
# given a new secret); what is left goes on in the background (a big import behind Mosquitto's dynamic
# security takes minutes: docs/scaling.md), so the answer, with the new secrets, is never lost to a timeout.
IDENTITY_WAIT = 5.0
CREDENTIAL_CHUNK = 100  # new devices' secrets hashed per trip to a thread (0.1-0.25 s): an import's progress tick
SERIES_WINDOWS = {"24h": (24 * 60, 1), "7d": (7 * 24 * 60, 10)}  # window: (its minutes, minutes per point)


def parse_where(text: str, *, standing: bool = False) -> Where:
    """A ``where`` filter (docs/where.md), or ``invalid`` naming the column; ``standing``: for a
    target that is kept and re-evaluated (a layer's): only what a device is (id, labels, reported)."""
    try:
        return where_lang.parse(text, allowed=where_lang.STANDING_ROOTS if standing else None)
    except where_lang.WhereError as exc:
        raise ValidationFailed(f"where: {exc}") from None


def change_diff(device: str, version: int, old: dict[str, Any] | None, new: dict[str, Any]) -> PushPreviewDiff:
    """A preview's example: the device's config at ``version`` (0: none yet) and the next one."""
    return {"device": device, "from_version": version or None, "to_version": version + 1,
            "diff": unified_diff(old or {}, new, f"{device} v{version}" if version else "(none)",
                                 f"{device} v{version + 1}")}


def broker_note(said: list[IdentitySync]) -> BrokerNote:
    """What the broker did with an identity change, for the answer (the embedded broker: the store)."""
    sync = said[0] if said else IdentitySync(applied=True, how="store")
    return {"applied": sync.applied, "how": sync.how, "detail": sync.detail}


class ServiceAPI:
    settings: Settings
    topics: Topics
    _claim_tls: list[ssl.SSLContext]  # the TLS listeners that ask for client certificates (claim CAs)
    _listener_trust: Callable[[str], None] | None  # the listener processes' copies of those (the embedded broker)
    events: Events
    configs: Configs
    presence_known: asyncio.Event  # the broker has said who is connected (behind one: seconds after a start)
    reports: Reports
    schemas: Schemas
    rollouts: Rollouts
    _worker: StoreWorker | None
    _broker: BrokerPort | None
    _nats_accounts: NatsAccounts | None = None  # identities reach a NATS cluster through its accounts file
    _tasks: TaskSet  # the service's background tasks (cancelled when it stops)

    @property
    def worker(self) -> StoreWorker:
        if self._worker is None:
            raise ServiceUnavailable("the service is not running")
        return self._worker

    @property
    def store(self) -> Store:
        return self.worker.store

    @property
    def broker(self) -> BrokerPort:
        if self._broker is None:
            raise ServiceUnavailable("the service is not running")
        return self._broker

    async def add_device(self, device: str, labels: dict[str, str] | None = None, *,
                         broker: list[IdentitySync] | None = None) -> str:
        """A new device; returns its secret (shown once). ``broker`` receives what the broker did with
        the new identity (an external broker learns it at once only through dynamic security)."""
        self._check_new_id(device, "")
        layered: list[ConfigVersion] = []
        secret = await self.worker.run(self.store.add_device, device, labels, actor=current_actor.get(),
                                       layered=layered)
        self.events.emit("device_added", device)
        await self.configs.publish_rows(layered, event="layer_applied", reason="a new device gets its layers")
        await self._tell_broker(broker, created={device: secret})
        return secret

    def _check_new_id(self, device: str, then: str) -> None:
        problem = models.device_id_problem(device)
        if problem:
            raise InvalidDeviceId(problem + then)
        events = self.settings.external_events or ""
        if "." in device and (events.startswith("nats://") or self.settings.nats_accounts):
            raise InvalidDeviceId(f"invalid device id {device!r} for a NATS cluster: its MQTT carries no '.' in "
                                  f"topics (use - or _){then}")
        if device == self.settings.admin_name:
            raise DuplicateDevice(f"{device!r} is the admin identity's name{then or '; choose another id'}")

    async def set_labels(self, device: str, set_: dict[str, str], remove: list[str], *,
                         if_tag: str | None = None) -> dict[str, str]:
        """Set (``k=v``) and remove (``k``) labels of a device; returns its labels afterwards.
        ``if_tag``: only if its labels are still those (``ids.labels_tag``), else LabelsConflict."""
        layered: list[ConfigVersion] = []
        labels = await self.worker.run(self.store.set_labels, device, set_, remove, actor=current_actor.get(),
                                       layered=layered, if_tag=if_tag)
        await self.worker.run(self.schemas.labels_changed, device)  # other labels, maybe other schemas
        self.events.emit("labels_changed", device, labels=labels)
        await self.configs.publish_rows(layered, event="layer_applied", reason="labels changed")
        return labels

    async def import_devices(self, devices: list[tuple[str, dict[str, str]]], *, update: bool = False,
                             broker: list[IdentitySync] | None = None,
                             progress: Progress | None = None) -> dict[str, str]:
        """Create many devices at once (all or nothing); returns ``{id: secret}`` of the new ones.
        With ``update``, existing devices get the labels given instead of refusing the import.

        The new secrets' hashes (about 2 ms a device, bcrypt and PBKDF2) are made first, off the
        store's thread, CREDENTIAL_CHUNK at a time, each chunk a ``progress`` tick
        (``{"credentials": made, "of": new}``: the CLI's sign that the import is alive, 50,000
        devices take minutes); then one transaction stores them all."""
        for device, _ in devices:
            self._check_new_id(device, "; nothing was imported")
        new = await self.worker.run(self.store.check_import, devices, update=update)
        made: dict[str, Credential] = {}
        for start in range(0, len(new), CREDENTIAL_CHUNK):
            made.update(await asyncio.to_thread(make_credentials, new[start:start + CREDENTIAL_CHUNK]))
            if progress is not None:
                progress({"credentials": len(made), "of": len(new)})
        layered: list[ConfigVersion] = []
        secrets_by_id = await self.worker.run(self.store.add_devices, devices, actor=current_actor.get(),
                                              update=update, layered=layered, made=made)
        if update and len(secrets_by_id) < len(devices):
            await self.worker.run(self.schemas.recheck_all)  # labels of existing devices changed
        await self.configs.publish_rows(layered, event="layer_applied", reason="devices imported")
        self.events.emit("devices_imported", None, count=len(secrets_by_id), updated=len(devices) - len(secrets_by_id))
        await self._tell_broker(broker, created=secrets_by_id)
        return secrets_by_id

    async def remove_device(self, device: str, *, broker: list[IdentitySync] | None = None) -> None:
        """Store first, then the broker: the identity and the connection gone, the session and
        retained topics too."""
        await self.worker.run(self.store.remove_device, device, actor=current_actor.get())
        self.schemas.invalid.pop(device, None)
        self.reports.forget(device)
        await self._tell_broker(broker, removed=[device])
        await self.broker.kick(device)
        self.broker.forget(device)
        for topic in (self.topics.config(device), self.topics.presence(device), self.topics.device_presence(device)):
            self.broker.publish(topic, b"", qos=1, retain=True)  # a new device of this id inherits nothing
        self.events.emit("device_removed", device)

    async def rotate_secret(self, device: str, *, broker: list[IdentitySync] | None = None) -> str:
        """A new secret (shown once); the old one stops working and its connection is closed."""
        secret = await self.worker.run(self.store.rotate_secret, device, actor=current_actor.get())
        self.events.emit("secret_rotated", device)
        await self._tell_broker(broker, changed={device: secret})
        return secret

    async def _tell_broker(self, out: list[IdentitySync] | None, *, created: dict[str, str] | None = None,
                           changed: dict[str, str] | None = None, removed: list[str] | None = None,
                           claims: dict[str, str] | None = None, claims_removed: list[str] | None = None) -> None:
        """The broker learns what the store just committed (devices, and claims by their user
        names); when it cannot (an external broker with password files, or one that did not answer)
        the store keeps the change and this says so: an event, a log line, and ``out`` for the
        caller to show. The caller waits at most IDENTITY_WAIT: a broker still busy then (a big
        import behind Mosquitto's dynamic security) finishes in the background, and says so when done."""
        if not (created or changed or removed or claims or claims_removed):
            return
        devices = len(created or {}) + len(changed or {}) + len(removed or [])
        how = "dynamic-security" if self._nats_accounts is None else NATS_HOW
        late = asyncio.Event()  # set when the answer went out before the broker had taken everything
        sending = self._tasks.spawn(self._send_identities(late, how, devices, created=created, changed=changed,
                                                          removed=removed, claims=claims,
                                                          claims_removed=claims_removed))
        done, _ = await asyncio.wait({sending}, timeout=IDENTITY_WAIT)
        if done:
            sync = sending.result()
        else:
            late.set()
            why = " (Mosquitto's dynamic security rewrites its file for each)" if how == "dynamic-security" else ""
            sync = IdentitySync(applied=False, how=how, detail=(
                f"the broker is still taking the changes after {IDENTITY_WAIT:g} s{why}: they go on in the "
                "background; the event broker_identities_synced (henge events) says when they are all in, "
                "broker_identities_stale if they fail"))
        if out is not None:
            out.append(sync)

    async def _send_identities(self, late: asyncio.Event, how: str, devices: int, **changes: Any) -> IdentitySync:
        """The broker told, in the background once the answer has gone (``late``): what happens is
        said the same way either way (an event and a log line), also when the service stops first."""
        try:
            if self._nats_accounts is not None:
                sync = await self._nats_accounts.refresh(self._nats_text)
            else:
                sync = await self.broker.sync_identities(**changes)
        except asyncio.CancelledError:
            sync = IdentitySync(applied=False, how=how, detail=(
                f"the service stopped before the broker had taken every change: the store has them; {IDENTITY_REPAIR}"))
            self._identities_said(sync, devices)
            raise
        self._identities_said(sync, devices, late=late.is_set())
        return sync

    def _identities_said(self, sync: IdentitySync, devices: int, *, late: bool = False) -> None:
        if not sync.applied:
            log.warning("service.broker_identities_stale how=%s detail=%s", sync.how, sync.detail)
            self.events.emit("broker_identities_stale", None, how=sync.how, detail=sync.detail, devices=devices)
        elif late:
            log.info("service.broker_identities_synced how=%s devices=%d", sync.how, devices)
            self.events.emit("broker_identities_synced", None, how=sync.how, devices=devices)

    async def _nats_text(self) -> str:
        """The NATS accounts file as the store has it now: the admin, every device, every claim."""
        assert self._nats_accounts is not None
        hashes, _ = await self.worker.run(self.store.broker_hashes, "bcrypt")
        claims = await self.worker.run(self.store.claim_hashes, "bcrypt")
        return self._nats_accounts.text(hashes, {claim_user(c): digest for c, digest in claims.items()})

    async def get_device(self, device: str) -> Device:
        return await self.worker.run(self.store.get_device, device)

    async def list_devices(self, labels: dict[str, str] | None = None) -> list[Device]:
        return await self.worker.run(self.store.list_devices, labels)

    async def get_version(self, device: str, version: int | None = None) -> ConfigVersion:
        """A version with the device's own report of it (``report``: applied or rejected, why, when,
        on which connection epoch), kept for as long as the version is."""
        store = self.store
        row, reports = await self.worker.run(lambda: (store.get_version(device, version),
                                                      store.version_reports(device)))
        return row.model_copy(update={"report": reports.get(row.version)})

    async def history(self, device: str) -> list[ConfigVersion]:
        """Every version, each with its own report (a rejection keeps its reason after later versions)."""
        store = self.store
        rows, reports = await self.worker.run(lambda: (store.history(device), store.version_reports(device)))
        return [row.model_copy(update={"report": reports.get(row.version)}) for row in rows]

    async def audit(self, device: str | None = None, limit: int = 100) -> list[AuditEntry]:
        store = self.store
        entries = await self.worker.run(store.audit, device, limit)
        for entry in entries:
            entry["at"] = utc_text(entry["at"])
        # A removed device's trail is still there; only an id never seen is unknown.
        if device is not None and not entries and not store.has_device(device):
            raise UnknownDevice(device)
        return entries

    async def select(self, *, all_devices: bool = False, labels: dict[str, str] | None = None,
                     where: str | None = None) -> list[str]:
        """The devices a fleet operation targets: every one, those with all the labels, and of
        those the ones ``where`` matches (docs/where.md), as they are now."""
        if not all_devices and not labels and not where:
            raise ValidationFailed("select devices with all, with at least one label, or with where")
        if where:
            found = await self.status(labels=None if all_devices else labels, where=where)
            devices = [row["device"] for row in found]
        else:
            devices = await self.worker.run(self.store.device_ids, labels if not all_devices else None)
        if not devices:
            said = []
            if labels and not all_devices:
                said.append("has the labels " + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
            if where:
                said.append(f"matches where {where}")
            what = "no device " + " and ".join(said) if said else "no devices are registered"
            raise UnknownDevice(None, message=what, also="nothing was stored")
        return devices

    async def push(self, device: str, config: dict[str, Any], *, message: str = "",
                   if_version: int | None = None, force: bool = False) -> ConfigVersion:
        """The new version; unless ``force``, a config equal to the current one stores nothing and
        returns the current version (``push_checked`` says which happened)."""
        row, _ = await self.push_checked(device, config, message=message, if_version=if_version, force=force)
        return row

    async def push_checked(self, device: str, config: dict[str, Any] | None, *, message: str = "",
                           if_version: int | None = None, force: bool = False,
                           patch: dict[str, Any] | None = None) -> tuple[ConfigVersion, bool]:
        """``(row, stored)``; with ``patch``, an RFC 7396 merge patch of the current config."""
        return await self.configs.push(device, config, actor=current_actor.get(), message=message,
                                       if_version=if_version, force=force, patch=patch)

    async def push_many(self, devices: list[str], config: dict[str, Any], *, message: str = "",
                        progress: Progress | None = None,
                        force: bool = False) -> tuple[list[ConfigVersion], dict[str, asyncio.Future[None]]]:
        """The stored rows (not those already at this config, unless ``force``) and, per connected
        device, a future done when it acknowledged (none with an external broker)."""
        return await self.configs.push_many(devices, config, actor=current_actor.get(), message=message,
                                            progress=progress, force=force)

    async def fleet_push(self, config: dict[str, Any], *, all_devices: bool = False,
                         labels: dict[str, str] | None = None, where: str | None = None, message: str = "",
                         force: bool = False,
                         delivery_timeout: float = 10.0, wait: float | None = None,
                         progress: Progress | None = None) -> FleetAnswer:
        """One config to many devices, answered per device: delivered (its own PUBACK), applied,
        rejected (with errors), offline; with ``wait``, after waiting that long for every report."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        first: list[float] = []

        def stored(state: dict[str, Any]) -> None:
            if not first:
                first.append(loop.time() - started)
            if progress is not None:
                progress(state)

        devices = await self.select(all_devices=all_devices, labels=labels, where=where)
        watch = FleetWatch(self.reports, devices)
        try:
            rows, deliveries = await self.push_many(devices, config, message=message, progress=stored, force=force)
            published = loop.time() - started
            watch.stored(rows)
            online = set(self.broker.online_devices()).intersection(row.device for row in rows)
            observable = self.broker.observes_deliveries

            await watch.wait(deliveries, delivery_timeout=delivery_timeout, report_timeout=wait,
                             progress=(lambda: progress(fleet_counts(watch, devices, rows, deliveries,
                                                                     observable=observable,
                                                                     online_at_publish=online)))
                             if progress else None)
            result = fleet_answer(watch, devices, rows, deliveries, observable=observable, online_at_publish=online)
        finally:
            watch.close()
        result["timings_ms"] = {"first_published": round((first or [published])[0] * 1000, 1),
                                "all_published": round(published * 1000, 1)}
        result["waited"] = wait
        return result

    async def preview_fleet_push(self, config: dict[str, Any], *, all_devices: bool = False,
                                 labels: dict[str, str] | None = None, where: str | None = None) -> PushPreview:
        """What ``fleet_push`` would store now (which devices get a new version, and the diff of the
        first), stored nowhere: the same selection and layer merge, read without a transaction. A
        schema is checked when the push stores, not here."""
        self.configs.check_size(config)
        devices = await self.select(all_devices=all_devices, labels=labels, where=where)
        rows = await self.worker.run(self.store.plan_push_many, devices, config)
        return {"targeted": len(devices), "change": len(rows), "unchanged": len(devices) - len(rows),
                "devices": [row.device for row in rows[:PREVIEW_DEVICES]], "more": max(0, len(rows) - PREVIEW_DEVICES),
                "example": await self.change_example(rows)}

    async def change_example(self, rows: list[ConfigVersion]) -> PushPreviewDiff | None:
        """The first planned version's change, as a diff from its device's current config."""
        if not rows:
            return None
        first = rows[0]
        old = await self.worker.run(self.store.current_config, first.device)
        return change_diff(first.device, first.version - 1, old, first.config)

    async def rollback(self, device: str, version: int, *, message: str = "") -> ConfigVersion:
        return await self.configs.rollback(device, version, actor=current_actor.get(), message=message)

    async def wait_for_report(self, device: str, version: int, timeout: float) -> ReportOutcome:
        return await self.reports.wait_for(device, version, timeout)

    def online_count(self) -> int:
        return len(self.broker.online_devices())

    async def kick(self, device: str) -> KickResult:
        self.store.require_device(device)
        result = await self.broker.kick(device)
        await self.worker.run(self.store.record_audit, current_actor.get(), "kick", device,
                              {"was_connected": result.kicked, "supported": result.supported})
        if result.kicked:
            self.events.count("kicks")
        return result

    async def clear_conflict(self, device: str) -> bool:
        self.store.require_device(device)
        cleared = self.broker.clear_conflict(device)
        await self.worker.run(self.store.record_audit, current_actor.get(), "clear_conflict", device,
                              {"had_conflict": cleared})
        return cleared

    async def status(self, device: str | None = None, labels: dict[str, str] | None = None, *,
                     state: str | None = None, sync: str | None = None, conflict: bool | None = None,
                     contains: str | None = None, after: str = "", limit: int | None = None,
                     where: str | None = None) -> list[StatusRow]:
        """One row per device, ordered by id (data only: times in RFC 3339 UTC), filtered by labels,
        state, sync, conflict, a part of the id and a ``where`` filter (docs/where.md);
        ``after``/``limit`` read one page without building the rest."""
        await self._presence_settled()
        store = self.store
        matcher = parse_where(where) if where else None
        with_reported = matcher is not None and "reported" in matcher.roots
        if device is not None:
            source, _ = await self.worker.run(store.status_source, device=device, with_reported=with_reported)
            if not source:
                raise UnknownDevice(device)
        rows: list[StatusRow] = []
        now = time.time()
        batch = -1 if limit is None else max(2 * limit, 500)
        seen = 0
        while True:
            if device is None:
                source, last = await self.worker.run(store.status_source, after=after, labels=labels, batch=batch,
                                                     with_reported=with_reported)
            else:
                last = None
            for d, have, desired, applied, applied_at, rejected, error, drift, reported_at, document in source:
                if contains and contains not in d:
                    continue
                view = self.broker.session(d, now)
                row_sync = self._sync_of(d, desired, applied, rejected, bool(drift))
                schema_error = self.schemas.invalid.get(d)
                row_state = view.state
                if (state and row_state != state) or (sync and row_sync != sync) or (
                        conflict is not None and view.conflict != conflict):
                    continue
                if matcher is not None:
                    seen += 1
                    if seen % 2000 == 0:
                        await asyncio.sleep(0)  # 100,000 devices filtered: other connections get their turns
                    fields: dict[str, Any] = {
                        "id": d, "labels": have, "state": row_state, "sync": row_sync, "online": view.online,
                        "version": desired, "applied_version": applied}
                    if document is not None:
                        fields["reported"] = json.loads(document)
                    if not matcher.matches(fields):
                        continue
                rows.append({
                    "device": d, "labels": have, "state": row_state, "online": view.online, "epoch": view.epoch,
                    "since": iso(view.since) if view.since else None, "remote": view.remote, "reason": view.reason,
                    "desired_version": desired, "takeovers": view.takeovers_last_hour,
                    "conflict": view.conflict, "conflict_remotes": list(view.conflict_remotes),
                    "quarantined_until": iso(view.quarantined_until) if view.quarantined_until else None,
                    "applied_version": applied, "applied_at": utc_text(applied_at), "sync": row_sync,
                    "reported_at": utc_text(self.reports.arrival_of(d) or reported_at),
                    "error": error if row_sync == "rejected" else None, "rejected_version": rejected,
                    "undeliverable": self.configs.undeliverable.get(d), "schema_error": schema_error,
                    "session": self._session_of(d, now),
                })
                if limit is not None and len(rows) >= limit:
                    return rows
            if last is None:
                return rows
            after = last

    def _sync_of(self, device: str, desired: int, applied: int | None, rejected: int | None, drift: bool) -> str:
        """A device's sync state (docs/protocol.md#reports), for status rows and the summary alike:
        ``invalid`` when its config breaks a schema in force (set with --force), else from its reports."""
        if device in self.schemas.invalid:
            return "invalid"
        return DeviceReports(applied_version=applied, rejected_version=rejected).sync(desired, drift)

    def _session_of(self, device: str, now: float) -> SessionInfo | None:
        """The device's persistent MQTT session: its expiry, and when it ends (None while connected)."""
        kept = self.broker.persistent_session(device, now)
        if kept is None:
            return None
        expiry, ends = kept
        return {"persistent": True, "expiry": expiry, "expires_at": iso(int(ends)) if ends is not None else None}

    async def _presence_settled(self) -> None:
        """Counts are true once the broker has said who is connected: behind an external broker a
        start or a failover learns it from the broker's events or retained announcements, a second
        or so later, and a count before that would say the fleet is offline. Until then a status or
        a summary waits (at most ``PRESENCE_WAIT``); the embedded broker knows at once."""
        if not self.presence_known.is_set():
            try:
                await asyncio.wait_for(self.presence_known.wait(), PRESENCE_WAIT)
            except TimeoutError:
                log.info("service.presence_unknown waited=%.0fs: answered from the table as it is", PRESENCE_WAIT)

    async def summary(self) -> FleetSummary:
        """Fleet counts (what ``status`` rows would add up to), without building the rows; read in
        batches, so a fleet of 100,000 never holds the store's thread for long (the sampler asks it
        every minute)."""
        await self._presence_settled()
        counted: list[tuple[str, str, bool]] = []
        after: str | None = ""
        while after is not None:
            source, after = await self.worker.run(self.store.status_source, after=after, batch=SUMMARY_BATCH)
            now = time.time()
            for d, _, desired, applied, _, rejected, _, drift, _, _ in source:
                state, conflict = self.broker.presence(d, now)
                counted.append((state, self._sync_of(d, desired, applied, rejected, bool(drift)), conflict))
        return fleet_summary(counted)

    async def record_fleet_point(self) -> None:
        """Keep this minute's fleet counts (the sampler calls it once a minute)."""
        summary = await self.summary()
        sync = summary["sync"]
        counts = {"devices": summary["devices"], "online": summary["online"], "conflicts": summary["conflicts"],
                  "in_sync": sync["in_sync"], "pending": sync["pending"], "rejected": sync["rejected"],
                  "drift": sync["drift"]}
        await self.worker.run(self.store.record_point, int(time.time() // 60), counts)

    async def fleet_series(self, window: str = "24h") -> FleetSeries:
        """The fleet over the last day (a point a minute) or week (one per 10 minutes: averages)."""
        span, step = SERIES_WINDOWS[window]
        now = int(time.time() // 60)
        rows = await self.worker.run(self.store.series, now - span + 1, step)
        return {"window": window, "step_s": step * 60, "points": [
            {"at": iso(minute * 60), "devices": devices, "online": online, "in_sync": in_sync, "pending": pending,
             "rejected": rejected, "drift": drift, "conflicts": conflicts}
            for minute, devices, online, in_sync, pending, rejected, drift, conflicts in rows]}

    async def presence_timeline(self, device: str, window: str = "24h") -> PresenceTimeline:
        """A device's presence over the last day or week from the stored history: segments (online,
        offline: ``unknown`` before the first change kept) and marks (takeover, conflict)."""
        self.store.require_device(device)
        end = time.time()
        start = end - SERIES_WINDOWS[window][0] * 60
        before, rows = await self.worker.run(self.store.presence_timeline, device, start)
        segments: list[TimelineSegment] = []
        marks: list[TimelineMark] = []
        state = "unknown" if before is None else "offline" if before[1] == "offline" else "online"
        since = start
        for at, kind, reason, epoch in rows:
            if kind == "conflict" or kind == "takeover":
                marks.append({"at": iso(at), "state": kind, "reason": reason, "epoch": epoch})
            new = "offline" if kind == "offline" else "online" if kind in ("online", "takeover") else state
            if new != state:
                segments.append({"from": iso(since), "to": iso(at), "state": state})
                state, since = new, at
        segments.append({"from": iso(since), "to": iso(end), "state": state})
        return {"device": device, "window": window, "from": iso(start), "to": iso(end), "segments": segments,
                "marks": marks}

    # ---- rollouts --------------------------------------------------------------------------------

    async def start_rollout(self, config: dict[str, Any], *, all_devices: bool = False,
                            labels: dict[str, str] | None = None, waves: list[float] | None = None,
                            wave_size: int | None = None, max_rejected: str = "1", min_applied: float = 90.0,
                            wave_timeout: float = 300.0, pause: float = 0.0, message: str = "",
                            layer: dict[str, Any] | None = None, where: str | None = None) -> RolloutStatus:
        """A staged rollout of ``config`` (as each target's own layer), or of a layer change
        (``layer``: name, content, labels, priority); see docs/rollouts.md."""
        policy = self._rollout_policy(all_devices=all_devices, labels=labels, where=where, layer=layer, waves=waves,
                                      wave_size=wave_size, max_rejected=max_rejected, min_applied=min_applied,
                                      wave_timeout=wave_timeout, pause=pause)
        return await self.rollouts.start(config, all_devices=all_devices, labels=labels, where=where,
                                         waves=waves if wave_size is None else None, wave_size=wave_size,
                                         policy=policy, message=message, layer=layer)

    async def preview_rollout(self, config: dict[str, Any], *, all_devices: bool = False,
                              labels: dict[str, str] | None = None, waves: list[float] | None = None,
                              wave_size: int | None = None, max_rejected: str = "1", min_applied: float = 90.0,
                              wave_timeout: float = 300.0, pause: float = 0.0,
                              layer: dict[str, Any] | None = None, where: str | None = None) -> RolloutPreview:
        """What ``start_rollout`` would do with these arguments, started nowhere (docs/rollouts.md)."""
        self._rollout_policy(all_devices=all_devices, labels=labels, where=where, layer=layer, waves=waves,
                             wave_size=wave_size, max_rejected=max_rejected, min_applied=min_applied,
                             wave_timeout=wave_timeout, pause=pause)
        return await self.rollouts.preview(config, all_devices=all_devices, labels=labels, where=where,
                                           waves=waves if wave_size is None else None, wave_size=wave_size,
                                           layer=layer)

    def _rollout_policy(self, *, all_devices: bool, labels: dict[str, str] | None, where: str | None,
                        layer: dict[str, Any] | None, waves: list[float] | None, wave_size: int | None,
                        max_rejected: str, min_applied: float, wave_timeout: float, pause: float) -> Policy:
        """A rollout's arguments checked, as one policy (ValidationFailed naming what is wrong)."""
        if not all_devices and not labels and not where and layer is None:
            raise ValidationFailed("select the rollout's devices with --all, --label k=v or --where (or stage a "
                                   "--layer change)")
        if layer is not None and (all_devices or labels or where):
            raise ValidationFailed("a layer change's targets are the devices it alters: no --all, --label or --where "
                                   "with it")
        if where:
            parse_where(where)  # said now, before anything is planned
        if layer is not None:
            self.configs.check_size(layer["content"] or {})
        if waves is not None and wave_size is not None:
            raise ValidationFailed("give --waves or --wave-size, not both")
        try:
            limit, percent = parse_max_rejected(max_rejected)
            if waves is not None:
                check_waves(waves)
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from exc
        if not 0 <= min_applied <= 100:
            raise ValidationFailed("--min-applied is a percentage (0-100)")
        return Policy(max_rejected=limit, rejected_percent=percent, min_applied=min_applied,
                      wave_timeout=wave_timeout, pause=pause)

    async def rollout_status(self, rollout_id: str) -> RolloutStatus:
        return await self.rollouts.status(rollout_id)

    async def list_rollouts(self) -> list[RolloutSummary]:
        return await self.rollouts.list()

    async def pause_rollout(self, rollout_id: str) -> RolloutStatus:
        await self.rollouts.pause(rollout_id)
        return await self.rollouts.status(rollout_id)

    async def resume_rollout(self, rollout_id: str) -> RolloutStatus:
        await self.rollouts.resume(rollout_id)
        return await self.rollouts.status(rollout_id)

    async def abort_rollout(self, rollout_id: str, *, revert: bool = False) -> RolloutStatus:
        await self.rollouts.abort(rollout_id, revert=revert)
        return await self.rollouts.status(rollout_id)

    # ---- layers ----------------------------------------------------------------------------------

    async def set_layer(self, name: str, content: dict[str, Any], *, labels: dict[str, str] | None = None,
                        priority: int | None = None, message: str = "", force: bool = False,
                        where: str | None = None, if_version: int | None = None) -> LayerChange:
        """A new version of a layer (``fleet``, or a label layer with ``labels`` and ``priority``); in
        the same transaction a new version for exactly the devices whose config changes, then published.
        Refused if a device added afterwards would get a config its schemas refuse, unless ``force``
        (the answer's ``new_devices_invalid`` then says which case breaks). ``if_version``: stored
        only if that is the layer's current version (a concurrent edit is refused, VersionConflict)."""
        self.configs.check_size(content)
        if where:
            parse_where(where, standing=True)
        return await self._change_layer(name, content, labels=labels, priority=priority, message=message, force=force,
                                        where=where, if_version=if_version)

    async def preview_layer(self, name: str, content: dict[str, Any], *, labels: dict[str, str] | None = None,
                            priority: int | None = None, where: str | None = None) -> LayerPreview:
        """What ``set_layer`` would do, stored nowhere: the devices whose config changes (the first's
        diff), and what their schemas would say of it, now and for a device added later."""
        self.configs.check_size(content)
        if where:
            parse_where(where, standing=True)
        store = self.store
        plan = await self.worker.run(lambda: store.layer_change_plan(name, content, selector=labels, priority=priority,
                                                                     where=where))
        now = await self.worker.run(self.schemas.plan_errors, plan)  # as set_layer checks it
        later = await self.worker.run(self.schemas.new_device_errors, name, content, labels=labels, priority=priority,
                                      where=where)
        return {"layer": name, "change": len(plan), "devices": [d for d, *_ in plan[:PREVIEW_DEVICES]],
                "more": max(0, len(plan) - PREVIEW_DEVICES), "example": change_diff(*plan[0]) if plan else None,
                "invalid": [SchemaViolation.line(e) for e in now],
                "new_devices_invalid": [SchemaViolation.line(e) for e in later]}

    async def remove_layer(self, name: str, *, message: str = "", force: bool = False) -> LayerChange:
        return await self._change_layer(name, None, labels=None, priority=None, message=message, force=force)

    async def _change_layer(self, name: str, content: dict[str, Any] | None, *, labels: dict[str, str] | None,
                            priority: int | None, message: str, force: bool, where: str | None = None,
                            if_version: int | None = None) -> LayerChange:
        # The service's own task: a caller that goes away (a CLI interrupted, an HTTP client gone)
        # does not leave the change half-way through the fleet.
        return await asyncio.shield(self._tasks.spawn(self._change_layer_now(
            name, content, labels=labels, priority=priority, message=message, force=force, where=where,
            if_version=if_version)))

    async def _change_layer_now(self, name: str, content: dict[str, Any] | None, *, labels: dict[str, str] | None,
                                priority: int | None, message: str, force: bool, where: str | None,
                                if_version: int | None) -> LayerChange:
        async with self.configs.schema_lock:
            future = await self.worker.run(self.schemas.new_device_errors, name, content, labels=labels,
                                           priority=priority, where=where)
            # every device checked before the first chunk is stored: all or nothing
            now = await self.worker.run(self.schemas.layer_change_plan_errors, name, content, labels=labels,
                                        priority=priority, where=where)
            if now or (future and not force):  # said with the current devices it breaks too, if any
                raise SchemaViolation(now + ([] if force else future), what="the layer was not stored" + (
                    "" if now else " (henge layer set --force stores it anyway; every such device add is then "
                                   "refused)"))
            version, rows = await self.configs.change_layer(name, content, actor=current_actor.get(), message=message,
                                                            labels=labels, priority=priority, where=where,
                                                            if_version=if_version)
        removed = content is None
        self.events.emit("layer_removed" if removed else "layer_set", None, layer=name, version=version,
                         devices=len(rows))
        warnings = [SchemaViolation.line(e) for e in future]
        result: LayerChange = {"layer": name, "version": version, "devices": len(rows)}
        if removed:
            result["removed"] = True
        else:
            result["versions"] = {row.device: row.version for row in rows}
        if warnings:
            result["new_devices_invalid"] = warnings
        return result

    async def rollback_layer(self, name: str, version: int, *, message: str = "") -> LayerChange:
        """The layer's content (and labels, priority) of ``version``, as a new version."""
        history = await self.layer_history(name)
        old = next((h for h in history if h["version"] == version), None)
        if old is None or old["content"] is None:
            raise UnknownVersion(f"layer {name!r} has no version {version} with content")
        return await self.set_layer(name, old["content"], labels=old["labels"], priority=old["priority"],
                                    message=message or f"rollback to version {version}")

    async def list_layers(self) -> list[LayerInForce]:
        layers = await self.worker.run(self.store.layers)
        ordered = self.store.layers_for({}, layers)[:1] + sorted(
            (layer for name, layer in layers.items() if name != "fleet"),
            key=lambda layer: (layer.priority, layer.name))
        return [{"layer": layer.name, "version": layer.version, "labels": layer.selector, "priority": layer.priority,
                 "message": layer.message, "where": layer.where or None} for layer in ordered]

    async def layer_history(self, name: str) -> list[LayerVersion]:
        entries = await self.worker.run(self.store.layer_history, name)
        for entry in entries:
            entry["created_at"] = utc_text(entry["created_at"])
        return entries

    async def get_layer(self, name: str, version: int | None = None) -> LayerVersion:
        history = await self.layer_history(name)
        entry = history[-1] if version is None else next((h for h in history if h["version"] == version), None)
        if entry is None:
            raise UnknownVersion(f"layer {name!r} has no version {version}")
        return entry

    async def diff(self, device: str, a: int, b: int) -> Diff:
        """Two versions of a device's config: a unified diff, whether they are the same, and both."""
        old, new = await self.get_version(device, a), await self.get_version(device, b)
        return {"diff": unified_diff(old.config, new.config, f"{device}@{a}", f"{device}@{b}"),
                "same": old.sha256 == new.sha256, "a": old.config, "b": new.config}

    async def layer_diff(self, name: str, a: int, b: int) -> Diff:
        """Two versions of a layer: a unified diff of their content, whether they are the same
        (content, labels and priority), and both versions."""
        old, new = await self.get_layer(name, a), await self.get_layer(name, b)
        same = all(old[k] == new[k] for k in ("content", "labels", "priority"))
        return {"diff": unified_diff(old["content"], new["content"], f"{name}@{a}", f"{name}@{b}"), "same": same,
                "a": old, "b": new}

    async def reconcile(self, device: str) -> Reconciled:
        """Deliver the device's current version again, as it is (no new version): a device whose
        config drifted (edited on the device) gets the real one back; henge's agent rewrites its
        file when the file is not what the version says."""
        sync = (await self.status(device))[0]["sync"]
        row = await self.worker.run(self.store.get_version, device)
        online = self.broker.session(device, time.time()).online
        self.configs.publish(row)
        await self.worker.run(self.store.record_audit, current_actor.get(), "reconcile", device,
                              {"version": row.version, "sync": sync, "online": online})
        self.events.emit("config_redelivered", device, version=row.version, sync=sync)
        return {"device": device, "version": row.version, "online": online, "sync": sync}

    async def reported(self, device: str, *, history: bool = False) -> ReportedState:
        """What the device last reported it is and runs; with ``history``, its kept documents."""
        found = await self.worker.run(self.store.reported_of, device, history)
        answer: ReportedState = {
            "device": device, "document": found["document"], "seq": found["seq"],
            "changed_at": utc_text(found["changed_at"]),
            "at": utc_text(self.reports.arrival_of(device) or found["at"]), "epoch": found["epoch"]}
        if history:
            answer["history"] = [{"seq": h["seq"], "at": utc_text(h["at"]) or "", "epoch": h["epoch"],
                                  "document": h["document"]} for h in found["history"]]
        return answer

    async def explain(self, device: str, version: int | None = None) -> list[Explained]:
        """Per leaf of the device's config: which layer set it."""
        return await self.worker.run(self.store.explain, device, version)

    # ---- schemas ---------------------------------------------------------------------------------

    async def set_schema(self, labels: dict[str, str], document: Any, *, force: bool = False,
                         if_version: int | None = None) -> SchemaChange:
        """The JSON Schema (2020-12) every config of the devices with ``labels`` ({}: all) must
        satisfy; refused if current configs break it, unless ``force`` (they show ``invalid``);
        with ``if_version``, refused (VersionConflict) unless the schema is at that version."""
        async with self.configs.schema_lock:
            result = await self.worker.run(self.schemas.put, selector_of(labels), document, actor=current_actor.get(),
                                           force=force, if_version=if_version)
        self.events.emit("schema_set", None, schema=result["schema"], version=result["version"],
                         invalid_devices=len(result["invalid_devices"]))
        return result

    async def preview_schema(self, labels: dict[str, str], document: Any) -> SchemaPreview:
        """What ``set_schema`` would say of this document, stored nowhere (InvalidSchema if it is
        not a JSON Schema 2020-12 document)."""
        return await self.worker.run(self.schemas.preview, selector_of(labels), document)

    async def remove_schema(self, labels: dict[str, str]) -> SchemaChange:
        async with self.configs.schema_lock:
            result = await self.worker.run(self.schemas.remove, selector_of(labels), actor=current_actor.get())
        self.events.emit("schema_removed", None, schema=result["schema"], version=result["version"])
        return result

    async def list_schemas(self) -> list[SchemaInForce]:
        return await self.worker.run(self.schemas.listing)

    async def get_schema(self, labels: dict[str, str], version: int | None = None) -> SchemaVersion:
        entry = await self.worker.run(self.schemas.get, selector_of(labels), version)
        entry["created_at"] = utc_text(entry["created_at"])
        return entry

    async def schema_history(self, labels: dict[str, str]) -> list[SchemaVersion]:
        selector = selector_of(labels)
        entries = await self.worker.run(self.store.schema_history, selector)
        if not entries:
            raise ValidationFailed(f"no schema {display(selector)!r}")
        for entry in entries:
            entry["schema"], entry["created_at"] = display(selector), utc_text(entry["created_at"])
        return entries

    async def backup(self, target: str) -> BackupResult:
        """A consistent copy of the store, written by the service (on its machine) to ``target``."""
        from pathlib import Path

        path = Path(target)
        if not path.is_absolute():
            raise ValidationFailed(f"the backup path must be absolute (it is on the service's machine): {target!r}")
        try:
            size = await self.worker.run(self.store.backup, path)
        except OSError as exc:
            raise ValidationFailed(f"cannot write the backup {target}: {exc.strerror or exc}") from exc
        await self.worker.run(self.store.record_audit, current_actor.get(), "backup", None, {"path": target})
        return {"path": target, "bytes": size}

    async def create_token(self, name: str, role: str) -> TokenCreated:
        """A bearer token for the HTTP API; the token itself is in this answer only."""
        token_id, token = await self.worker.run(self.store.create_token, name, role, actor=current_actor.get())
        self.events.emit("token_created", None, name=name, role=role)
        return {"id": token_id, "name": name, "role": role, "token": token}

    async def list_tokens(self) -> list[TokenInfo]:
        tokens = await self.worker.run(self.store.list_tokens)
        for token in tokens:
            token["created_at"] = utc_text(token["created_at"])
        return tokens

    async def revoke_token(self, ref: str) -> TokenRevoked:
        result = await self.worker.run(self.store.revoke_token, ref, actor=current_actor.get())
        self.events.emit("token_revoked", None, name=result["name"])
        return result

    # ---- onboarding by claim --------------------------------------------------------------------------

    async def create_claim(self, name: str, labels: dict[str, str], uses: int, expires_in: float, *,
                           broker: str | None = None, ca: str | None = None) -> ClaimCreated:
        """A claim credential for ``uses`` devices, valid ``expires_in`` seconds; the secret (and the
        claim file holding it) is in this answer only (docs/onboarding.md). ``ca``: a claim CA (PEM):
        a device with a certificate it signed may claim its certificate's CN without the secret."""
        expires_at = time.time() + expires_in
        subject = None
        if ca is not None:
            if not self._claim_tls:
                raise ValidationFailed("a claim CA needs a TLS listener that asks for client certificates "
                                       "(tls_client_auth: optional or required)")
            subject = ca_subject(ca)
            trust_claim_ca(self._claim_tls, ca, subject, new=True)
            if self._listener_trust is not None:
                self._listener_trust(ca)
        claim_id, secret = await self.worker.run(self.store.create_claim, name, labels, uses, expires_at,
                                                 actor=current_actor.get(), ca_pem=ca, ca_subject=subject)
        self.events.emit("claim_created", None, claim=claim_id, name=name, uses=uses)
        said: list[IdentitySync] = []
        await self._tell_broker(said, claims={claim_user(claim_id): secret})
        if broker is None:
            broker = self._device_url()
        credential = {"claim": claim_id, "secret": secret, "broker": broker,
                      "topic_prefix": self.settings.topic_prefix}
        return {"id": claim_id, "name": name, "labels": labels, "uses": uses, "expires_at": iso(expires_at),
                "secret": secret, "credential": credential, "broker": broker_note(said)}

    def _device_url(self) -> str | None:
        """Where devices connect: the first device listener; behind an external broker, the device
        listener broker-config wrote (None when it did not: a broker configured by other means);
        one on every interface by this machine's name."""
        if self.settings.external_broker:
            try:
                listener = json.loads((self.settings.data_dir / BROKER_FILE).read_text())["device_listener"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            host, _, port = str(listener).rpartition(":")
        else:
            addresses = self.broker.addresses()
            if not addresses:
                return None
            host, port = addresses[0][0], str(addresses[0][1])
        host = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        return f"mqtt://{host}:{port}"

    async def list_claims(self) -> list[ClaimInfo]:
        now = time.time()
        out: list[ClaimInfo] = []
        for c in await self.worker.run(self.store.list_claims):
            state = ("revoked" if c["revoked_at"] else "expired" if now >= c["expires_at"] else
                     "used_up" if c["used"] >= c["uses"] else "active")
            out.append({"id": c["id"], "name": c["name"], "labels": c["labels"], "uses": c["uses"], "used": c["used"],
                        "left": max(0, c["uses"] - c["used"]), "expires_at": iso(c["expires_at"]), "state": state,
                        "ca": c["ca"],
                        "created_at": utc_text(c["created_at"]), "created_by": c["created_by"]})
        return out

    async def revoke_claim(self, ref: str) -> ClaimRevoked:
        result = await self.worker.run(self.store.revoke_claim, ref, actor=current_actor.get())
        self.events.emit("claim_revoked", None, claim=result["id"], name=result["name"])
        said: list[IdentitySync] = []  # its claiming connections closed by the broker that knows it
        await self._tell_broker(said, claims_removed=[claim_user(result["id"])])
        return result | {"broker": broker_note(said)}

    def verify_token(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of a live HTTP API token, else None; from memory, on the loop."""
        return self.store.verify_token(token)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters and gauges copied on the loop, for a scrape from another thread."""
        return {"counters": dict(self.events.counters), "online": self.online_count(), **self.broker.stats()}


