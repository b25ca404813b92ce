"""Staged rollouts, the running part: one task per active rollout, everything it decides stored
before it is acted on, so a ``kill -9`` at any moment resumes where it stood.

What is durable, and when (``store/rollouts.py``): the plan (every device's wave) before anything is
published; a wave's versions together with the mark that it went out (a wave is never stored
twice; a restart republishes every current version retained, so none is lost in between); the
move to the next wave; a halt (state ``reverting``) before the revert, and the revert together
with the final state. The runner only ever reads that state and takes the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SchemaViolation, ValidationFailed
from ..results import PushPreviewDiff, RolloutPreview, RolloutStatus, RolloutSummary, WaveStatus
from ..rollout_plan import Policy, WaveCount, decide, plan
from .configs import chunked
from .context import current_actor, utc_text

if TYPE_CHECKING:
    from ..models import ConfigVersion
    from ..ports import BrokerPort
    from ..store import Store, StoreWorker
    from .configs import Configs
    from .events import Events
    from .reports import Reports
    from .schemas import Schemas


class Host(Protocol):
    """What the rollout runner needs of the service that wires it (the composer implements it;
    this module never imports the composer)."""

    @property
    def store(self) -> Store: ...
    @property
    def worker(self) -> StoreWorker: ...
    @property
    def broker(self) -> BrokerPort: ...

    configs: Configs
    events: Events
    reports: Reports
    schemas: Schemas

    async def select(self, *, all_devices: bool = False, labels: dict[str, str] | None = None,
                     where: str | None = None) -> list[str]: ...
    def spawn(self, coro: Any) -> asyncio.Task[Any]: ...
    async def change_example(self, rows: list[ConfigVersion]) -> PushPreviewDiff | None: ...

log = logging.getLogger("henge_mqtt.service")
COALESCE = 0.05  # after a wake-up, let the rest of a burst of reports land before counting
TICK = 1.0  # the longest a runner sleeps without looking (reports and commands wake it sooner)


class Rollouts:
    def __init__(self, svc: Host) -> None:
        self.svc = svc
        self._pokes: dict[str, asyncio.Event] = {}
        self._delivered: dict[str, set[str]] = {}  # rollout -> devices that acknowledged (this run only)
        self._unwatch = svc.reports.watch(lambda device, report: self.poke_all())

    def close(self) -> None:
        self._unwatch()

    def poke_all(self) -> None:
        for event in self._pokes.values():
            event.set()

    def poke(self, rollout_id: str) -> None:
        event = self._pokes.get(rollout_id)
        if event is not None:
            event.set()

    async def resume_all(self) -> None:
        for ro in await self.svc.worker.run(self.svc.store.rollouts, True):
            log.info("rollout.resume id=%s state=%s wave=%d", ro["id"], ro["state"], ro["wave"] + 1)
            self._spawn(ro["id"])

    def _spawn(self, rollout_id: str) -> None:
        self._pokes[rollout_id] = asyncio.Event()
        self.svc.spawn(self._run(rollout_id))

    # ---- commands ------------------------------------------------------------------------------

    async def start(self, config: dict[str, Any], *, all_devices: bool, labels: dict[str, str] | None,
                    waves: list[float] | None, wave_size: int | None, policy: Policy,
                    message: str = "", layer: dict[str, Any] | None = None,
                    where: str | None = None) -> RolloutStatus:
        """``config`` as every target's own layer; or, with ``layer`` ({name, content, labels,
        priority}), a staged layer change whose targets are the devices it alters."""
        svc = self.svc
        store = svc.store
        devices, target = await self._targets(config, all_devices=all_devices, labels=labels, where=where,
                                              layer=layer)
        rollout_id = "r-" + secrets.token_hex(4)
        waved = plan(rollout_id, devices, waves=waves, wave_size=wave_size)
        await svc.worker.run(store.create_rollout, rollout_id, waved, actor=current_actor.get(),
                             target=target, config=config, policy=_policy_dict(policy), message=message,
                             layer=layer)
        svc.events.emit("rollout_started", None, rollout=rollout_id, devices=len(devices),
                        waves=[len(w) for w in waved])
        self._spawn(rollout_id)
        return await self.status(rollout_id)

    async def _targets(self, config: dict[str, Any], *, all_devices: bool, labels: dict[str, str] | None,
                       where: str | None, layer: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
        """The devices a rollout would change and how its target is recorded, every schema checked
        for every one of them (before anything is stored)."""
        svc = self.svc
        svc.configs.check_size(config)
        if layer is None:
            devices = await svc.select(all_devices=all_devices, labels=labels, where=where)
            await svc.worker.run(svc.schemas.check_many, devices, config)  # every target, before anything
            target: dict[str, Any] = {"all": True} if all_devices else {"labels": labels}
            if where:
                target["where"] = where  # the devices it matched when the rollout started
            return devices, target
        devices = await svc.worker.run(svc.store.layer_change_targets, layer["name"], layer["content"],
                                       selector=layer["labels"], priority=layer["priority"])
        if not devices:
            raise ValidationFailed(f"this change of layer {layer['name']!r} alters no device's config; nothing "
                                   "was started (henge layer set applies it at once)")
        await svc.worker.run(svc.schemas.check_layer_change, layer, devices)
        return devices, {"layer": layer["name"]}

    async def preview(self, config: dict[str, Any], *, all_devices: bool, labels: dict[str, str] | None,
                      waves: list[float] | None, wave_size: int | None, layer: dict[str, Any] | None = None,
                      where: str | None = None) -> RolloutPreview:
        """What ``start`` would do now, started nowhere: its devices (schemas checked), the size of
        each wave (which device goes in which is drawn when it starts), and for a config the devices
        it changes with the first one's diff."""
        svc = self.svc
        devices, _ = await self._targets(config, all_devices=all_devices, labels=labels, where=where, layer=layer)
        sizes = [len(wave) for wave in plan("preview", devices, waves=waves, wave_size=wave_size)]
        if layer is not None:
            return {"targeted": len(devices), "waves": sizes, "change": len(devices), "unchanged": 0,
                    "example": None}
        rows = await svc.worker.run(svc.store.plan_push_many, devices, config)
        return {"targeted": len(devices), "waves": sizes, "change": len(rows), "unchanged": len(devices) - len(rows),
                "example": await svc.change_example(rows)}

    async def pause(self, rollout_id: str) -> dict[str, Any]:
        ro = await self.svc.worker.run(self.svc.store.set_rollout_state, rollout_id, "paused",
                                       actor=current_actor.get(), expect=("running",))
        self.svc.events.emit("rollout_paused", None, rollout=rollout_id)
        self.poke(rollout_id)
        return ro

    async def resume(self, rollout_id: str) -> dict[str, Any]:
        ro = await self.svc.worker.run(self.svc.store.set_rollout_state, rollout_id, "running",
                                       actor=current_actor.get(), expect=("paused",))
        self.svc.events.emit("rollout_resumed", None, rollout=rollout_id)
        self.poke(rollout_id)
        return ro

    async def abort(self, rollout_id: str, *, revert: bool) -> dict[str, Any]:
        actor = current_actor.get()
        state = "reverting" if revert else "aborted"
        ro = await self.svc.worker.run(self.svc.store.set_rollout_state, rollout_id, state, actor=actor,
                                       reason=f"aborted by {actor}", revert=revert,
                                       expect=("running", "paused"))
        self.svc.events.emit("rollout_aborted", None, rollout=rollout_id, revert=revert)
        self.poke(rollout_id)
        if not revert:
            return ro
        return await self._wait_state(rollout_id, ("aborted",))

    async def _wait_state(self, rollout_id: str, states: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ro = await self.svc.worker.run(self.svc.store.rollout, rollout_id)
            if ro["state"] in states or time.monotonic() > deadline:
                return ro
            await asyncio.sleep(0.05)

    async def status(self, rollout_id: str) -> RolloutStatus:
        store = self.svc.store
        ro, devices = await self.svc.worker.run(
            lambda: (store.rollout(rollout_id), store.rollout_devices(rollout_id)))
        delivered = self._delivered.get(rollout_id)
        counts: list[Counter[str]] = [Counter() for _ in range(ro["waves"])]
        errors: list[Counter[str]] = [Counter() for _ in range(ro["waves"])]
        for d in devices:
            c = counts[d["wave"]]
            c["targeted"] += 1
            if d["new_version"] is None:
                continue
            c["published"] += 1
            c["online"] += d["online_at_start"]
            if delivered is not None and d["device"] in delivered:
                c["delivered"] += 1
            if d["report"] is None:  # pending until it reports; offline ones get it retained when they connect
                c["pending"] += 1
                c["offline"] += not d["online_at_start"]
            else:
                c[d["report"]] += 1
            if d["error"]:
                errors[d["wave"]][d["error"]] += 1
            c["reverted"] += d["reverted_version"] is not None
        waves: list[WaveStatus] = [
            {"wave": i + 1, "targeted": c["targeted"], "published": c["published"], "online": c["online"],
             "delivered": c["delivered"] if delivered is not None else None, "applied": c["applied"],
             "rejected": c["rejected"], "offline": c["offline"], "pending": c["pending"], "reverted": c["reverted"],
             "errors": dict(errors[i].most_common(10))} for i, c in enumerate(counts)]
        return {"id": ro["id"], "state": ro["state"], "reason": ro["reason"], "message": ro["message"],
                "target": ro["target"], "policy": ro["policy"], "actor": ro["actor"],
                "created_at": utc_text(ro["created_at"]), "finished_at": utc_text(ro["finished_at"]),
                "wave": ro["wave"] + 1, "waves": waves, "devices": len(devices),
                "kept": sorted({d["revert_note"] for d in devices if d["revert_note"]})}

    async def list(self) -> list[RolloutSummary]:
        rows = await self.svc.worker.run(self.svc.store.rollouts)
        return [{"id": ro["id"], "state": ro["state"], "reason": ro["reason"], "actor": ro["actor"],
                 "created_at": utc_text(ro["created_at"]), "finished_at": utc_text(ro["finished_at"]),
                 "wave": ro["wave"] + 1, "waves": ro["waves"]} for ro in rows]

    # ---- the runner --------------------------------------------------------------------------------

    async def _run(self, rollout_id: str) -> None:
        poke = self._pokes[rollout_id]
        try:
            await self._steps(rollout_id, poke)
        except Exception:
            log.exception("rollout.runner_failed id=%s: it resumes when the service restarts", rollout_id)
            raise
        finally:
            self._pokes.pop(rollout_id, None)

    async def _steps(self, rollout_id: str, poke: asyncio.Event) -> None:
        svc, store = self.svc, self.svc.store
        while True:
            ro = await svc.worker.run(store.rollout, rollout_id)
            state, wave = ro["state"], ro["wave"]
            if state in ("completed", "halted", "aborted"):
                return
            if state == "paused":
                await self._sleep(poke, None)
                continue
            if state == "reverting":
                final = "aborted" if (ro["reason"] or "").startswith("aborted") else "halted"
                rows = await svc.worker.run(store.revert_rollout, rollout_id, final=final)
                await svc.configs.publish_rows(rows, event="rollout_reverted", rollout=rollout_id)
                svc.events.emit(f"rollout_{final}", None, rollout=rollout_id, reason=ro["reason"],
                                reverted=len(rows))
                return
            policy = Policy(**ro["policy"])
            now = time.time()
            if not ro["wave_published"]:
                if ro["next_wave_at"] and now < ro["next_wave_at"]:
                    await self._sleep(poke, ro["next_wave_at"] - now)
                    continue
                members = [d["device"] for d in await svc.worker.run(store.rollout_devices, rollout_id, wave)]
                online = {d for d in members if svc.broker.session(d, now).online}
                # Streamed as a fleet push is: the wave's devices in chunks, each published as it commits.
                chunks = chunked(await svc.worker.run(store.wave_pending, rollout_id, wave))
                try:
                    rows, futures = await svc.configs.stream_changes([functools.partial(
                        store.publish_wave, rollout_id, wave, online, now=now, devices=chunk,
                        last=k == len(chunks) - 1) for k, chunk in enumerate(chunks)])
                except SchemaViolation as exc:  # (a schema set since the rollout started)
                    await self._halt(rollout_id, f"wave {wave + 1} breaks a schema: {exc.args[0].splitlines()[0]}")
                    continue
                if rows:
                    svc.events.emit("rollout_wave", None, devices=len(rows), rollout=rollout_id, wave=wave + 1)
                delivered = self._delivered.setdefault(rollout_id, set())
                for device, future in futures.items():
                    future.add_done_callback(_mark(delivered, device))
                continue
            devices = await svc.worker.run(store.rollout_devices, rollout_id, wave)
            published = [d for d in devices if d["new_version"] is not None]
            count = WaveCount(
                targeted=len(published), online_at_start=sum(d["online_at_start"] for d in published),
                applied=sum(d["report"] == "applied" for d in published),
                applied_online=sum(d["report"] == "applied" and d["online_at_start"] for d in published),
                rejected=sum(d["report"] == "rejected" for d in published))
            decision, why = decide(count, policy, started=ro["wave_started"] or now, now=now)
            if decision == "halt":
                await self._halt(rollout_id, f"wave {wave + 1}: {why}")
            elif decision == "pass":
                svc.events.emit("rollout_wave_passed", None, rollout=rollout_id, wave=wave + 1, why=why)
                after, rows = await svc.worker.run(store.advance_rollout, rollout_id, next_wave_at=now + policy.pause)
                await svc.configs.publish_rows(rows, event="layer_applied", rollout=rollout_id)
                if after == "completed":
                    svc.events.emit("rollout_completed", None, rollout=rollout_id)
                    return
            else:
                left = (ro["wave_started"] or now) + policy.wave_timeout - now
                await self._sleep(poke, max(0.0, min(TICK, left)))


    async def _halt(self, rollout_id: str, why: str) -> None:
        await self.svc.worker.run(self.svc.store.set_rollout_state, rollout_id, "reverting", actor="henge",
                                  reason=f"halted: {why}", revert=True)
        self.svc.events.emit("rollout_halting", None, rollout=rollout_id, reason=why)
        log.warning("rollout.halt id=%s reason=%s", rollout_id, why)

    @staticmethod
    async def _sleep(poke: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):  # a tick, not a failure
            await asyncio.wait_for(poke.wait(), timeout)
        if poke.is_set():
            await asyncio.sleep(COALESCE)  # reports come in bursts: count once for the burst
        poke.clear()


def _mark(delivered: set[str], device: str) -> Callable[[asyncio.Future[None]], None]:
    def done(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            delivered.add(device)

    return done


def _policy_dict(policy: Policy) -> dict[str, Any]:
    return {"max_rejected": policy.max_rejected, "rejected_percent": policy.rejected_percent,
            "min_applied": policy.min_applied, "wave_timeout": policy.wave_timeout, "pause": policy.pause}
