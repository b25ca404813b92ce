"""Errors as RFC 9457 problem details: the admin protocol's codes, an HTTP status for each.

A client branches on ``code`` (the same string the CLI's ``--json`` and the admin protocol
report); ``type`` is a URN made of it, since a gateway may have no internet to look a URL up on.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from ..errors import Forbidden, HengeError, LabelsConflict, SchemaViolation, VersionConflict

STATUS: dict[str, int] = {
    "invalid": 422,
    "invalid_device_id": 422,
    "invalid_config": 422,
    "schema_violation": 422,
    "invalid_schema": 422,
    "config_too_large": 413,
    "unknown_device": 404,
    "unknown_version": 404,
    "unknown_token": 404,
    "unknown_layer": 404,
    "unknown_rollout": 404,
    "rollout_conflict": 409,
    "not_found": 404,
    "duplicate_device": 409,
    "duplicate_token": 409,
    "version_conflict": 409,  # 412 when the version came from If-Match
    "labels_conflict": 412,  # only ever from If-Match
    "timeout": 504,
    "store_error": 500,
    "service_unavailable": 503,
    "authentication_failed": 401,
    "forbidden": 403,
    "not_supported": 501,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "unsupported_media_type": 415,
}

TITLES: dict[int, str] = {
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    412: "Precondition Failed", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def problem(code: str, detail: str, *, status: int | None = None, **extra: Any) -> Response:
    status = status or STATUS.get(code, 400)
    body = {"type": f"urn:henge:problem:{code}", "title": TITLES.get(status, "Bad Request"), "status": status,
            "detail": detail, "code": code, **extra}
    headers = {"WWW-Authenticate": 'Bearer realm="henge"'} if status == 401 else None
    return Response(json.dumps(body), status_code=status, media_type="application/problem+json", headers=headers)


def from_error(exc: HengeError, *, precondition: bool = False) -> Response:
    extra: dict[str, Any] = {}
    status = None
    if isinstance(exc, VersionConflict):
        extra = {"device": exc.device, "expected": exc.expected, "current": exc.current}
        status = 412 if precondition else 409
    elif isinstance(exc, LabelsConflict):
        extra = {"device": exc.device, "current": exc.current}
    elif isinstance(exc, SchemaViolation):
        extra = {"errors": exc.errors[:100]}
    elif isinstance(exc, Forbidden):
        extra = {"role": exc.role, "needed": exc.needed}
    return problem(exc.code, str(exc), status=status, **extra)
