"""The admin protocol: requests on ``{prefix}/admin/request``, replies on the requester's topic.

Driven by the op table (:mod:`henge_mqtt.ops`): the request's ``args`` are validated with the op's
argument model, then its handler (``handlers.py``) calls the service's library API, so the CLI and
an embedding application reach exactly the same code.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from .. import models
from ..errors import HengeError
from ..ids import StrictJSONError, strict_json
from ..models import AdminReply, AdminRequest
from ..ops import ADMIN_OPS, OPS
from .api import ServiceAPI
from .configs import no_progress
from .fleet import Progress
from .handlers import HANDLERS

log = logging.getLogger("henge_mqtt.service")


def error_reply(request_id: str, code: str, message: str) -> AdminReply:
    return AdminReply(id=request_id, ok=False, error=models.AdminError(code=code, message=message))


async def handle(svc: ServiceAPI, payload: bytes) -> None:
    """One request from the admin topic; the reply goes to the topic the request names."""
    try:
        request = AdminRequest.model_validate_json(payload)
    except ValidationError as exc:
        log.warning("admin.bad_request error=%s", exc.errors()[0]["msg"])
        return
    broker = svc.broker
    if not request.reply_to.startswith(svc.topics.admin_reply("")):
        log.warning("admin.bad_reply_to reply_to=%s", request.reply_to)
        return

    def progress(state: dict[str, Any]) -> None:
        broker.publish(request.reply_to, json.dumps({"id": request.id, "progress": state}).encode(), qos=0)

    try:
        strict_json(payload.decode("utf-8"))  # NaN, Infinity or a key given twice: refused, not guessed
    except (StrictJSONError, UnicodeDecodeError) as exc:
        reply = error_reply(request.id, "invalid_config", f"the request is not strict JSON: {exc}; nothing was stored")
    else:
        reply = await dispatch(svc, request, progress)
    broker.publish(request.reply_to, reply.model_dump_json().encode(), qos=1)


async def dispatch(svc: ServiceAPI, request: AdminRequest, progress: Progress = no_progress) -> AdminReply:
    if request.op not in ADMIN_OPS:
        return error_reply(request.id, "unknown_op", f"unknown operation {request.op!r}")
    args_model: type[BaseModel] = getattr(models, OPS[request.op].args)
    method = HANDLERS[request.op]
    try:
        args = args_model.model_validate(request.args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        code = "invalid_device_id" if where == "device" else "invalid"
        return error_reply(request.id, code, f"{where}: {first['msg'].removeprefix('Value error, ')}")
    try:
        result = await method(svc, args, progress)
    except HengeError as exc:
        return error_reply(request.id, exc.code, str(exc))
    return AdminReply(id=request.id, ok=True, result=result)
