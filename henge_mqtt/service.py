"""The service: the store, the embedded broker and the admin protocol, wired together.

A gateway application embeds it as ``async with HengeService(settings) as service: ...`` and may
call the same operations the CLI reaches over MQTT (``service.push(...)`` and friends).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import difflib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from . import models
from .broker import BrokerLimits, HengeBroker, Principal
from .errors import (
    ConfigTooLarge,
    DuplicateDevice,
    HengeError,
    InvalidDeviceId,
    ServiceUnavailable,
    UnknownDevice,
    UnknownVersion,
    ValidationFailed,
    WaitTimeout,
)
from .external import ExternalBroker
from .models import AdminReply, AdminRequest, ConfigVersion, Event, Presence, Report, canonical_json, rfc3339
from .paths import ADMIN_FILE, SERVICE_FILE
from .sessions import Action, Emit, PresenceChange, SaveEpoch
from .settings import Settings
from .store import DeviceReports, Store
from .tasks import TaskSet
from .topics import Topics

log = logging.getLogger(__name__)

EventListener = Callable[[Event], None]
# Who is acting: the admin identity of the request being served, else the embedding application.
current_actor: contextvars.ContextVar[str] = contextvars.ContextVar("henge_actor", default="library")
_ROUTINE_EVENTS = frozenset({"connected", "disconnected", "report"})
Progress = Callable[[dict[str, Any]], None]


def _no_progress(_: dict[str, Any]) -> None:
    return None


def _iso(ts: float) -> str:
    return rfc3339(datetime.fromtimestamp(ts, UTC))


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class HengeService:
    """One running henge: store + embedded broker + admin protocol + presence."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._store: Store | None = None
        self._broker: HengeBroker | ExternalBroker | None = None
        self._listeners: list[EventListener] = []
        self._tasks = TaskSet(log, "admin.request_failed")
        self.admin_secret = ""
        self.counters: dict[str, int] = {}
        self._waiters: dict[str, set[_ReportWaiter]] = {}
        self.on_delivery_started: Callable[[asyncio.Task[Any]], None] | None = None
        self._pending_epochs: dict[str, int] = {}
        self._epochs_saved: asyncio.Future[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> HengeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise ServiceUnavailable("the service is not running")
        return self._store

    @property
    def broker(self) -> HengeBroker | ExternalBroker:
        if self._broker is None:
            raise ServiceUnavailable("the service is not running")
        return self._broker

    async def start(self) -> None:
        data_dir = self.settings.data_dir
        self._store = Store(data_dir)
        try:
            self._ensure_admin(data_dir)
            broker: HengeBroker | ExternalBroker
            if self.settings.external_broker:
                broker = ExternalBroker(
                    self.settings.external_broker,
                    hooks=self,
                    topics=self.topics,
                    sessions=self.settings.sessions.to_table_settings(),
                    username=self.settings.admin_name,
                    password=self.admin_secret,
                    tls_context=self.settings.external_tls_context(),
                )
            else:
                broker = HengeBroker(
                    self.settings.broker_config(),
                    hooks=self,
                    topics=self.topics,
                    sessions=self.settings.sessions.to_table_settings(),
                    limits=BrokerLimits(
                        max_keepalive=self.settings.max_keepalive,
                        max_packet=self.settings.max_packet_bytes,
                        max_inflight=self.settings.max_inflight,
                        publish_rate=self.settings.device_publish_rate,
                        publish_burst=self.settings.device_publish_burst,
                        tls_client_auth=self.settings.tls_client_auth,
                    ),
                )
            self._broker = broker
            for device, epoch in self.store.epochs().items():
                broker.table.seed(device, epoch)
            self._republish_all()
            await broker.start()
        except BaseException:
            self._store.close()
            self._store = None
            self._broker = None
            raise
        host, port = self.address
        write_private(
            data_dir / SERVICE_FILE,
            json.dumps({"host": host, "port": port, "topic_prefix": self.settings.topic_prefix,
                        "admin_name": self.settings.admin_name, "pid": os.getpid()}),
        )
        log.info("service.started host=%s port=%d data=%s", host, port, data_dir)

    async def stop(self) -> None:
        if self._broker is None or self._store is None:
            return
        await self._broker.shutdown()
        if self._epochs_saved is not None:
            self._flush_epochs()
        await self._tasks.cancel_all(1.0)
        self._store.close()
        with contextlib.suppress(OSError):
            (self.settings.data_dir / SERVICE_FILE).unlink()
        self._broker = None
        self._store = None
        log.info("service.stopped")

    @property
    def address(self) -> tuple[str, int]:
        addresses = self.broker.addresses()
        if not addresses:
            raise ServiceUnavailable("the broker has no TCP listener")
        return addresses[0]

    def _ensure_admin(self, data_dir: Path) -> None:
        path = data_dir / ADMIN_FILE
        name = self.settings.admin_name
        secret = ""
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("name") == name:
                    secret = str(saved["secret"])
            except (OSError, ValueError, KeyError) as exc:
                raise HengeError(f"cannot read admin credentials {path}: {exc}") from exc
        if not secret:
            secret = secrets.token_urlsafe(24)
            write_private(path, json.dumps({"name": name, "secret": secret}))
        self.store.ensure_admin(name, secret)
        self.admin_secret = secret

    def _republish_all(self) -> None:
        """amqtt keeps retained messages in memory only: the store is the truth, replay it."""
        count = 0
        for row in self.store.current_versions():
            self._publish_snapshot(row)
            count += 1
        now = time.time()
        for device in self.store.epochs():
            view = self.broker.table.view(device, now)
            self._publish_presence(Presence(device=device, state="offline", epoch=view.epoch,
                                            since=_iso(now), reason="server_start", remote=None))
        log.info("service.republished snapshots=%d", count)

    # ---- events --------------------------------------------------------------------------------

    def add_event_listener(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, type_: str, device: str | None = None, **data: Any) -> None:
        """Log, publish on the events topic, and call in-process listeners: only what is wanted.

        Connects and disconnects are the bulk of events in a fleet; they are built only if
        someone subscribes or listens, and logged at debug level.
        """
        level = logging.DEBUG if type_ in _ROUTINE_EVENTS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "event.%s device=%s %s", type_, device, json.dumps(data, default=str, sort_keys=True))
        broker = self._broker
        wanted = broker is not None and broker.has_subscribers(self.topics.events)
        if not wanted and not self._listeners:
            return
        event = Event(type=type_, at=rfc3339(models.utc_now()), device=device, data=data)
        if wanted and broker is not None:
            broker.publish(self.topics.events, event.model_dump_json().encode(), qos=0)
        for listener in list(self._listeners):
            listener(event)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # ---- broker hooks --------------------------------------------------------------------------

    def authenticate(
        self, username: str | None, password: str | None, client_id: str, cert_cn: str | None = None
    ) -> Principal | None:
        tls = self.settings.tls_client_auth
        if username and username == self.settings.admin_name:
            ok = password is not None and self.store.verify_admin(username, password)
            return Principal("admin", username) if ok else None
        device = username or client_id
        if client_id != device or not self.store.has_device(device):
            return None
        if cert_cn is not None and cert_cn != device:
            log.info("auth.cert_mismatch device=%s cn=%s", device, cert_cn)
            return None  # a device certificate is good for its own identity only
        if tls == "required" and cert_cn is None:
            return None
        if cert_cn is not None and self.settings.tls_cert_replaces_password and password is None:
            return Principal("device", device)
        if username is None or password is None:
            return None
        return Principal("device", device) if self.store.verify_device(device, password) else None

    def session_actions(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, PresenceChange):
                self._on_presence(action)
            elif isinstance(action, SaveEpoch):
                self._queue_epoch(action.device, action.epoch)
            elif isinstance(action, Emit):
                self._count(action.type)
                self.emit(action.type, action.device, **dict(action.data))

    def _queue_epoch(self, device: str, epoch: int) -> None:
        self._pending_epochs[device] = max(epoch, self._pending_epochs.get(device, 0))
        if self._epochs_saved is None:
            loop = asyncio.get_running_loop()
            self._epochs_saved = loop.create_future()
            loop.call_soon(self._flush_epochs)

    def _flush_epochs(self) -> None:
        pending, self._pending_epochs = self._pending_epochs, {}
        saved, self._epochs_saved = self._epochs_saved, None
        try:
            if self._store is not None:
                self._store.save_epochs(pending)
        except Exception as exc:  # the waiting connects fail; nothing is acknowledged
            log.error("store.epochs_failed error=%s", exc)
            if saved is not None and not saved.done():
                saved.set_exception(exc)
            return
        if saved is not None and not saved.done():
            saved.set_result(None)

    def epochs_durable(self) -> Awaitable[None]:
        if self._epochs_saved is not None:
            return asyncio.shield(self._epochs_saved)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _on_presence(self, change: PresenceChange) -> None:
        if not self.store.has_device(change.device):
            return
        topic = self.topics.presence(change.device)
        if change.reason == "server_shutdown" and not self.broker.has_subscribers(topic):
            return  # retained messages die with the broker: only live subscribers need to hear it
        # The Presence model's JSON, written out by hand: this runs for every connect of a fleet.
        payload = json.dumps(
            {"device": change.device, "state": "online" if change.online else "offline", "epoch": change.epoch,
             "since": _iso(change.since), "reason": change.reason, "remote": change.remote},
            separators=(",", ":"), ensure_ascii=False,
        ).encode()
        self.broker.publish(topic, payload, qos=1, retain=True)
        if change.online:
            self._count("connects")
        if change.reason == "keepalive_timeout":
            self._count("keepalive_timeouts")
        self.emit("connected" if change.online else "disconnected", change.device,
                  epoch=change.epoch, reason=change.reason, remote=change.remote)

    def _publish_presence(self, presence: Presence) -> None:
        self.broker.publish(self.topics.presence(presence.device), presence.to_payload(), qos=1, retain=True)

    def message(self, principal: Principal, topic: str, payload: bytes) -> None:
        if principal.kind == "admin" and topic == self.topics.admin_requests:
            self._tasks.spawn(self._handle_admin(payload, principal.name))
        elif principal.kind == "device" and topic == self.topics.report(principal.name):
            self.handle_report(principal.name, payload)

    # ---- reports (the device side) -------------------------------------------------------------

    def handle_report(self, device: str, payload: bytes) -> None:
        """Validate and record a device's report; anything wrong is logged, counted and dropped."""
        if len(payload) > self.settings.max_report_bytes:
            self._bad_report(device, f"{len(payload)} bytes, over max_report_bytes")
            return
        try:
            report = Report.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            self._bad_report(device, f"{'.'.join(map(str, first['loc'])) or 'payload'}: {first['msg']}")
            return
        desired = self.store.get_device(device).desired_version
        if report.version > desired:
            self._bad_report(device, f"version {report.version} is newer than the desired version {desired}")
            return
        self.store.record_report(device, report.version, report.status, report.error)
        self._count(f"reports_{report.status}")
        self.emit("report", device, version=report.version, status=report.status, error=report.error)
        for waiter in list(self._waiters.get(device, ())):
            waiter.offer(report)

    def _bad_report(self, device: str, why: str) -> None:
        self._count("reports_invalid")
        log.warning("report.invalid device=%s problem=%s", device, why)

    async def wait_for_report(self, device: str, version: int, timeout: float) -> dict[str, Any]:
        """Until ``device`` reports ``version`` applied or rejected; raise WaitTimeout otherwise."""
        if version < 1:
            raise UnknownVersion(f"device {device!r} has no version {version}")
        desired = self.store.get_device(device).desired_version
        if version > desired:
            raise UnknownVersion(f"device {device!r} has no version {version} (current is {desired})")
        known = self.store.device_reports(device)
        if known.applied_version is not None and known.applied_version >= version:
            return {"device": device, "version": version, "status": "applied", "error": None}
        if known.rejected_version == version:
            return {"device": device, "version": version, "status": "rejected", "error": known.rejected_error}
        waiter = _ReportWaiter(version)
        self._waiters.setdefault(device, set()).add(waiter)
        try:
            report = await asyncio.wait_for(waiter.future, timeout)
        except TimeoutError:
            online = self.broker.table.current_epoch(device) is not None
            state = "online but did not report it" if online else "offline"
            raise WaitTimeout(
                f"{device} did not report version {version} within {timeout:g} s: the device is {state}"
            ) from None
        finally:
            self._waiters[device].discard(waiter)
            if not self._waiters[device]:
                del self._waiters[device]
        return {"device": device, "version": version, "status": report.status, "error": report.error}

    # ---- admin protocol ------------------------------------------------------------------------

    async def _handle_admin(self, payload: bytes, actor: str) -> None:
        current_actor.set(actor)  # this task's context only
        try:
            request = AdminRequest.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("admin.bad_request error=%s", exc.errors()[0]["msg"])
            return
        if not request.reply_to.startswith(self.topics.admin_reply("")):
            log.warning("admin.bad_reply_to reply_to=%s", request.reply_to)
            return

        def progress(state: dict[str, Any]) -> None:
            body = {"id": request.id, "progress": state}
            self.broker.publish(request.reply_to, json.dumps(body).encode(), qos=0)

        reply = await self.dispatch(request, progress)
        self.broker.publish(request.reply_to, reply.model_dump_json().encode(), qos=1)

    async def dispatch(self, request: AdminRequest, progress: Progress = _no_progress) -> AdminReply:
        handler = _OPS.get(request.op)
        if handler is None:
            return _error_reply(request.id, "unknown_op", f"unknown operation {request.op!r}")
        args_model, method = handler
        try:
            args = args_model.model_validate(request.args)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "args"
            code = "invalid_device_id" if where == "device" else "invalid"
            return _error_reply(request.id, code, f"{where}: {first['msg'].removeprefix('Value error, ')}")
        try:
            result = await method(self, args, progress)
        except HengeError as exc:
            return _error_reply(request.id, exc.code, str(exc))
        return AdminReply(id=request.id, ok=True, result=result)

    # ---- operations (the library API; the CLI reaches them over the admin protocol) -----------

    def add_device(self, device: str, labels: dict[str, str] | None = None) -> str:
        problem = models.device_id_problem(device)
        if problem:
            raise InvalidDeviceId(problem)
        if device == self.settings.admin_name:
            raise DuplicateDevice(f"{device!r} is the admin identity's name; choose another id")
        secret = self.store.add_device(device, labels, actor=current_actor.get())
        self.emit("device_added", device)
        return secret

    async def remove_device(self, device: str) -> None:
        self.store.remove_device(device, actor=current_actor.get())
        await self.broker.kick(device)
        self.broker.table.forget(device)
        for topic in (self.topics.config(device), self.topics.presence(device)):
            self.broker.publish(topic, b"", qos=1, retain=True)
        self.emit("device_removed", device)

    def import_devices(self, devices: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
        """Create many devices at once (all or nothing); returns ``{id: secret}``."""
        for device, _ in devices:
            problem = models.device_id_problem(device)
            if problem:
                raise InvalidDeviceId(problem + "; nothing was imported")
            if device == self.settings.admin_name:
                raise DuplicateDevice(f"{device!r} is the admin identity's name; nothing was imported")
        secrets_by_id = self.store.add_devices(devices, actor=current_actor.get())
        self.emit("devices_imported", None, count=len(devices))
        return secrets_by_id

    def select(self, *, all_devices: bool = False, labels: dict[str, str] | None = None) -> list[str]:
        if not all_devices and not labels:
            raise ValidationFailed("select devices with all or with at least one label")
        return [d.id for d in self.store.list_devices(labels if not all_devices else None)]

    def push_many(
        self, devices: list[str], config: dict[str, Any], *, message: str = ""
    ) -> tuple[list[ConfigVersion], list[asyncio.Task[Any]]]:
        """One new version per device in one transaction, then published without waiting.

        Returns the stored rows and the delivery tasks (one per connected subscriber, done when
        the device acknowledged it at QoS 1).
        """
        self._check_size(config)
        rows = self.store.push_many(devices, config, actor=current_actor.get(), message=message)
        deliveries: list[asyncio.Task[Any]] = []
        for row in rows:
            deliveries += self._publish_snapshot(row)
        self.counters["pushes"] = self.counters.get("pushes", 0) + len(rows)
        self.emit("fleet_push", None, devices=len(rows), sha256=rows[0].sha256 if rows else None)
        return rows, deliveries

    def rotate_secret(self, device: str) -> str:
        secret = self.store.rotate_secret(device, actor=current_actor.get())
        self.emit("secret_rotated", device)
        return secret

    def push(
        self, device: str, config: dict[str, Any], *, message: str = "", if_version: int | None = None
    ) -> ConfigVersion:
        self._check_size(config)
        row = self.store.push(device, config, actor=current_actor.get(), message=message, if_version=if_version)
        self._publish_snapshot(row)
        self._count("pushes")
        self.emit("config_published", device, version=row.version, sha256=row.sha256)
        return row

    def rollback(self, device: str, version: int, *, message: str = "") -> ConfigVersion:
        row = self.store.rollback(device, version, actor=current_actor.get(), message=message)
        self._publish_snapshot(row)
        self._count("pushes")
        self.emit("config_published", device, version=row.version, sha256=row.sha256, rollback_of=version)
        return row

    def _check_size(self, config: dict[str, Any]) -> None:
        size = len(canonical_json(config))
        if size > self.settings.max_config_bytes:
            raise ConfigTooLarge(
                f"config is {size} bytes, over the limit of {self.settings.max_config_bytes} bytes; "
                "nothing was stored"
            )

    def _publish_snapshot(self, row: ConfigVersion) -> list[asyncio.Task[Any]]:
        deliveries = self.broker.publish(self.topics.config(row.device), row.snapshot().to_payload(), qos=1,
                                         retain=True)
        if self.on_delivery_started is not None:
            for task in deliveries:
                self.on_delivery_started(task)
        return deliveries

    def online_count(self) -> int:
        return len(self.broker.table.online_devices())

    async def kick(self, device: str) -> bool:
        if not self.store.has_device(device):
            raise UnknownDevice(f"unknown device {device!r}")
        kicked = await self.broker.kick(device)
        self.store.record_audit(current_actor.get(), "kick", device, {"was_connected": kicked})
        if kicked:
            self._count("kicks")
        return kicked

    def clear_conflict(self, device: str) -> bool:
        if not self.store.has_device(device):
            raise UnknownDevice(f"unknown device {device!r}")
        actions = self.broker.table.clear_conflict(device)
        self.store.record_audit(current_actor.get(), "clear_conflict", device, {"had_conflict": bool(actions)})
        self.session_actions(actions)
        return bool(actions)

    def status(self, device: str | None = None, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        devices = [self.store.get_device(device)] if device else self.store.list_devices(labels)
        reports = self.store.reports()
        now = time.time()
        rows = []
        for d in devices:
            view = self.broker.table.view(d.id, now)
            rep = reports.get(d.id, DeviceReports())
            sync = rep.sync(d.desired_version)
            rows.append({
                "device": d.id,
                "labels": d.labels,
                "online": view.online,
                "epoch": view.epoch,
                "since": _iso(view.since) if view.since else None,
                "remote": view.remote,
                "reason": view.reason,
                "desired_version": d.desired_version,
                "takeovers": view.takeovers_last_hour,
                "conflict": view.conflict,
                "conflict_remotes": list(view.conflict_remotes),
                "quarantined_until": _iso(view.quarantined_until) if view.quarantined_until else None,
                "applied_version": rep.applied_version,
                "applied_at": rep.applied_at,
                "sync": sync,
                "error": rep.rejected_error if sync == "rejected" else None,
                "rejected_version": rep.rejected_version,
            })
        return rows


class _ReportWaiter:
    """Resolved by the first report that settles ``version``: applied at or past it, or rejected."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.future: asyncio.Future[Report] = asyncio.get_running_loop().create_future()

    def offer(self, report: Report) -> None:
        if self.future.done():
            return
        if (report.status == "applied" and report.version >= self.version) or (
            report.status == "rejected" and report.version == self.version
        ):
            self.future.set_result(report)


def _error_reply(request_id: str, code: str, message: str) -> AdminReply:
    return AdminReply(id=request_id, ok=False, error=models.AdminError(code=code, message=message))


def _version_dict(row: ConfigVersion, *, with_config: bool = True) -> dict[str, Any]:
    data = row.model_dump(mode="json")
    if not with_config:
        data.pop("config")
    return data


# ---- admin operations: argument model + coroutine, one per op name ---------------------------


async def _op_device_add(svc: HengeService, a: models.DeviceAddArgs, progress: Progress) -> Any:
    return {"device": a.device, "secret": svc.add_device(a.device, a.labels)}


async def _op_device_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return [d.model_dump(mode="json") for d in svc.store.list_devices()]


async def _op_device_show(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return svc.store.get_device(a.device).model_dump(mode="json") | {"status": svc.status(a.device)[0]}


async def _op_device_remove(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    await svc.remove_device(a.device)
    return {"device": a.device, "removed": True}


async def _op_device_rotate(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "secret": svc.rotate_secret(a.device)}


async def _op_push(svc: HengeService, a: models.PushArgs, progress: Progress) -> Any:
    row = svc.push(a.device, a.config, message=a.message, if_version=a.if_version)
    return _version_dict(row, with_config=False)


async def _op_get(svc: HengeService, a: models.GetArgs, progress: Progress) -> Any:
    return _version_dict(svc.store.get_version(a.device, a.version))


async def _op_history(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return [_version_dict(r, with_config=False) for r in svc.store.history(a.device)]


async def _op_diff(svc: HengeService, a: models.DiffArgs, progress: Progress) -> Any:
    old = svc.store.get_version(a.device, a.a)
    new = svc.store.get_version(a.device, a.b)
    lines = difflib.unified_diff(
        json.dumps(old.config, indent=2, sort_keys=True).splitlines(),
        json.dumps(new.config, indent=2, sort_keys=True).splitlines(),
        fromfile=f"{a.device}@{a.a}",
        tofile=f"{a.device}@{a.b}",
        lineterm="",
    )
    return {"diff": "\n".join(lines), "same": old.sha256 == new.sha256}


async def _op_rollback(svc: HengeService, a: models.RollbackArgs, progress: Progress) -> Any:
    return _version_dict(svc.rollback(a.device, a.version, message=a.message), with_config=False)


async def _op_status(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return svc.status(a.device, a.labels)


async def _op_wait(svc: HengeService, a: models.WaitArgs, progress: Progress) -> Any:
    return await svc.wait_for_report(a.device, a.version, a.timeout)


async def _op_device_import(svc: HengeService, a: models.ImportArgs, progress: Progress) -> Any:
    return {"secrets": svc.import_devices([(d.id, d.labels) for d in a.devices])}


async def _op_device_export(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return [{"id": d.id, "labels": d.labels} for d in svc.store.list_devices()]


async def _op_push_many(svc: HengeService, a: models.PushManyArgs, progress: Progress) -> Any:
    devices = svc.select(all_devices=a.all, labels=a.labels)
    rows, deliveries = svc.push_many(devices, a.config, message=a.message)
    total = len(deliveries)
    pending: set[asyncio.Task[Any]] = set(deliveries)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + a.delivery_timeout
    while pending and loop.time() < deadline:
        _, pending = await asyncio.wait(pending, timeout=min(0.25, max(0.0, deadline - loop.time())))
        progress({"stored": len(rows), "online": total, "acknowledged": _acked(deliveries)})
    return {"devices": len(rows), "online": total, "acknowledged": _acked(deliveries),
            "versions": {r.device: r.version for r in rows}}


def _acked(tasks: list[asyncio.Task[Any]]) -> int:
    return sum(1 for t in tasks if t.done() and not t.cancelled() and t.exception() is None)


async def _op_audit(svc: HengeService, a: models.AuditArgs, progress: Progress) -> Any:
    # A removed device's trail is still there; only an id never seen is unknown.
    if a.device is not None and not svc.store.has_device(a.device) and not svc.store.audit(a.device, limit=1):
        raise UnknownDevice(f"unknown device {a.device!r}")
    return svc.store.audit(a.device, a.limit)


async def _op_kick(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "kicked": await svc.kick(a.device)}


async def _op_clear_conflict(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "cleared": svc.clear_conflict(a.device)}


_OPS: dict[str, tuple[type[BaseModel], Callable[[HengeService, Any, Progress], Any]]] = {
    "device.add": (models.DeviceAddArgs, _op_device_add),
    "device.list": (models.StatusArgs, _op_device_list),
    "device.show": (models.DeviceRefArgs, _op_device_show),
    "device.remove": (models.DeviceRefArgs, _op_device_remove),
    "device.rotate_secret": (models.DeviceRefArgs, _op_device_rotate),
    "push": (models.PushArgs, _op_push),
    "get": (models.GetArgs, _op_get),
    "history": (models.DeviceRefArgs, _op_history),
    "diff": (models.DiffArgs, _op_diff),
    "rollback": (models.RollbackArgs, _op_rollback),
    "status": (models.StatusArgs, _op_status),
    "kick": (models.DeviceRefArgs, _op_kick),
    "wait": (models.WaitArgs, _op_wait),
    "audit": (models.AuditArgs, _op_audit),
    "device.import": (models.ImportArgs, _op_device_import),
    "device.export": (models.StatusArgs, _op_device_export),
    "push_many": (models.PushManyArgs, _op_push_many),
    "clear_conflict": (models.DeviceRefArgs, _op_clear_conflict),
}
