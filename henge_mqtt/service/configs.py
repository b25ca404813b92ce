"""Config versions: store them, then publish them retained, in that order, always.

A version is published only after its transaction committed, so a device never holds a config
the store could lose. A fleet push goes in chunks, each durable before it is published, so the
first device has its config within milliseconds however large the fleet (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from ..errors import ConfigTooLarge, InvalidConfig
from ..models import ConfigVersion, Snapshot, canonical_json, rfc3339
from ..ports import BrokerPort
from ..store import StoreWorker
from ..topics import Topics
from .events import Events
from .fleet import Progress
from .schemas import Schemas

log = logging.getLogger("henge_mqtt.service")

FIRST_CHUNK = 100
MAX_CHUNK = 2000
PUBLISH_SLICE = 250


def chunked(devices: list[str]) -> list[list[str]]:
    """A fleet change's transactions (a push, a layer change, a rollout's wave): a small first one
    (the first devices have their config at once), then each four times larger, up to MAX_CHUNK;
    one empty chunk for no devices (a layer change still stores the layer)."""
    out, size, start = [], FIRST_CHUNK, 0
    while start < len(devices):
        out.append(devices[start:start + size])
        start += size
        size = min(size * 4, MAX_CHUNK)
    return out or [[]]


def no_progress(_: dict[str, Any]) -> None:
    """A progress callback for callers that do not show progress."""
    return None


JSON_PROPS: dict[int, object] = {0x01: 1, 0x03: "application/json"}  # Payload Format Indicator, Content Type


_SNAPSHOT_PROPS: dict[tuple[int, str], dict[int, object]] = {}


def snapshot_props(row: ConfigVersion) -> dict[int, object]:
    """What a 5.0 subscriber learns of a snapshot without parsing it; the envelope stays the truth.

    One object per version and digest (a fleet push's snapshots mostly share both), never changed:
    the broker encodes it once for all of them."""
    key = (row.version, row.sha256)
    props = _SNAPSHOT_PROPS.get(key)
    if props is None:
        if len(_SNAPSHOT_PROPS) >= 256:
            _SNAPSHOT_PROPS.clear()
        props = _SNAPSHOT_PROPS[key] = {**JSON_PROPS, 0x26: [("version", str(row.version)), ("sha256", row.sha256)]}
    return props


def _payloads(rows: list[ConfigVersion]) -> list[tuple[ConfigVersion, bytes]]:
    """Runs on the store's thread: serializing 10,000 snapshots is work the loop need not do."""
    return [(row, row.snapshot().to_payload()) for row in rows]


def _fleet_payloads(rows: list[ConfigVersion]) -> list[tuple[ConfigVersion, bytes]]:
    """Many versions that mostly share a config (a fleet push, a layer change): the part of the
    snapshot after the device and version written once per template (the rows of one template
    share its config, layers and time: ``ConfigVersion.renumbered``), only the id and number per
    device."""
    texts: dict[str, str] = {}
    tails: dict[tuple[str, int, datetime], str] = {}
    fast = Snapshot.fast_payload
    out = []
    for row in rows:
        key = (row.sha256, id(row.layers), row.created_at)  # (the rows keep their lists alive: ids stay theirs)
        tail = tails.get(key)
        if tail is None:
            text = texts.get(row.sha256)
            if text is None:
                text = texts[row.sha256] = json.dumps(row.config, ensure_ascii=False, separators=(",", ":"))
            tail = tails[key] = Snapshot.payload_tail(row.sha256, rfc3339(row.created_at), text,
                                                      json.dumps(row.layers, separators=(",", ":")))
        out.append((row, fast(row.device, row.version, tail)))
    return out


class Configs:
    def __init__(self, worker: StoreWorker, broker: BrokerPort, topics: Topics, events: Events,
                 max_config_bytes: int, schemas: Schemas) -> None:
        self.worker = worker
        self.schemas = schemas
        # Held by a fleet push (checked once, stored in chunks) and by every schema change: a schema
        # cannot change between the check and the last chunk.
        self.schema_lock = asyncio.Lock()
        self.broker = broker
        self.topics = topics
        self.events = events
        self.max_config_bytes = max_config_bytes
        self.on_delivery_started: Callable[[asyncio.Future[None]], None] | None = None
        # A device's last config too large for its own Maximum Packet Size (5.0): topic, size, at.
        self.undeliverable: dict[str, dict[str, Any]] = {}

    def check_size(self, config: dict[str, Any]) -> None:
        try:
            size = len(canonical_json(config))
        except ValueError as exc:  # NaN or Infinity from a library caller: not JSON
            raise InvalidConfig(f"config is not strict JSON: {exc}; nothing was stored") from exc
        if size > self.max_config_bytes:
            raise ConfigTooLarge(
                f"config is {size} bytes, over the limit of {self.max_config_bytes} bytes; nothing was stored"
            )

    def publish(self, row: ConfigVersion, payload: bytes | None = None) -> list[asyncio.Future[None]]:
        """Retained to the device's config topic; the future (if any) is the device's own PUBACK."""
        data = payload if payload is not None else row.snapshot().to_payload()
        self.undeliverable.pop(row.device, None)  # set again, synchronously, if this one is too large too
        futures = self.broker.publish(self.topics.config(row.device), data, qos=1, retain=True, track=True,
                                      props=snapshot_props(row), for_device=row.device)
        if self.on_delivery_started is not None:
            for future in futures:
                self.on_delivery_started(future)
        return futures

    async def push(self, device: str, config: dict[str, Any] | None, *, actor: str, message: str = "",
                   if_version: int | None = None, force: bool = False,
                   patch: dict[str, Any] | None = None) -> tuple[ConfigVersion, bool]:
        """``(row, stored)``: unless ``force``, a config equal to the current one stores nothing."""
        if config is not None:
            self.check_size(config)
        store = self.worker.store
        if force and patch is None:
            assert config is not None
            row = await self.worker.run(store.push, device, config, actor=actor, message=message,
                                        if_version=if_version)
        else:
            row, stored = await self.worker.run(store.push_if_changed, device, config, actor=actor, message=message,
                                                if_version=if_version, patch=patch)
            if not stored and not force:
                return row, False
            if not stored:  # a forced patch that changes nothing: a new version all the same
                row = await self.worker.run(store.push, device, row.config, actor=actor, message=message)
        self.check_size(row.config)
        self.publish(row)
        self.events.count("pushes")
        self.events.emit("config_published", device, version=row.version, sha256=row.sha256)
        return row, True

    async def rollback(self, device: str, version: int, *, actor: str, message: str = "") -> ConfigVersion:
        store = self.worker.store
        row = await self.worker.run(store.rollback, device, version, actor=actor, message=message)
        self.publish(row)
        self.events.count("pushes")
        self.events.emit("config_published", device, version=row.version, sha256=row.sha256, rollback_of=version)
        return row

    async def push_many(self, devices: list[str], config: dict[str, Any], *, actor: str, message: str = "",
                        progress: Progress | None = None,
                        force: bool = False) -> tuple[list[ConfigVersion], dict[str, asyncio.Future[None]]]:
        """One new version per device, stored and published chunk by chunk; deliveries are the
        devices' own PUBACKs (connected devices only; none with an external broker).

        Every id is checked before the first chunk, so a bad selection stores nothing; each chunk
        is one transaction, published as soon as it commits.
        """
        self.check_size(config)
        store = self.worker.store
        for device in devices:
            store.require_device(device, also="nothing was stored")
        async with self.schema_lock:
            return await self._push_many(devices, config, actor=actor, message=message, progress=progress,
                                         force=force)

    async def _push_many(self, devices: list[str], config: dict[str, Any], *, actor: str, message: str,
                         progress: Progress | None,
                         force: bool) -> tuple[list[ConfigVersion], dict[str, asyncio.Future[None]]]:
        store = self.worker.store
        await self.worker.run(self.schemas.check_many, devices, config)

        def store_chunk(chunk: list[str]) -> list[tuple[ConfigVersion, bytes]]:
            stored = _fleet_payloads(store.push_many(chunk, config, actor=actor, message=message,
                                                     skip_unchanged=not force))
            self.schemas.stored(chunk)  # (checked by check_many, unchanged ones too)
            return stored

        def stored(count: int) -> None:
            if progress is not None:
                progress({"stored": count, "of": len(devices)})

        steps = [functools.partial(store_chunk, chunk) for chunk in chunked(devices) if chunk]
        rows, futures = await self.stream(steps, after=stored)
        self.events.count("pushes", len(rows))
        self.events.emit("fleet_push", None, devices=len(rows), sha256=rows[0].sha256 if rows else None)
        return rows, futures

    async def stream(self, steps: Sequence[Callable[[], list[tuple[ConfigVersion, bytes]]]], *,
                     after: Callable[[int], None] | None = None,
                     ) -> tuple[list[ConfigVersion], dict[str, asyncio.Future[None]]]:
        """Transactions run one after another on the store's thread, each one's versions published
        as soon as it commits, while the store writes the next (pipelined: still nothing is published
        before its own transaction committed). ``after``: the count of versions so far, after each.

        Stopped part-way (the caller cancelled, the service stops): whatever the store keeps, its
        devices get, now or as soon as the transaction in flight commits; no further step runs."""
        rows: list[ConfigVersion] = []
        futures: dict[str, asyncio.Future[None]] = {}
        job = self.worker.submit(steps[0]) if steps else None
        left: list[tuple[ConfigVersion, bytes]] = []  # stored, not yet published
        try:
            for k in range(len(steps)):
                assert job is not None
                stored = await asyncio.shield(job)  # a cancelled stream does not undo a step in flight
                job = self.worker.submit(steps[k + 1]) if k + 1 < len(steps) else None
                left = stored
                for i, (row, payload) in enumerate(stored, 1):
                    rows.append(row)
                    for future in self.publish(row, payload):
                        futures[row.device] = future
                    if i % PUBLISH_SLICE == 0:
                        left = stored[i:]
                        await asyncio.sleep(0)  # let other connections' packets in between slices
                left = []
                if after is not None:
                    after(len(rows))
        finally:
            for row, payload in left:
                self.publish(row, payload)
            if job is not None:
                job.add_done_callback(self._publish_late)
        return rows, futures

    async def stream_changes(self, steps: Sequence[Callable[[], list[ConfigVersion]]],
                             ) -> tuple[list[ConfigVersion], dict[str, asyncio.Future[None]]]:
        """Store steps (the transactions of a layer change, of a rollout's wave) streamed by
        :meth:`stream`: each step's versions published as soon as it commits."""

        def step(store_it: Callable[[], list[ConfigVersion]]) -> list[tuple[ConfigVersion, bytes]]:
            rows = store_it()
            self.schemas.stored(row.device for row in rows)  # (they passed the schemas, in the transaction)
            return _fleet_payloads(rows)

        rows, futures = await self.stream([functools.partial(step, s) for s in steps])
        self.events.count("pushes", len(rows))
        return rows, futures

    async def change_layer(self, name: str, content: dict[str, Any] | None, *, actor: str, message: str,
                           labels: dict[str, str] | None, priority: int | None, where: str | None,
                           if_version: int | None) -> tuple[int, list[ConfigVersion]]:
        """A layer change streamed as a fleet push is: the layer's new version and the first chunk of
        devices in one transaction, then the other chunks, each published as soon as it commits (the
        first devices have their config at once, however large the fleet). The caller holds the
        schema lock and has checked the schemas for every device; a service that stops part-way
        finishes the change when it starts (``Store.finish_layer_change``)."""
        store = self.worker.store
        chunks = chunked(await self.worker.run(store.device_ids))
        version = 0

        def first() -> list[ConfigVersion]:
            nonlocal version
            version, rows = store.begin_layer_change(name, content, actor=actor, devices=chunks[0],
                                                     last=len(chunks) == 1, message=message, selector=labels,
                                                     priority=priority, where=where, if_version=if_version)
            return rows

        rest = [functools.partial(store.continue_layer_change, chunk, last=k == len(chunks) - 1)
                for k, chunk in enumerate(chunks) if k]
        steps: list[Callable[[], list[ConfigVersion]]] = [first, *rest]
        rows, _ = await self.stream_changes(steps)
        if rows:
            self.events.emit("layer_applied", None, devices=len(rows), layer=name, version=version)
        return version, rows

    def _publish_late(self, job: asyncio.Future[list[tuple[ConfigVersion, bytes]]]) -> None:
        if job.cancelled() or job.exception() is not None:
            return  # nothing was stored (the transaction rolled back), or the loop is gone
        stored = job.result()
        self.schemas.stored(row.device for row, _ in stored)
        for row, payload in stored:
            self.publish(row, payload)

    async def publish_rows(self, rows: list[ConfigVersion], *, event: str,
                           **data: Any) -> dict[str, asyncio.Future[None]]:
        """Versions stored together (a layer change, a rollout's wave): each published, a slice at a
        time so other connections' packets get in between; the devices' own acknowledgements."""
        if not rows:
            return {}
        payloads = await self.worker.run(_fleet_payloads, rows)
        futures: dict[str, asyncio.Future[None]] = {}
        for i, (row, payload) in enumerate(payloads, 1):
            for future in self.publish(row, payload):
                futures[row.device] = future
            if i % PUBLISH_SLICE == 0:
                await asyncio.sleep(0)
        self.schemas.stored(row.device for row in rows)
        self.events.count("pushes", len(rows))
        self.events.emit(event, None, devices=len(rows), **data)
        return futures

    async def refresh_for_reported(self, devices: list[str]) -> None:
        """Devices whose reported state changed, under layers with a ``where`` over it: each gets
        the config its layers now give, stored and published (a device that upgrades its firmware
        joins the layer for the new one); one a schema refuses keeps its version, said in the log
        and a ``layer_refused`` event."""
        if not self.worker.store.layers_read_reported():  # from memory: most fleets have no such layer
            return
        async with self.schema_lock:
            rows, refused = await self.worker.run(self.worker.store.refresh_for_reported, devices)
        for device, why in refused:
            log.warning("layer.refused device=%s reason=reported error=%s", device, " ".join(why.split()))
            self.events.emit("layer_refused", device, reason="reported state changed", error=why)
        await self.publish_rows(rows, event="layer_applied", reason="reported state changed")

    async def republish_all(self) -> int:
        """The store is the truth: every current version goes out retained again on start."""
        store = self.worker.store
        current = await self.worker.run(lambda: _payloads(list(store.current_versions())))
        for row, payload in current:
            self.broker.publish(self.topics.config(row.device), payload, qos=1, retain=True,
                                props=snapshot_props(row))
        return len(current)
