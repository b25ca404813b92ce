"""The answer to a fleet push, counted in devices: who has the new version, who applied it, who
rejected it (and why), who is offline.

``delivered`` is a PUBACK from the device's own current connection (the embedded broker sees it;
an external broker does not, so there it is ``None``). ``applied``/``rejected`` come from the
devices' reports, in both modes alike, and are watched from before the first version is stored:
a report cannot slip in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..models import ConfigVersion, Report
from ..results import DeviceOutcome, FleetAnswer, Listed
from .reports import Reports

Progress = Callable[[dict[str, Any]], None]
MAX_LISTED = 50  # devices named per state in the answer's lists


class FleetWatch:
    def __init__(self, reports: Reports, devices: list[str]) -> None:
        self.targets = set(devices)
        self.versions: dict[str, int] = {}
        self.reports: dict[str, Report] = {}
        self.settled = asyncio.Event()
        self._remove = reports.watch(self._on_report)

    def close(self) -> None:
        self._remove()

    def _on_report(self, device: str, report: Report) -> None:
        if device in self.targets:
            self.reports[device] = report
            if self.versions and self._all_settled():
                self.settled.set()

    def outcome(self, device: str) -> tuple[str | None, str | None]:
        """``("applied"|"rejected"|None, error)`` for the device's new version."""
        version = self.versions[device]
        report = self.reports.get(device)
        if report is None:
            return None, None
        if report.status == "applied" and report.version >= version:
            return "applied", None
        if report.status == "rejected" and report.version == version:
            return "rejected", report.error
        return None, None

    def _all_settled(self) -> bool:
        return all(self.outcome(d)[0] is not None for d in self.versions)

    def stored(self, rows: list[ConfigVersion]) -> None:
        self.versions = {row.device: row.version for row in rows}
        if not self.versions or self._all_settled():
            self.settled.set()

    async def wait(self, deliveries: dict[str, asyncio.Future[None]], *, delivery_timeout: float,
                   report_timeout: float | None, progress: Callable[[], None] | None) -> None:
        """Until every delivery is acknowledged (at most ``delivery_timeout``), then, with
        ``report_timeout``, until every device reported its version (or that long); ``progress``
        is called every 0.25 s meanwhile (every 0.5 s while it waits for reports).

        Acknowledgements are counted by one callback per delivery, added once: waiting with
        ``asyncio.wait`` every 0.25 s would add and remove 10,000 callbacks each time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delivery_timeout
        pending = [future for future in deliveries.values() if not future.done()]
        left = len(pending)
        acknowledged = asyncio.Event()

        def one_done(_: asyncio.Future[None]) -> None:
            nonlocal left
            left -= 1
            if not left:
                acknowledged.set()

        for future in pending:
            future.add_done_callback(one_done)
        if not pending:
            acknowledged.set()
        await self._until(acknowledged, deadline, 0.25, progress)
        for future in pending:  # nobody will look at these again (a done one ignores it)
            future.cancel()
        if report_timeout is None:
            return
        await self._until(self.settled, loop.time() + report_timeout, 0.5, progress)

    @staticmethod
    async def _until(event: asyncio.Event, deadline: float, tick: float, progress: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        while not event.is_set() and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):  # a progress tick, not a failure
                await asyncio.wait_for(event.wait(), min(tick, max(0.0, deadline - loop.time())))
            if progress is not None:
                progress()


def _acknowledged(future: asyncio.Future[None] | None) -> bool:
    """The device's own PUBACK came (not failed, not given up on)."""
    return future is not None and future.done() and not future.cancelled() and future.exception() is None


def counts(watch: FleetWatch, targeted: list[str], rows: list[ConfigVersion],
           deliveries: dict[str, asyncio.Future[None]], *, observable: bool,
           online_at_publish: set[str]) -> dict[str, Any]:
    """A fleet push's progress: the counts of :func:`answer`, worked out without an entry per
    device (a tick every 0.25 s of a 10,000-device push): deliveries are counted from their
    futures, outcomes from the devices that reported."""
    delivered = sum(1 for future in deliveries.values() if _acknowledged(future))
    settled: Counter[str | None] = Counter(watch.outcome(device)[0] for device in watch.reports
                                           if device in watch.versions)
    return {"targeted": len(targeted), "devices": len(rows), "online": len(online_at_publish),
            "delivered": delivered if observable else None, "applied": settled["applied"],
            "rejected": settled["rejected"], "pending": len(watch.versions) - settled["applied"] - settled["rejected"]}


def answer(watch: FleetWatch, targeted: list[str], rows: list[ConfigVersion],
           deliveries: dict[str, asyncio.Future[None]], *, observable: bool,
           online_at_publish: set[str]) -> FleetAnswer:
    """Counts and, per state, the devices (at most ``MAX_LISTED`` named, the first by id; ``--json``
    has them all in ``per_device``). One pass over the devices, in plain counters: on the path of
    every fleet push's answer (10,000 entries)."""
    per_device: dict[str, DeviceOutcome] = {}
    errors: Counter[str] = Counter()
    outcome = watch.outcome
    online_count = delivered_count = applied = rejected = 0
    named: dict[str, list[str]] = {"rejected": [], "offline": [], "silent": []}
    for device, version in watch.versions.items():
        delivered = _acknowledged(deliveries.get(device)) if observable else None
        delivered_count += bool(delivered)
        report, error = outcome(device)
        online = device in online_at_publish
        per_device[device] = {"version": version, "online": online, "delivered": delivered, "report": report,
                              "error": error}
        online_count += online
        if report == "applied":
            applied += 1
            continue
        if report == "rejected":
            rejected += 1
            if error is not None:
                errors[error] += 1
        named["rejected" if report == "rejected" else "silent" if online else "offline"].append(device)
    listed: Listed = {"rejected": heapq.nsmallest(MAX_LISTED, named["rejected"]),
                      "offline": heapq.nsmallest(MAX_LISTED, named["offline"]),
                      "silent": heapq.nsmallest(MAX_LISTED, named["silent"])}
    pending = len(per_device) - applied - rejected
    return {
        "targeted": len(targeted), "devices": len(rows), "unchanged": len(targeted) - len(rows),
        "online": online_count, "offline": len(per_device) - online_count,
        "delivered": delivered_count if observable else None,
        "acknowledged": delivered_count if observable else None,  # the name before 'delivered'
        "applied": applied, "rejected": rejected, "pending": pending,
        "errors": dict(errors.most_common(20)), "listed": listed, "per_device": per_device,
        "versions": dict(watch.versions),
    }
