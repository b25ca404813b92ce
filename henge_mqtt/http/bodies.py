"""What the HTTP API reads: request bodies, parsed as strict JSON and bounded before they are read
(``BodyLimit``), then validated by these models; conditional-request headers (``ETag``).

Every failure here is one of ours (``ValidationFailed``, ``InvalidConfig``), which ``app.py`` turns
into an RFC 9457 problem.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidConfig, ValidationFailed
from ..ids import StrictJSONError, parse_labels, strict_json
from ..models import DeviceId
from .problems import problem


class DeviceCreate(BaseModel):
    device: DeviceId
    labels: dict[str, str] = Field(default_factory=dict)


class LabelsChange(BaseModel):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class RollbackBody(BaseModel):
    version: int = Field(ge=1)
    message: str = Field(default="", max_length=1024)


class FleetPush(BaseModel):
    all: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    where: str | None = Field(default=None, max_length=2048)  # docs/where.md
    config: dict[str, Any]
    message: str = Field(default="", max_length=1024)
    force: bool = False
    delivery_timeout: float = Field(default=10.0, ge=0, le=3600)
    wait: float | None = Field(default=None, gt=0, le=3600)


class LayerBody(BaseModel):
    content: dict[str, Any]
    labels: dict[str, str] | None = None
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    message: str = Field(default="", max_length=1024)
    force: bool = False  # store it even if a device added later would break its schemas
    where: str | None = Field(default=None, max_length=2048)  # None: unchanged; "": none (docs/where.md)


class BackupBody(BaseModel):
    path: str = Field(min_length=1, max_length=4096)


CONFIG_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "the device's whole config"}}}}}
SCHEMA_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "a JSON Schema 2020-12 document"}}}}}
PATCH_BODY = {"requestBody": {"required": True, "content": {
    "application/merge-patch+json": {"schema": {"type": "object", "description": "an RFC 7396 merge patch"}}}}}


BODY_DEFS: dict[str, Any] = {}  # models the body schemas refer to, added to the OpenAPI components


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a body we parse ourselves (strict JSON first, then ``model``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    BODY_DEFS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


IMPORT_LIMIT = 16 * 1024 * 1024  # POST /devices/import: up to 100,000 devices in one body


class BodyLimit:
    """Pure ASGI: a request body over ``limit`` bytes is refused (413) before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.default = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = IMPORT_LIMIT if scope["path"] == "/api/v1/devices/import" else self.default
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await problem("body_too_large", f"request bodies are limited to {limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, bounded, send)
        except BodyTooLarge:
            await problem("body_too_large", f"request bodies are limited to {limit} bytes")(scope, receive, send)


class BodyTooLarge(Exception):
    pass


async def read_json(request: Request, *, media: tuple[str, ...] = ("application/json",)) -> Any:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind not in media:
        raise UnsupportedMedia(f"send the body as {' or '.join(media)}, not {kind!r}")
    raw = await request.body()
    try:
        return strict_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidConfig("the body is not UTF-8") from exc
    except StrictJSONError as exc:
        raise InvalidConfig(f"the body is not strict JSON: {exc}; nothing was stored") from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise InvalidConfig(f"the body is not JSON: {exc}; nothing was stored") from exc
    except RecursionError as exc:
        raise InvalidConfig("the body nests too deeply; nothing was stored") from exc


class UnsupportedMedia(ValidationFailed):
    code = "unsupported_media_type"


def parse_model(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValidationFailed(f"{where}: {first['msg'].removeprefix('Value error, ')}") from exc


def labels_of(pairs: list[str]) -> dict[str, str]:
    try:
        return parse_labels(pairs)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from exc


def etag(version: int) -> str:
    return f'"{version}"'


def parse_etag(header: str) -> int | None:
    value = header.strip()
    value = value.removeprefix("W/").strip('"')
    return int(value) if value.isdigit() else None
