"""The HTTP API (``/api/v1``) and the console, over the service's library API.

A thin client, like the CLI: every route is one call of :class:`~henge_mqtt.service.api.ServiceAPI`
(the admin protocol's operations), so the two can never disagree. Every route is a route of the op
table (:mod:`henge_mqtt.ops`), which gives its role and summary (``x-henge-op`` and
``x-henge-role`` in the OpenAPI document; ``tests/test_http.py`` and ``tests/test_architecture.py``
walk it); bodies are parsed as strict JSON and bounded before they are read (``bodies.py``), and
every error is an RFC 9457 problem.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import AuthenticationFailed, Forbidden, HengeError, InvalidConfig, ValidationFailed, VersionConflict
from ..ids import labels_tag
from ..models import (
    ClaimCreateArgs,
    DeviceAddArgs,
    DeviceId,
    DeviceRefArgs,
    ImportArgs,
    PushPreviewArgs,
    RolloutStartArgs,
    SyncState,
    TokenCreateArgs,
)
from ..ops import ROUTES, Method
from ..results import (
    AuditEntry,
    BackupResult,
    ClaimInfo,
    ClaimRevoked,
    Diff,
    Explained,
    FleetSeries,
    LayerChange,
    LayerInForce,
    LayerPreview,
    LayerVersion,
    PresenceTimeline,
    PushPreview,
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
    TokenInfo,
    TokenRevoked,
)
from ..roles import ROLES, Role, allows
from ..service.api import ServiceAPI
from ..service.configs import no_progress
from ..service.context import current_actor
from ..service.handlers import HANDLERS
from ..service.schemas import parse_selector
from .bodies import (
    BODY_DEFS,
    CONFIG_BODY,
    PATCH_BODY,
    SCHEMA_BODY,
    BackupBody,
    BodyLimit,
    DeviceCreate,
    FleetPush,
    LabelsChange,
    LayerBody,
    RollbackBody,
    body_doc,
    etag,
    labels_of,
    parse_etag,
    parse_model,
    read_json,
)
from .problems import from_error, problem
from .stream import EventHub
from .usage import UseLog

RolloutId = Annotated[str, Path(max_length=64, description="r-xxxxxxxx")]
LayerName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="fleet or a layer's name")]
SchemaName = Annotated[str, Path(max_length=512, description="fleet, or the selector: k=v,k2=v2")]
WaitQ = Annotated[float | None, Query(gt=0, le=3600, description="wait this many seconds for the report")]
log = logging.getLogger("henge_mqtt.http")
F = TypeVar("F", bound=Callable[..., Any])
STATIC = resources.files("henge_mqtt.http") / "static"


class Caller(BaseModel):
    name: str
    role: Role


def create_app(svc: ServiceAPI, hub: EventHub, *, body_limit: int) -> FastAPI:
    """The API and console for one running service."""
    uses = UseLog(svc)

    def caller(role: Role) -> Callable[[Request], Awaitable[Caller]]:
        async def check(request: Request) -> Caller:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                await uses.note("http", "http.refused", "unauthenticated")
                raise AuthenticationFailed("send an API token: Authorization: Bearer <token>")
            found = svc.verify_token(token.strip())
            if found is None:
                await uses.note("http", "http.refused", "unknown_token")
                raise AuthenticationFailed("the API token is unknown or was revoked")
            name, has = found
            if not allows(has, role):
                await uses.note(f"token:{name}", "http.refused", "forbidden")
                raise Forbidden(f"the token {name!r} has role {has}; this needs {role}", role=has, needed=role)
            await uses.note(f"token:{name}", "http.use", "reads" if request.method == "GET" else "writes")
            current_actor.set(f"token:{name}")  # the audit trail names the token
            request.state.caller = Caller(name=name, role=has)  # type: ignore[arg-type]
            return request.state.caller  # type: ignore[no-any-return]

        return check

    checks = {role: Depends(caller(role)) for role in ROLES}

    def route(method: Method, path: str, **extra: Any) -> Callable[[F], F]:
        """A route of the op table (:mod:`henge_mqtt.ops`): its role and summary come from there; a route
        the table does not list cannot be declared."""
        op = ROUTES[(method, path)]
        options = {k: extra.pop(k) for k in ("status_code", "response_class", "responses") if k in extra}
        return api.api_route(path, methods=[method], summary=op.doc, dependencies=[checks[op.role]],
                             response_model=None,
                             openapi_extra={"x-henge-op": op.name, "x-henge-role": op.role,
                                            "security": [{"bearer": []}], **extra}, **options)

    app = FastAPI(title="henge-mqtt", version=__version__, openapi_url="/api/v1/openapi.json", docs_url=None,
                  redoc_url=None, description="The HTTP API of henge-mqtt: see docs/http.md.")

    @app.exception_handler(HengeError)
    async def henge_error(request: Request, exc: HengeError) -> Response:
        return from_error(exc, precondition=isinstance(exc, VersionConflict) and "if-match" in request.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "request"
        return problem("invalid", f"{where}: {first['msg'].removeprefix('Value error, ')}")

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        # A bug of ours: the client gets no internals; the server logs the traceback once.
        return problem("error", "internal error; the service log has the details", status=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
        return problem(code, str(exc.detail), status=exc.status_code)

    api = APIRouter(prefix="/api/v1")

    # ---- fleet view ------------------------------------------------------------------------------

    @route("GET", "/me")
    async def me(request: Request) -> dict[str, str]:
        """The token's name and role (the console shows what the role allows)."""
        who: Caller = request.state.caller
        return {"name": who.name, "role": who.role}

    @route("GET", "/summary")
    async def summary() -> dict[str, Any]:
        """Counts for the fleet at a glance."""
        return await svc.summary() | {"last_event_id": hub.last_id()}

    @route("GET", "/devices")
    async def devices(
        state: Literal["online", "offline", "quarantined"] | None = None,
        sync: SyncState | None = None,
        conflict: bool | None = None,
        label: Annotated[list[str] | None, Query(description="k=v, several ANDed")] = None,
        q: Annotated[str | None, Query(max_length=128, description="part of the device id")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
        cursor: Annotated[str | None, Query(max_length=128, description="next_cursor of the previous page")] = None,
        where: Annotated[str | None, Query(max_length=2048, description="a filter (docs/where.md), e.g. "
                                           'reported.fw < "2.4"')] = None,
    ) -> JSONResponse:
        """Status rows (as ``henge status --json``), by device id, a page at a time."""
        labels = labels_of(label or [])
        rows = await svc.status(None, labels or None, state=state, sync=sync, conflict=conflict, contains=q,
                                after=cursor or "", limit=limit + 1, where=where)
        page = rows[:limit]
        return JSONResponse({"items": page, "next_cursor": page[-1]["device"] if len(rows) > limit else None,
                             "last_event_id": hub.last_id()})

    @route("GET", "/devices/{device}")
    async def device(device: DeviceId) -> JSONResponse:
        """The device, its labels and its status row; ``ETag`` tags its labels (``If-Match`` on a
        labels edit refuses one that began from other labels)."""
        found = await svc.get_device(device)
        body = found.model_dump(mode="json") | {"status": (await svc.status(device))[0]}
        return JSONResponse(body, headers={"ETag": f'"{labels_tag(found.labels)}"'})

    @route("GET", "/devices/{device}/timeline")
    async def timeline(device: DeviceId, window: Annotated[Literal["24h", "7d"], Query()] = "24h"
                       ) -> PresenceTimeline:
        """The device's presence over the last day or week (stored), as segments and marks."""
        return await svc.presence_timeline(device, window)

    @route("GET", "/series")
    async def series(window: Annotated[Literal["24h", "7d"], Query()] = "24h") -> FleetSeries:
        """The fleet over the last day (a point a minute) or week (a point per 10 minutes), stored."""
        return await svc.fleet_series(window)

    @route("GET", "/devices/{device}/presence")
    async def presence(device: DeviceId) -> dict[str, Any]:
        """Recent connects and disconnects (epoch, reason, remote), newest first, from the service's
        in-memory event buffer (the last 10,000 events of this run)."""
        await svc.get_device(device)
        return {"device": device, "changes": [e.model_dump(mode="json") for e in hub.presence(device)]}

    @route("GET", "/devices/{device}/config")
    async def get_config(request: Request, device: DeviceId,
                         version: Annotated[int | None, Query(ge=1)] = None) -> Response:
        """The current (or a given) version; ``ETag`` is the version, ``If-None-Match`` gives 304."""
        row = await svc.get_version(device, version)
        tag = etag(row.version)
        match = request.headers.get("if-none-match") if version is None else None
        if match and (match.strip() == "*" or any(parse_etag(t) == row.version for t in match.split(","))):
            return Response(status_code=304, headers={"ETag": tag})
        return JSONResponse(row.model_dump(mode="json"), headers={"ETag": tag})

    async def _after_store(device: str, row: Any, stored: bool, wait: float | None) -> Response:
        body = row.model_dump(mode="json") | {"unchanged": not stored}
        body.pop("config", None)
        status = 200
        if wait:
            try:
                body["report"] = await svc.wait_for_report(device, row.version, wait)
            except HengeError as exc:
                if exc.code != "timeout":
                    raise
                body["report"] = None
                body["detail"] = str(exc)
                status = 202  # stored and published; the device has not answered yet
        return JSONResponse(body, status_code=status, headers={"ETag": etag(row.version)})

    @route("PUT", "/devices/{device}/config", **CONFIG_BODY)
    async def put_config(request: Request, device: DeviceId, message: Annotated[str, Query(max_length=1024)] = "",
                         force: bool = False, wait: WaitQ = None) -> Response:
        """Push a new version. ``If-Match: "N"`` stores only if N is current (else 412, nothing stored)."""
        config = await read_json(request)
        if not isinstance(config, dict):
            raise InvalidConfig("a config must be a JSON object at the top level; nothing was stored")
        if_version = _if_match(request)
        row, stored = await svc.push_checked(device, config, message=message, if_version=if_version, force=force)
        return await _after_store(device, row, stored, wait)

    @route("PATCH", "/devices/{device}/config", **PATCH_BODY)
    async def patch_config(request: Request, device: DeviceId,
                           message: Annotated[str, Query(max_length=1024)] = "", wait: WaitQ = None) -> Response:
        """An RFC 7396 merge patch of the current config, stored as a new version."""
        patch = await read_json(request, media=("application/merge-patch+json", "application/json"))
        if not isinstance(patch, dict):
            raise InvalidConfig("a merge patch must be a JSON object; nothing was stored")
        row, stored = await svc.push_checked(device, None, message=message, if_version=_if_match(request),
                                             patch=patch)
        return await _after_store(device, row, stored, wait)

    def _if_match(request: Request) -> int | None:
        header = request.headers.get("if-match")
        if header is None or header.strip() == "*":
            return None
        version = parse_etag(header)
        if version is None:
            raise ValidationFailed(f"If-Match must be a version in quotes, like \"3\", not {header!r}")
        return version

    @route("GET", "/devices/{device}/versions")
    async def versions(device: DeviceId) -> list[dict[str, Any]]:
        """Every version, oldest first, without the configs."""
        return [v.model_dump(mode="json", exclude={"config"}) for v in await svc.history(device)]

    @route("GET", "/devices/{device}/versions/{version}")
    async def one_version(device: DeviceId, version: Annotated[int, Path(ge=1)]) -> dict[str, Any]:
        return (await svc.get_version(device, version)).model_dump(mode="json")

    @route("GET", "/devices/{device}/diff")
    async def diff(device: DeviceId, a: Annotated[int, Query(ge=1)], b: Annotated[int, Query(ge=1)]) -> Diff:
        """A unified diff of two versions' configs (as ``henge diff``), and both configs."""
        return await svc.diff(device, a, b)

    @route("POST", "/devices/{device}/rollback", **body_doc(RollbackBody))
    async def rollback(request: Request, device: DeviceId, wait: WaitQ = None) -> Response:
        """Store an older version's config as a new version."""
        body = parse_model(RollbackBody, await read_json(request))
        row = await svc.rollback(device, body.version, message=body.message)
        return await _after_store(device, row, True, wait)

    @route("POST", "/devices/{device}/wait")
    async def wait_report(device: DeviceId, version: Annotated[int, Query(ge=1)],
                          timeout: Annotated[float, Query(gt=0, le=3600)] = 30.0) -> ReportOutcome:
        """Wait for the device's report on a version (as ``push --wait``); 504 when it does not come."""
        return await svc.wait_for_report(device, version, timeout)

    @route("POST", "/devices/{device}/kick")
    async def kick(device: DeviceId) -> dict[str, Any]:
        result = await svc.kick(device)
        return {"device": device, "kicked": result.kicked, "supported": result.supported, "detail": result.detail}

    @route("POST", "/devices/{device}/clear-conflict")
    async def clear_conflict(device: DeviceId) -> dict[str, Any]:
        return {"device": device, "cleared": await svc.clear_conflict(device)}

    @route("POST", "/push", **body_doc(FleetPush))
    async def fleet_push(request: Request) -> JSONResponse:
        """One config to every device (``all``), to those with all the ``labels``, or those ``where``
        matches (docs/where.md), answered per device
        (delivered, applied, rejected, offline); ``wait`` waits that long for every report."""
        body = parse_model(FleetPush, await read_json(request))
        result = await svc.fleet_push(body.config, all_devices=body.all, labels=body.labels or None,
                                      where=body.where, message=body.message, force=body.force,
                                      delivery_timeout=body.delivery_timeout, wait=body.wait)
        status = 200 if not body.wait or result["pending"] == 0 else 202
        return JSONResponse(result, status_code=status)

    @route("POST", "/push/preview", **body_doc(PushPreviewArgs))
    async def push_preview(request: Request) -> PushPreview:
        """What a fleet push would store now: the devices that would change and the first one's diff;
        nothing is stored."""
        body = parse_model(PushPreviewArgs, await read_json(request))
        return await svc.preview_fleet_push(body.config, all_devices=body.all, labels=body.labels or None,
                                            where=body.where)

    @route("GET", "/audit")
    async def audit(device: DeviceId | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                    ) -> list[AuditEntry]:
        """The newest entries, oldest first."""
        return await svc.audit(device, limit)

    @route("GET", "/devices/{device}/audit")
    async def device_audit(device: DeviceId, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                           ) -> list[AuditEntry]:
        return await svc.audit(device, limit)

    @route("GET", "/events", response_class=StreamingResponse,
           responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request,
                     device: Annotated[list[str] | None, Query(description="only these devices")] = None,
                     type: Annotated[list[str] | None, Query(description="only these event types")] = None,
                     ) -> StreamingResponse:
        """Server-Sent Events; ``Last-Event-ID`` resumes from the replay buffer (else ``event: reset``)."""
        client, reset = hub.subscribe(devices=frozenset(device) if device else None,
                                      types=frozenset(type) if type else None,
                                      last_event_id=request.headers.get("last-event-id"))
        return StreamingResponse(hub.stream(client, reset), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # ---- rollouts --------------------------------------------------------------------------------------

    @route("GET", "/rollouts")
    async def rollouts() -> list[RolloutSummary]:
        return await svc.list_rollouts()

    @route("GET", "/rollouts/{rollout}")
    async def rollout(rollout: RolloutId) -> RolloutStatus:
        """Per wave: targeted, online, delivered, applied, rejected, offline, pending, reverted, errors."""
        return await svc.rollout_status(rollout)

    @route("POST", "/rollouts/preview", **body_doc(RolloutStartArgs))
    async def preview_rollout(request: Request) -> RolloutPreview:
        """What ``POST /rollouts`` would do with this body (devices, wave sizes, changes), started nowhere."""
        result: RolloutPreview = await HANDLERS["rollout.preview"](
            svc, parse_model(RolloutStartArgs, await read_json(request)), no_progress)
        return result

    @route("POST", "/rollouts", status_code=201, **body_doc(RolloutStartArgs))
    async def start_rollout(request: Request) -> JSONResponse:
        """A staged rollout of ``config`` to ``all`` devices or those with ``labels`` (docs/rollouts.md)."""
        result = await HANDLERS["rollout.start"](svc, parse_model(RolloutStartArgs, await read_json(request)),
                                                 no_progress)
        return JSONResponse(result, status_code=201)

    @route("POST", "/rollouts/{rollout}/pause")
    async def pause_rollout(rollout: RolloutId) -> RolloutStatus:
        return await svc.pause_rollout(rollout)

    @route("POST", "/rollouts/{rollout}/resume")
    async def resume_rollout(rollout: RolloutId) -> RolloutStatus:
        return await svc.resume_rollout(rollout)

    @route("POST", "/rollouts/{rollout}/abort")
    async def abort_rollout(rollout: RolloutId, revert: bool = False) -> RolloutStatus:
        """Stop it for good; ``revert=true`` puts every device it changed back on its previous config."""
        return await svc.abort_rollout(rollout, revert=revert)

    # ---- layers ----------------------------------------------------------------------------------------

    @route("GET", "/layers")
    async def layers() -> list[LayerInForce]:
        """The layers in force, in merge order (each device's own layer comes last)."""
        return await svc.list_layers()

    @route("GET", "/layers/{name}")
    async def layer(name: LayerName, version: Annotated[int | None, Query(ge=1)] = None) -> LayerVersion:
        return await svc.get_layer(name, version)

    @route("GET", "/layers/{name}/history")
    async def layer_versions(name: LayerName) -> list[LayerVersion]:
        return await svc.layer_history(name)

    @route("GET", "/layers/{name}/diff")
    async def layer_diff(name: LayerName, a: Annotated[int, Query(ge=1)],
                         b: Annotated[int, Query(ge=1)]) -> Diff:
        return await svc.layer_diff(name, a, b)

    @route("PUT", "/layers/{name}", **body_doc(LayerBody))
    async def put_layer(request: Request, name: LayerName) -> LayerChange:
        """Set a layer (``fleet``, or a label layer with ``labels``, ``priority`` and ``where``); the
        devices whose config changes get a new version in the same transaction. ``If-Match: "N"``
        stores only if N is the layer's current version (else 412, nothing stored)."""
        body = parse_model(LayerBody, await read_json(request))
        return await svc.set_layer(name, body.content, labels=body.labels, priority=body.priority,
                                   message=body.message, force=body.force, where=body.where,
                                   if_version=_if_match(request))

    @route("POST", "/layers/{name}/preview", **body_doc(LayerBody))
    async def preview_layer(request: Request, name: LayerName) -> LayerPreview:
        """What ``PUT /layers/{name}`` would do with this body, stored nowhere."""
        body = parse_model(LayerBody, await read_json(request))
        return await svc.preview_layer(name, body.content, labels=body.labels, priority=body.priority,
                                       where=body.where)

    @route("POST", "/layers/{name}/rollback", **body_doc(RollbackBody))
    async def rollback_layer(request: Request, name: LayerName) -> LayerChange:
        body = parse_model(RollbackBody, await read_json(request))
        return await svc.rollback_layer(name, body.version, message=body.message)

    @route("DELETE", "/layers/{name}")
    async def remove_layer(name: LayerName, force: bool = False) -> LayerChange:
        return await svc.remove_layer(name, force=force)

    @route("POST", "/devices/{device}/reconcile")
    async def reconcile(device: DeviceId) -> Reconciled:
        """Deliver the device's current version again (a config edited on the device is put back)."""
        return await svc.reconcile(device)

    @route("GET", "/devices/{device}/reported")
    async def reported(device: DeviceId, history: bool = False) -> ReportedState:
        """What the device last reported it is and runs; ``history``: its kept documents, newest first."""
        return await svc.reported(device, history=history)

    @route("GET", "/devices/{device}/explain")
    async def explain(device: DeviceId, version: Annotated[int | None, Query(ge=1)] = None) -> list[Explained]:
        """Per value of the device's config: its JSON pointer and the layer that set it."""
        return await svc.explain(device, version)

    # ---- schemas ---------------------------------------------------------------------------------------

    @route("GET", "/schemas")
    async def schemas() -> list[SchemaInForce]:
        """The schemas in force."""
        return await svc.list_schemas()

    @route("GET", "/schemas/{name}")
    async def schema(name: SchemaName, version: Annotated[int | None, Query(ge=1)] = None) -> SchemaVersion:
        return await svc.get_schema(parse_selector(name), version)

    @route("GET", "/schemas/{name}/history")
    async def schema_versions(name: SchemaName) -> list[SchemaVersion]:
        return await svc.schema_history(parse_selector(name))

    @route("PUT", "/schemas/{name}", **SCHEMA_BODY)
    async def put_schema(request: Request, name: SchemaName, force: bool = False) -> SchemaChange:
        """Set a JSON Schema 2020-12 document; refused (422, one error per violation) if current configs
        break it, unless ``force``. ``If-Match: "N"`` stores it only if N is the schema's current
        version (``"0"``: none yet; else 412, nothing stored)."""
        return await svc.set_schema(parse_selector(name), await read_json(request), force=force,
                                    if_version=_if_match(request))

    @route("POST", "/schemas/{name}/preview", **SCHEMA_BODY)
    async def preview_schema(request: Request, name: SchemaName) -> SchemaPreview:
        """What ``PUT /schemas/{name}`` would say of this document, stored nowhere."""
        return await svc.preview_schema(parse_selector(name), await read_json(request))

    @route("DELETE", "/schemas/{name}")
    async def remove_schema(name: SchemaName) -> SchemaChange:
        return await svc.remove_schema(parse_selector(name))

    # ---- admin: devices, tokens, backup ----------------------------------------------------------------

    @route("POST", "/devices", status_code=201, **body_doc(DeviceCreate))
    async def add_device(request: Request) -> JSONResponse:
        """Register a device; the answer holds its secret, the only time it is shown."""
        body = parse_model(DeviceCreate, await read_json(request))
        args = DeviceAddArgs(device=body.device, labels=body.labels)
        return JSONResponse(await HANDLERS["device.add"](svc, args, no_progress), status_code=201)

    @route("POST", "/devices/import", **body_doc(ImportArgs))
    async def import_devices(request: Request) -> dict[str, Any]:
        """Many devices in one transaction (as ``henge device import``); ``update`` changes the labels
        of those that exist. The answer holds the new devices' secrets, shown only here."""
        return await HANDLERS["device.import"](svc, parse_model(ImportArgs, await read_json(request)),  # type: ignore[no-any-return]
                                               no_progress)

    @route("DELETE", "/devices/{device}")
    async def remove_device(device: DeviceId) -> dict[str, Any]:
        return await HANDLERS["device.remove"](svc, DeviceRefArgs(device=device), no_progress)  # type: ignore[no-any-return]

    @route("POST", "/devices/{device}/secret")
    async def rotate(device: DeviceId) -> dict[str, Any]:
        """A new secret (shown once); the old one stops working and its connection is closed."""
        return await HANDLERS["device.rotate_secret"](svc, DeviceRefArgs(device=device), no_progress)  # type: ignore[no-any-return]

    @route("PATCH", "/devices/{device}/labels", **body_doc(LabelsChange))
    async def labels(request: Request, device: DeviceId) -> dict[str, Any]:
        body = parse_model(LabelsChange, await read_json(request))
        labels_of([f"{k}={v}" for k, v in body.set.items()])  # the same rules as the CLI
        match = request.headers.get("if-match")
        tag = match.strip().removeprefix("W/").strip('"') if match else None
        return {"device": device, "labels": await svc.set_labels(device, body.set, body.remove, if_tag=tag)}

    @route("GET", "/tokens")
    async def tokens() -> list[TokenInfo]:
        """Every token (never the token itself), with its last use in this run."""
        found = await svc.list_tokens()
        for token in found:
            used = uses.last_used.get(token["name"])
            token["last_used_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used)) if used else None
        return found

    @route("POST", "/tokens", status_code=201, **body_doc(TokenCreateArgs))
    async def create_token(request: Request) -> JSONResponse:
        """A new token; the answer holds it, the only time it is shown."""
        body = parse_model(TokenCreateArgs, await read_json(request))
        return JSONResponse(await svc.create_token(body.name, body.role), status_code=201)

    @route("DELETE", "/tokens/{token}")
    async def revoke_token(token: Annotated[str, Path(max_length=64)]) -> TokenRevoked:
        return await svc.revoke_token(token)

    @route("GET", "/claims")
    async def claims() -> list[ClaimInfo]:
        """Every claim with its uses, expiry and state (never its secret)."""
        return await svc.list_claims()

    @route("POST", "/claims", status_code=201, **body_doc(ClaimCreateArgs))
    async def create_claim(request: Request) -> JSONResponse:
        """A new claim; the answer holds its secret and claim file, the only time they are shown."""
        body = parse_model(ClaimCreateArgs, await read_json(request))
        return JSONResponse(await svc.create_claim(body.name, dict(body.labels), body.uses, body.expires_in,
                                                   broker=body.broker, ca=body.ca), status_code=201)

    @route("DELETE", "/claims/{claim}")
    async def revoke_claim(claim: Annotated[str, Path(max_length=64)]) -> ClaimRevoked:
        return await svc.revoke_claim(claim)

    @route("POST", "/backup", **body_doc(BackupBody))
    async def backup(request: Request) -> BackupResult:
        """A consistent copy of the store, written on the service's machine."""
        body = parse_model(BackupBody, await read_json(request))
        return await svc.backup(body.path)

    app.include_router(api)

    # ---- the console and the API's interactive page (assets in the package: no CDN) -----------------

    @app.get("/", include_in_schema=False)
    async def console() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(), headers=SECURITY_HEADERS)

    @app.get("/api/v1/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/api/v1/openapi.json", title="henge-mqtt API",
                                   swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = original_openapi()
        components = schema.setdefault("components", {})
        for name, definition in BODY_DEFS.items():
            components.setdefault("schemas", {}).setdefault(name, definition)
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "henge token create --role viewer|operator|admin"}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.uses = uses  # HttpServer.stop writes the last minute
    app.add_middleware(BodyLimit, limit=body_limit)
    return app


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
