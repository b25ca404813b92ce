"""Optional Prometheus metrics (``henge serve --metrics-port``), read from the service at scrape time.

Counting stays in the service (plain integers); this module only turns them into Prometheus text
when scraped, so the hot paths pay nothing when metrics are off and almost nothing when on.
Needs the ``metrics`` extra (``prometheus-client``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import SettingsError

if TYPE_CHECKING:
    from .service import HengeService

COUNTERS = {
    "connects": "Accepted device connections.",
    "takeover": "Connections replaced by a newer connection of the same device.",
    "keepalive_timeouts": "Connections closed for silence past 1.5 x keep-alive.",
    "conflict": "Identity conflicts detected.",
    "quarantine": "Identity-conflict quarantines imposed.",
    "rate_limited": "CONNECTs refused by the per-device connect rate limit.",
    "pushes": "Config versions stored and published.",
}
REPORT_STATUSES = ("applied", "rejected", "invalid")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MetricsServer:
    def __init__(self, service: HengeService, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError as exc:
            raise SettingsError("--metrics-port needs prometheus-client: pip install 'henge-mqtt[metrics]'") from exc
        self.registry = CollectorRegistry()
        self.registry.register(_ServiceCollector(service, asyncio.get_running_loop()))
        self.latency = Histogram(
            "henge_publish_latency_seconds",
            "From publishing a config snapshot to the device's QoS 1 acknowledgement.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        service.configs.on_delivery_started = self._track
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise SettingsError(f"cannot start the metrics server on {host}:{port}: {exc.strerror or exc}") from exc
        self.port = int(self._server.server_port)

    def _track(self, delivery: asyncio.Future[None]) -> None:
        started = time.monotonic()

        def done(finished: asyncio.Future[None]) -> None:
            if not finished.cancelled() and finished.exception() is None:
                self.latency.observe(time.monotonic() - started)

        delivery.add_done_callback(done)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


class _ServiceCollector:
    """Runs on the HTTP server's thread; every value comes from a snapshot taken on the event loop."""

    def __init__(self, service: HengeService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    async def _snapshot(self) -> dict[str, Any]:
        # The fleet's sync counts come from the store (drift is a comparison of hashes there).
        return self.service.metrics_snapshot() | {"sync": (await self.service.summary())["sync"]}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(timeout=5)
        counters: dict[str, int] = snapshot["counters"]
        online: int = snapshot["online"]
        yield GaugeMetricFamily("henge_connected_devices", "Devices with a live connection now.", value=online)
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"henge_{name}", help_text, value=counters.get(name, 0))
        reports = CounterMetricFamily("henge_reports", "Device reports received, by outcome.", labels=["status"])
        for status in REPORT_STATUSES:
            reports.add_metric([status], counters.get(f"reports_{status}", 0))
        yield reports
        said = CounterMetricFamily("henge_reported", "Reported-state messages received, by outcome.",
                                   labels=["outcome"])
        for outcome in ("changed", "unchanged", "invalid"):
            said.add_metric([outcome], counters.get(f"reported_{outcome}", 0))
        yield said
        sync = GaugeMetricFamily("henge_devices_sync", "Devices by sync state now (drift: the config a device "
                                 "reports having is not the version it applied).", labels=["sync"])
        for name, count in snapshot["sync"].items():
            sync.add_metric([name], count)
        yield sync
        for name in ("sockets", "subscriptions", "retained", "refused_at_limit", "listener_processes",
                     "listener_process_restarts"):
            if name in snapshot:
                yield GaugeMetricFamily(f"henge_{name}", f"Broker {name.replace('_', ' ')} now.", value=snapshot[name])
