"""The admin protocol: requests on ``{prefix}/admin/request``, replies on the requester's topic.

One handler per operation, each an argument model plus a coroutine over the service's library
API: the CLI and an embedding application reach exactly the same code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .. import models
from ..errors import HengeError, UnknownDevice, ValidationFailed
from ..ids import StrictJSONError, strict_json
from ..models import AdminReply, AdminRequest, ConfigVersion

if TYPE_CHECKING:
    from .composer import HengeService

log = logging.getLogger("henge_mqtt.service")

Progress = Callable[[dict[str, Any]], None]


def no_progress(_: dict[str, Any]) -> None:
    return None


def error_reply(request_id: str, code: str, message: str) -> AdminReply:
    return AdminReply(id=request_id, ok=False, error=models.AdminError(code=code, message=message))


async def handle(svc: HengeService, payload: bytes) -> None:
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


async def dispatch(svc: HengeService, request: AdminRequest, progress: Progress = no_progress) -> AdminReply:
    handler = OPS.get(request.op)
    if handler is None:
        return error_reply(request.id, "unknown_op", f"unknown operation {request.op!r}")
    args_model, method = handler
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


def _version_dict(row: ConfigVersion, *, with_config: bool = True) -> dict[str, Any]:
    data = row.model_dump(mode="json")
    if not with_config:
        data.pop("config")
    return data


async def _device_add(svc: HengeService, a: models.DeviceAddArgs, progress: Progress) -> Any:
    return {"device": a.device, "secret": await svc.add_device(a.device, a.labels)}


async def _device_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return [d.model_dump(mode="json") for d in await svc.list_devices()]


async def _device_show(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    device = await svc.get_device(a.device)
    return device.model_dump(mode="json") | {"status": (await svc.status(a.device))[0]}


async def _device_remove(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    await svc.remove_device(a.device)
    return {"device": a.device, "removed": True}


async def _device_rotate(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "secret": await svc.rotate_secret(a.device)}


async def _push(svc: HengeService, a: models.PushArgs, progress: Progress) -> Any:
    if (a.config is None) == (a.patch is None):
        raise ValidationFailed("give exactly one of config or patch")
    row, stored = await svc.push_checked(a.device, a.config, message=a.message, if_version=a.if_version,
                                         force=a.force, patch=a.patch)
    return _version_dict(row, with_config=False) | {"unchanged": not stored}


async def _get(svc: HengeService, a: models.GetArgs, progress: Progress) -> Any:
    return _version_dict(await svc.get_version(a.device, a.version))


async def _history(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return [_version_dict(r, with_config=False) for r in await svc.history(a.device)]


async def _diff(svc: HengeService, a: models.DiffArgs, progress: Progress) -> Any:
    result = await svc.diff(a.device, a.a, a.b)
    return {"diff": result["diff"], "same": result["same"]}


async def _rollback(svc: HengeService, a: models.RollbackArgs, progress: Progress) -> Any:
    return _version_dict(await svc.rollback(a.device, a.version, message=a.message), with_config=False)


async def _status(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.status(a.device, a.labels, state=a.state, sync=a.sync, conflict=a.conflict)


async def _wait(svc: HengeService, a: models.WaitArgs, progress: Progress) -> Any:
    return await svc.wait_for_report(a.device, a.version, a.timeout)


async def _device_import(svc: HengeService, a: models.ImportArgs, progress: Progress) -> Any:
    secrets = await svc.import_devices([(d.id, d.labels) for d in a.devices], update=a.update)
    return {"secrets": secrets, "updated": len(a.devices) - len(secrets)}


async def _backup(svc: HengeService, a: models.BackupArgs, progress: Progress) -> Any:
    return await svc.backup(a.path)


async def _device_label(svc: HengeService, a: models.LabelArgs, progress: Progress) -> Any:
    return {"device": a.device, "labels": await svc.set_labels(a.device, dict(a.set), a.remove)}


async def _device_export(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return [{"id": d.id, "labels": d.labels} for d in await svc.list_devices()]


async def _push_many(svc: HengeService, a: models.PushManyArgs, progress: Progress) -> Any:
    return await svc.fleet_push(a.config, all_devices=a.all, labels=dict(a.labels), message=a.message, force=a.force,
                                delivery_timeout=a.delivery_timeout, wait=a.report_timeout, progress=progress)


async def _audit(svc: HengeService, a: models.AuditArgs, progress: Progress) -> Any:
    return await svc.audit(a.device, a.limit)


async def _kick(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    result = await svc.kick(a.device)
    return {"device": a.device, "kicked": result.kicked, "supported": result.supported, "detail": result.detail}


async def _clear_conflict(svc: HengeService, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "cleared": await svc.clear_conflict(a.device)}


async def _token_create(svc: HengeService, a: models.TokenCreateArgs, progress: Progress) -> Any:
    return await svc.create_token(a.name, a.role)


async def _token_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_tokens()


async def _token_revoke(svc: HengeService, a: models.TokenRefArgs, progress: Progress) -> Any:
    return await svc.revoke_token(a.token)


async def _schema_set(svc: HengeService, a: models.SchemaSetArgs, progress: Progress) -> Any:
    return await svc.set_schema(dict(a.labels), a.document, force=a.force)


async def _schema_get(svc: HengeService, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.get_schema(dict(a.labels), a.version)


async def _schema_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_schemas()


async def _schema_history(svc: HengeService, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.schema_history(dict(a.labels))


async def _schema_remove(svc: HengeService, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.remove_schema(dict(a.labels))


async def _layer_set(svc: HengeService, a: models.LayerSetArgs, progress: Progress) -> Any:
    return await svc.set_layer(a.name, dict(a.content), labels=dict(a.labels) if a.labels is not None else None,
                               priority=a.priority, message=a.message, force=a.force)


async def _layer_get(svc: HengeService, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.get_layer(a.name, a.version)


async def _layer_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_layers()


async def _layer_history(svc: HengeService, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.layer_history(a.name)


async def _layer_diff(svc: HengeService, a: models.LayerDiffArgs, progress: Progress) -> Any:
    result = await svc.layer_diff(a.name, a.a, a.b)
    return {"diff": result["diff"], "same": result["same"]}


async def _layer_rollback(svc: HengeService, a: models.LayerRefArgs, progress: Progress) -> Any:
    if a.version is None:
        raise ValidationFailed("give the version to roll the layer back to")
    return await svc.rollback_layer(a.name, a.version, message=a.message)


async def _layer_remove(svc: HengeService, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.remove_layer(a.name, message=a.message, force=a.force)


async def _explain(svc: HengeService, a: models.ExplainArgs, progress: Progress) -> Any:
    return await svc.explain(a.device, a.version)


async def _rollout_start(svc: HengeService, a: models.RolloutStartArgs, progress: Progress) -> Any:
    if not a.all and not a.labels and a.layer is None:
        raise ValidationFailed("select the rollout's devices with --all or --label k=v (or stage a --layer change)")
    return await svc.start_rollout(dict(a.config), all_devices=a.all, labels=dict(a.labels) or None,
                                   waves=list(a.waves) if a.waves else None, wave_size=a.wave_size,
                                   max_rejected=a.max_rejected, min_applied=a.min_applied,
                                   wave_timeout=a.wave_timeout, pause=a.pause, message=a.message,
                                   layer=a.layer.model_dump() if a.layer else None)


async def _rollout_status(svc: HengeService, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.rollout_status(a.rollout)


async def _rollout_list(svc: HengeService, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_rollouts()


async def _rollout_pause(svc: HengeService, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.pause_rollout(a.rollout)


async def _rollout_resume(svc: HengeService, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.resume_rollout(a.rollout)


async def _rollout_abort(svc: HengeService, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.abort_rollout(a.rollout, revert=a.revert)


def _unknown(device: str) -> UnknownDevice:
    return UnknownDevice(f"unknown device {device!r}")


OPS: dict[str, tuple[type[BaseModel], Callable[[HengeService, Any, Progress], Any]]] = {
    "device.add": (models.DeviceAddArgs, _device_add),
    "device.list": (models.StatusArgs, _device_list),
    "device.show": (models.DeviceRefArgs, _device_show),
    "device.remove": (models.DeviceRefArgs, _device_remove),
    "device.rotate_secret": (models.DeviceRefArgs, _device_rotate),
    "push": (models.PushArgs, _push),
    "get": (models.GetArgs, _get),
    "history": (models.DeviceRefArgs, _history),
    "diff": (models.DiffArgs, _diff),
    "rollback": (models.RollbackArgs, _rollback),
    "status": (models.StatusArgs, _status),
    "kick": (models.DeviceRefArgs, _kick),
    "wait": (models.WaitArgs, _wait),
    "audit": (models.AuditArgs, _audit),
    "device.import": (models.ImportArgs, _device_import),
    "device.label": (models.LabelArgs, _device_label),
    "backup": (models.BackupArgs, _backup),
    "device.export": (models.StatusArgs, _device_export),
    "push_many": (models.PushManyArgs, _push_many),
    "clear_conflict": (models.DeviceRefArgs, _clear_conflict),
    "rollout.start": (models.RolloutStartArgs, _rollout_start),
    "rollout.status": (models.RolloutRefArgs, _rollout_status),
    "rollout.list": (models.StatusArgs, _rollout_list),
    "rollout.pause": (models.RolloutRefArgs, _rollout_pause),
    "rollout.resume": (models.RolloutRefArgs, _rollout_resume),
    "rollout.abort": (models.RolloutRefArgs, _rollout_abort),
    "layer.set": (models.LayerSetArgs, _layer_set),
    "layer.get": (models.LayerRefArgs, _layer_get),
    "layer.list": (models.StatusArgs, _layer_list),
    "layer.history": (models.LayerRefArgs, _layer_history),
    "layer.diff": (models.LayerDiffArgs, _layer_diff),
    "layer.rollback": (models.LayerRefArgs, _layer_rollback),
    "layer.remove": (models.LayerRefArgs, _layer_remove),
    "explain": (models.ExplainArgs, _explain),
    "schema.set": (models.SchemaSetArgs, _schema_set),
    "schema.get": (models.SchemaRefArgs, _schema_get),
    "schema.list": (models.StatusArgs, _schema_list),
    "schema.history": (models.SchemaRefArgs, _schema_history),
    "schema.remove": (models.SchemaRefArgs, _schema_remove),
    "token.create": (models.TokenCreateArgs, _token_create),
    "token.list": (models.StatusArgs, _token_list),
    "token.revoke": (models.TokenRefArgs, _token_revoke),
}
