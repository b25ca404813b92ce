"""What devices tell us: about the versions they were sent (reports, and waiting for them:
``push --wait``), and about themselves (their reported state, docs/protocol.md#reported-state).

Both come in on the event loop; validating them is cheap and stays there, recording them goes to
the store's thread in arrival order, reports and reported states of one batch in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ..errors import UnknownVersion, WaitTimeout
from ..ids import StrictJSONError, strict_json
from ..logs import LogLimiter
from ..models import Report
from ..results import ReportOutcome
from ..store import ReportedMessage, StoreWorker, ts
from .events import Events

log = logging.getLogger("henge_mqtt.service")

ARRIVALS_EVERY = 5.0  # seconds an unchanged message's arrival time may wait to be written


def _stamp(at: float) -> str:
    """A time.time() as the store keeps times (ISO 8601, UTC)."""
    return ts(datetime.fromtimestamp(at, UTC))

# MQTT 5.0 reason codes for a refused report (the broker puts them in the PUBACK).
PAYLOAD_FORMAT_INVALID = 0x99
QUOTA_EXCEEDED = 0x97


class _Waiter:
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


class Reports:
    def __init__(self, worker: StoreWorker, events: Events, max_bytes: int,
                 is_online: Callable[[str], bool], spawn: Callable[[Coroutine[Any, Any, Any]], Any], *,
                 max_reported_bytes: int = 16 * 1024, reported_history: int = 20) -> None:
        self.worker = worker
        self.events = events
        self.max_bytes = max_bytes
        self.max_reported_bytes = max_reported_bytes
        self.reported_history = reported_history
        self.is_online = is_online
        self._waiters: dict[str, set[_Waiter]] = {}
        self._watchers: list[Callable[[str, Report], None]] = []
        self._pending: list[tuple[str, Report, int | None]] = []
        self._pending_reported: list[ReportedMessage] = []
        self._last: dict[str, bytes] = {}  # device -> digest of the last message stored (16 bytes)
        self._arrivals: dict[str, float] = {}  # when unchanged messages arrived (time.time()), to write
        self._arrival_timer: asyncio.TimerHandle | None = None
        self._flushing = False
        self._spawn = spawn
        self._log = LogLimiter(log)  # a device can send a bad message ten times a second
        # Layers with a where over reported state: the devices whose document changed (the service's configs).
        self.on_reported_changed: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None

    def watch(self, callback: Callable[[str, Report], None]) -> Callable[[], None]:
        """``callback(device, report)`` for every recorded report; returns a remover."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def take_reported(self, device: str, payload: bytes, epoch: Callable[[], int | None]) -> int:
        """A device's reported-state message, on the loop: 0 (taken), or the 5.0 reason code to
        refuse it with. The same bytes as the last message stored for the device change nothing
        (a document, or a merge patch, applied twice is applied once): only its arrival time is
        kept, written with the others every few seconds. A device that reports on a timer with
        nothing new costs a hash, not a parse and a store write."""
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if self._last.get(device) == digest:
            self._arrivals[device] = time.time()  # formatted when written: this path runs 1,000 times a second
            self.events.count("reported_unchanged")
            if self._arrival_timer is None:
                self._arrival_timer = asyncio.get_running_loop().call_later(
                    ARRIVALS_EVERY, lambda: self._spawn(self.write_arrivals()))
            return 0
        message = self.parse_reported(device, payload, epoch(), digest)
        if isinstance(message, int):
            return message
        self.submit_reported(message)
        return 0

    def arrival_of(self, device: str) -> str | None:
        """When the device's last (unchanged) message arrived, if not written to the store yet."""
        found = self._arrivals.get(device)
        return _stamp(found) if found is not None else None

    def forget(self, device: str) -> None:
        """A device removed: a new one of the same id starts from nothing."""
        self._last.pop(device, None)
        self._arrivals.pop(device, None)

    async def write_arrivals(self) -> None:
        """The arrival times of unchanged messages, in one transaction (and at shutdown)."""
        if self._arrival_timer is not None:
            self._arrival_timer.cancel()
            self._arrival_timer = None
        arrivals, self._arrivals = self._arrivals, {}
        if arrivals:
            await self.worker.run(self.worker.store.touch_reported, {d: _stamp(t) for d, t in arrivals.items()})

    def parse_reported(self, device: str, payload: bytes, epoch: int | None,
                       digest: bytes = b"") -> ReportedMessage | int:
        """A reported-state message ``{"document": {...}}`` or ``{"patch": {...}}``, or the 5.0
        reason code to refuse it with (logged, rate-limited, and counted)."""
        if len(payload) > self.max_reported_bytes:
            self._bad_reported(device, f"{len(payload)} bytes, over max_reported_bytes")
            return QUOTA_EXCEEDED
        try:
            body = strict_json(payload.decode("utf-8"))
        except (UnicodeDecodeError, StrictJSONError, ValueError) as exc:
            self._bad_reported(device, f"not strict JSON: {exc}")
            return PAYLOAD_FORMAT_INVALID
        if not isinstance(body, dict) or len(body) != 1 or not ({"document", "patch"} & body.keys()):
            self._bad_reported(device, 'give exactly one of {"document": {...}} or {"patch": {...}}')
            return PAYLOAD_FORMAT_INVALID
        kind, value = next(iter(body.items()))
        if not isinstance(value, dict):
            self._bad_reported(device, f"{kind}: must be a JSON object")
            return PAYLOAD_FORMAT_INVALID
        return ReportedMessage(device, value, kind == "patch", epoch, digest)

    def submit_reported(self, message: ReportedMessage) -> None:
        """Queue a parsed reported-state message: stored with the reports that arrived meanwhile."""
        self._pending_reported.append(message)
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    def _bad_reported(self, device: str, why: str) -> None:
        self.events.count("reported_invalid")
        self._log.log(logging.WARNING, "reported.invalid", "device=%s problem=%s", device, why)

    def parse(self, device: str, payload: bytes) -> Report | int:
        """The report, or the 5.0 reason code to refuse it with (logged and counted): on the loop,
        so a 5.0 device learns from its PUBACK that its report was not accepted."""
        if len(payload) > self.max_bytes:
            self._bad(device, f"{len(payload)} bytes, over max_report_bytes")
            return QUOTA_EXCEEDED
        try:
            return Report.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            self._bad(device, f"{'.'.join(map(str, first['loc'])) or 'payload'}: {first['msg']}")
            return PAYLOAD_FORMAT_INVALID

    def submit(self, device: str, report: Report, epoch: int | None = None) -> None:
        """Queue a parsed report (``epoch``: of the connection it came in on); recorded with every
        other report that arrived meanwhile, in one transaction (a wave of 10,000 devices answers
        within a second), in arrival order."""
        self._pending.append((device, report, epoch))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending or self._pending_reported:
                batch, self._pending = self._pending, []
                reported, self._pending_reported = self._pending_reported, []
                await self._record(batch, reported)
        finally:
            self._flushing = False

    async def _record(self, batch: list[tuple[str, Report, int | None]], reported: list[ReportedMessage]) -> None:
        outcomes, said = await self.worker.run(
            self.worker.store.record_device_words, [(d, r.version, r.status, r.error, e) for d, r, e in batch],
            reported, self.max_reported_bytes, self.reported_history)
        changed: list[str] = []
        for message, result in zip(reported, said, strict=True):
            if result.outcome == "ok" and message.digest:
                self._last[message.device] = message.digest
            if result.outcome == "ok" and result.changed:
                changed.append(message.device)
            if result.outcome == "too_large":
                self._bad_reported(message.device, f"merged: {result.size} bytes, over max_reported_bytes")
            elif result.outcome == "ok" and result.changed:
                self.events.count("reported_changed")
                self.events.emit("reported", message.device, seq=result.seq, changed=list(result.changed))
            elif result.outcome == "ok":
                self.events.count("reported_unchanged")
        if changed and self.on_reported_changed is not None:
            await self.on_reported_changed(list(dict.fromkeys(changed)))
        for (device, report, _), outcome in zip(batch, outcomes, strict=True):
            if outcome == "unknown":
                log.info("report.unknown_device device=%s", device)  # removed while its report was in flight
                continue
            if outcome == "newer":
                self._bad(device, f"version {report.version} is newer than the desired version")
                continue
            self.events.count(f"reports_{report.status}")
            self.events.emit("report", device, version=report.version, status=report.status, error=report.error)
            for waiter in list(self._waiters.get(device, ())):
                waiter.offer(report)
            for watcher in list(self._watchers):
                watcher(device, report)

    def _bad(self, device: str, why: str) -> None:
        self.events.count("reports_invalid")
        self._log.log(logging.WARNING, "report.invalid", "device=%s problem=%s", device, why)

    async def wait_for(self, device: str, version: int, timeout: float) -> ReportOutcome:
        """Until ``device`` reports ``version`` applied or rejected; raise WaitTimeout otherwise."""
        if version < 1:
            raise UnknownVersion(f"device {device!r} has no version {version}")
        store = self.worker.store
        desired = (await self.worker.run(store.get_device, device)).desired_version
        if version > desired:
            raise UnknownVersion(f"device {device!r} has no version {version} (current is {desired})")
        waiter = _Waiter(version)  # registered before the check below: a report in between is not lost
        self._waiters.setdefault(device, set()).add(waiter)
        try:
            known = await self.worker.run(store.device_reports, device)
            if known.applied_version is not None and known.applied_version >= version:
                return {"device": device, "version": version, "status": "applied", "error": None}
            if known.rejected_version == version:
                return {"device": device, "version": version, "status": "rejected", "error": known.rejected_error}
            try:
                report = await asyncio.wait_for(waiter.future, timeout)
            except TimeoutError:
                state = "online but did not report it" if self.is_online(device) else "offline"
                raise WaitTimeout(
                    f"{device} did not report version {version} within {timeout:g} s: the device is {state}"
                ) from None
        finally:
            self._waiters[device].discard(waiter)
            if not self._waiters[device]:
                del self._waiters[device]
        return {"device": device, "version": version, "status": report.status, "error": report.error}
