"""The handlers of the admin protocol's operations: each adapts an operation's argument model
(named in :mod:`henge_mqtt.ops`) to one call of the service's library API.

One handler per operation of the table, registered with :func:`handles`; at import, a missing or
extra handler is an error (an op declared without a handler, or a handler for no op, cannot ship).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .. import models
from ..errors import ValidationFailed
from ..models import ConfigVersion
from ..ops import ADMIN_OPS
from ..ports import IdentitySync
from ..results import DeviceRemoved, DeviceSecret, Imported
from .api import ServiceAPI, broker_note
from .fleet import Progress

Handler = Callable[[ServiceAPI, Any, Progress], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {}


def handles(op: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        if op not in ADMIN_OPS or op in HANDLERS:
            raise RuntimeError(f"handler for {op!r}: not an admin op of henge_mqtt.ops, or registered twice")
        HANDLERS[op] = fn
        return fn

    return register


def _version_dict(row: ConfigVersion, *, with_config: bool = True) -> dict[str, Any]:
    data = row.model_dump(mode="json")
    if not with_config:
        data.pop("config")
    return data


@handles("device.add")
async def _device_add(svc: ServiceAPI, a: models.DeviceAddArgs, progress: Progress) -> DeviceSecret:
    said: list[IdentitySync] = []
    secret = await svc.add_device(a.device, a.labels, broker=said)
    return {"device": a.device, "labels": dict(a.labels), "secret": secret, "broker": broker_note(said)}


@handles("device.list")
async def _device_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return [d.model_dump(mode="json") for d in await svc.list_devices()]


@handles("device.show")
async def _device_show(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> Any:
    device = await svc.get_device(a.device)
    return device.model_dump(mode="json") | {"status": (await svc.status(a.device))[0]}


@handles("device.remove")
async def _device_remove(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> DeviceRemoved:
    said: list[IdentitySync] = []
    await svc.remove_device(a.device, broker=said)
    return {"device": a.device, "removed": True, "broker": broker_note(said)}


@handles("device.rotate_secret")
async def _device_rotate(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> DeviceSecret:
    said: list[IdentitySync] = []
    secret = await svc.rotate_secret(a.device, broker=said)
    return {"device": a.device, "secret": secret, "broker": broker_note(said)}


@handles("push")
async def _push(svc: ServiceAPI, a: models.PushArgs, progress: Progress) -> Any:
    if (a.config is None) == (a.patch is None):
        raise ValidationFailed("give exactly one of config or patch")
    row, stored = await svc.push_checked(a.device, a.config, message=a.message, if_version=a.if_version,
                                         force=a.force, patch=a.patch)
    return _version_dict(row, with_config=False) | {"unchanged": not stored}


@handles("get")
async def _get(svc: ServiceAPI, a: models.GetArgs, progress: Progress) -> Any:
    return _version_dict(await svc.get_version(a.device, a.version))


@handles("history")
async def _history(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return [_version_dict(r, with_config=False) for r in await svc.history(a.device)]


@handles("diff")
async def _diff(svc: ServiceAPI, a: models.DiffArgs, progress: Progress) -> Any:
    result = await svc.diff(a.device, a.a, a.b)
    return {"diff": result["diff"], "same": result["same"]}


@handles("rollback")
async def _rollback(svc: ServiceAPI, a: models.RollbackArgs, progress: Progress) -> Any:
    return _version_dict(await svc.rollback(a.device, a.version, message=a.message), with_config=False)


@handles("status")
async def _status(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.status(a.device, a.labels, state=a.state, sync=a.sync, conflict=a.conflict, where=a.where)


@handles("wait")
async def _wait(svc: ServiceAPI, a: models.WaitArgs, progress: Progress) -> Any:
    return await svc.wait_for_report(a.device, a.version, a.timeout)


@handles("device.import")
async def _device_import(svc: ServiceAPI, a: models.ImportArgs, progress: Progress) -> Any:
    said: list[IdentitySync] = []
    secrets = await svc.import_devices([(d.id, d.labels) for d in a.devices], update=a.update, broker=said,
                                       progress=progress)
    answer: Imported = {"secrets": secrets, "updated": len(a.devices) - len(secrets)}
    if said:
        answer["broker"] = broker_note(said)
    return answer


@handles("backup")
async def _backup(svc: ServiceAPI, a: models.BackupArgs, progress: Progress) -> Any:
    return await svc.backup(a.path)


@handles("device.label")
async def _device_label(svc: ServiceAPI, a: models.LabelArgs, progress: Progress) -> Any:
    return {"device": a.device, "labels": await svc.set_labels(a.device, dict(a.set), a.remove)}


@handles("device.export")
async def _device_export(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return [{"id": d.id, "labels": d.labels} for d in await svc.list_devices()]


@handles("push_many")
async def _push_many(svc: ServiceAPI, a: models.PushManyArgs, progress: Progress) -> Any:
    return await svc.fleet_push(a.config, all_devices=a.all, labels=dict(a.labels), where=a.where, message=a.message,
                                force=a.force,
                                delivery_timeout=a.delivery_timeout, wait=a.report_timeout, progress=progress)


@handles("push_preview")
async def _push_preview(svc: ServiceAPI, a: models.PushPreviewArgs, progress: Progress) -> Any:
    return await svc.preview_fleet_push(a.config, all_devices=a.all, labels=dict(a.labels), where=a.where)


@handles("audit")
async def _audit(svc: ServiceAPI, a: models.AuditArgs, progress: Progress) -> Any:
    return await svc.audit(a.device, a.limit)


@handles("kick")
async def _kick(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> Any:
    result = await svc.kick(a.device)
    return {"device": a.device, "kicked": result.kicked, "supported": result.supported, "detail": result.detail}


@handles("clear_conflict")
async def _clear_conflict(svc: ServiceAPI, a: models.DeviceRefArgs, progress: Progress) -> Any:
    return {"device": a.device, "cleared": await svc.clear_conflict(a.device)}


@handles("token.create")
async def _token_create(svc: ServiceAPI, a: models.TokenCreateArgs, progress: Progress) -> Any:
    return await svc.create_token(a.name, a.role)


@handles("token.list")
async def _token_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_tokens()


@handles("token.revoke")
async def _token_revoke(svc: ServiceAPI, a: models.TokenRefArgs, progress: Progress) -> Any:
    return await svc.revoke_token(a.token)


@handles("claim.create")
async def _claim_create(svc: ServiceAPI, a: models.ClaimCreateArgs, progress: Progress) -> Any:
    return await svc.create_claim(a.name, dict(a.labels), a.uses, a.expires_in, broker=a.broker, ca=a.ca)


@handles("claim.list")
async def _claim_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_claims()


@handles("claim.revoke")
async def _claim_revoke(svc: ServiceAPI, a: models.ClaimRefArgs, progress: Progress) -> Any:
    return await svc.revoke_claim(a.claim)


@handles("schema.set")
async def _schema_set(svc: ServiceAPI, a: models.SchemaSetArgs, progress: Progress) -> Any:
    return await svc.set_schema(dict(a.labels), a.document, force=a.force, if_version=a.if_version)


@handles("schema.preview")
async def _schema_preview(svc: ServiceAPI, a: models.SchemaSetArgs, progress: Progress) -> Any:
    return await svc.preview_schema(dict(a.labels), a.document)


@handles("schema.get")
async def _schema_get(svc: ServiceAPI, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.get_schema(dict(a.labels), a.version)


@handles("schema.list")
async def _schema_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_schemas()


@handles("schema.history")
async def _schema_history(svc: ServiceAPI, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.schema_history(dict(a.labels))


@handles("schema.remove")
async def _schema_remove(svc: ServiceAPI, a: models.SchemaRefArgs, progress: Progress) -> Any:
    return await svc.remove_schema(dict(a.labels))


@handles("layer.set")
async def _layer_set(svc: ServiceAPI, a: models.LayerSetArgs, progress: Progress) -> Any:
    return await svc.set_layer(a.name, dict(a.content), labels=dict(a.labels) if a.labels is not None else None,
                               priority=a.priority, message=a.message, force=a.force, where=a.where,
                               if_version=a.if_version)


@handles("layer.get")
async def _layer_get(svc: ServiceAPI, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.get_layer(a.name, a.version)


@handles("layer.list")
async def _layer_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_layers()


@handles("layer.history")
async def _layer_history(svc: ServiceAPI, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.layer_history(a.name)


@handles("layer.diff")
async def _layer_diff(svc: ServiceAPI, a: models.LayerDiffArgs, progress: Progress) -> Any:
    result = await svc.layer_diff(a.name, a.a, a.b)
    return {"diff": result["diff"], "same": result["same"]}


@handles("layer.rollback")
async def _layer_rollback(svc: ServiceAPI, a: models.LayerRefArgs, progress: Progress) -> Any:
    if a.version is None:
        raise ValidationFailed("give the version to roll the layer back to")
    return await svc.rollback_layer(a.name, a.version, message=a.message)


@handles("layer.remove")
async def _layer_remove(svc: ServiceAPI, a: models.LayerRefArgs, progress: Progress) -> Any:
    return await svc.remove_layer(a.name, message=a.message, force=a.force)


@handles("reconcile")
async def _reconcile(svc: ServiceAPI, a: models.ReconcileArgs, progress: Progress) -> Any:
    return await svc.reconcile(a.device)


@handles("reported")
async def _reported(svc: ServiceAPI, a: models.ReportedArgs, progress: Progress) -> Any:
    return await svc.reported(a.device, history=a.history)


@handles("explain")
async def _explain(svc: ServiceAPI, a: models.ExplainArgs, progress: Progress) -> Any:
    return await svc.explain(a.device, a.version)


@handles("layer.preview")
async def _layer_preview(svc: ServiceAPI, a: models.LayerSetArgs, progress: Progress) -> Any:
    return await svc.preview_layer(a.name, dict(a.content), labels=dict(a.labels) if a.labels is not None else None,
                                   priority=a.priority, where=a.where)


@handles("rollout.preview")
async def _rollout_preview(svc: ServiceAPI, a: models.RolloutStartArgs, progress: Progress) -> Any:
    return await svc.preview_rollout(dict(a.config), all_devices=a.all, labels=dict(a.labels) or None,
                                     waves=list(a.waves) if a.waves else None, wave_size=a.wave_size,
                                     max_rejected=a.max_rejected, min_applied=a.min_applied,
                                     wave_timeout=a.wave_timeout, pause=a.pause,
                                     layer=a.layer.model_dump() if a.layer else None, where=a.where)


@handles("rollout.start")
async def _rollout_start(svc: ServiceAPI, a: models.RolloutStartArgs, progress: Progress) -> Any:
    return await svc.start_rollout(dict(a.config), all_devices=a.all, labels=dict(a.labels) or None,
                                   waves=list(a.waves) if a.waves else None, wave_size=a.wave_size,
                                   max_rejected=a.max_rejected, min_applied=a.min_applied,
                                   wave_timeout=a.wave_timeout, pause=a.pause, message=a.message,
                                   layer=a.layer.model_dump() if a.layer else None, where=a.where)


@handles("rollout.status")
async def _rollout_status(svc: ServiceAPI, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.rollout_status(a.rollout)


@handles("rollout.list")
async def _rollout_list(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.list_rollouts()


@handles("rollout.pause")
async def _rollout_pause(svc: ServiceAPI, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.pause_rollout(a.rollout)


@handles("rollout.resume")
async def _rollout_resume(svc: ServiceAPI, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.resume_rollout(a.rollout)


@handles("rollout.abort")
async def _rollout_abort(svc: ServiceAPI, a: models.RolloutRefArgs, progress: Progress) -> Any:
    return await svc.abort_rollout(a.rollout, revert=a.revert)


@handles("summary")
async def _summary(svc: ServiceAPI, a: models.StatusArgs, progress: Progress) -> Any:
    return await svc.summary()


_missing = ADMIN_OPS - HANDLERS.keys()
if _missing:
    raise RuntimeError(f"admin ops without a handler: {sorted(_missing)}")
