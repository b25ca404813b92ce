"""Every operation of the service, declared once.

An operation has a name (the admin protocol's ``op``), the least role allowed to run it (the HTTP
API's tokens; the admin identity can run them all), a one-line doc, its argument and result models
and the HTTP routes that run it. From this one table:

- the admin protocol's dispatch validates ``args`` with the named model and runs the handler
  registered for the name (``service/handlers.py``; a missing or extra handler fails at import);
- the HTTP API takes each route's role and summary from it (``x-henge-op`` and ``x-henge-role`` in
  the OpenAPI document; a test checks both ways that routes and table agree);
- the CLI takes its commands' help lines from it;
- docs/protocol.md's op table and docs/http.md's route table are generated from it
  (``python -m henge_mqtt.ops`` prints them; ``tests/test_docs.py`` checks the files).

Models are named, not imported: this module is plain data, so the CLI reads it without loading
pydantic (``henge --help`` stays quick). ``args`` names a model in :mod:`henge_mqtt.models`;
``returns`` names the result's type in :mod:`henge_mqtt.results` (``TypedDict``s, checked by mypy
where the service builds them) or :mod:`henge_mqtt.models`; ``result`` says it in words for the docs.

Adding an operation is one entry here, one handler, and the service method it calls.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from .roles import Role

Method = Literal["GET", "PUT", "PATCH", "POST", "DELETE"]


class Route(NamedTuple):
    method: Method
    path: str  # under /api/v1


class Op(NamedTuple):  # NamedTuples, not dataclasses: the CLI starts without loading ``dataclasses``
    name: str
    role: Role
    doc: str  # one line: the CLI's help, the route's summary, the docs' table
    args: str  # a model in henge_mqtt.models
    args_doc: str  # the fields as the protocol table lists them
    result: str  # what the reply's ``result`` holds
    routes: tuple[Route, ...] = ()
    admin: bool = True  # False: an HTTP-only view (the console's), not on the admin topic
    returns: str = ""  # the result's type: a name in henge_mqtt.results or henge_mqtt.models, or list[...]


def _r(spec: str) -> Route:
    method, path = spec.split(" ", 1)
    return Route(method, path)  # type: ignore[arg-type]


def _op(name: str, role: Role, doc: str, args: str, args_doc: str, result: str, *routes: str,
        admin: bool = True, returns: str) -> Op:
    return Op(name, role, doc, args, args_doc, result, tuple(_r(r) for r in routes), admin, returns)


TABLE: tuple[Op, ...] = (
    # ---- devices ---------------------------------------------------------------------------------------
    _op("device.add", "admin", "Register a device; its secret is shown only this once.",
        "DeviceAddArgs", "`device`, `labels`",
        "`{device, labels, secret, broker}` (`broker`: `{applied, how, detail}`, what the broker did)",
        "POST /devices", returns="DeviceSecret"),
    _op("device.list", "viewer", "List devices with their labels and current version.",
        "StatusArgs", "", "list of devices", returns="list[Device]"),
    _op("device.show", "viewer", "Show one device: its labels and its status row.",
        "DeviceRefArgs", "`device`", "device with `status`", "GET /devices/{device}", returns="Device"),
    _op("device.remove", "admin", "Remove a device, its history and its retained topics; its connection is closed.",
        "DeviceRefArgs", "`device`", "`{device, removed, broker}`", "DELETE /devices/{device}",
        returns="DeviceRemoved"),
    _op("device.rotate_secret", "admin",
        "Give a device a new secret (shown once); the old one stops working and its connection is closed.",
        "DeviceRefArgs", "`device`", "`{device, secret, broker}`", "POST /devices/{device}/secret",
        returns="DeviceSecret"),
    _op("device.import", "admin", "Create many devices in one transaction (all or nothing).",
        "ImportArgs", "`devices: [{id, labels}]`, `update?`",
        "`{secrets: {id: secret}, updated, broker}`; all or nothing (`update`: existing devices get the labels given)",
        "POST /devices/import", returns="Imported"),
    _op("device.label", "admin", "Set and remove a device's labels.",
        "LabelArgs", "`device`, `set: {k: v}`, `remove: [k]`", "`{device, labels}`", "PATCH /devices/{device}/labels",
            returns="DeviceLabels"),
    _op("device.export", "viewer", "Every device with its labels, ready for import.",
        "StatusArgs", "", "`[{id, labels}]`", returns="list[ExportedDevice]"),
    _op("status", "viewer", "Devices with their connection state, versions and sync.",
        "StatusArgs", "`device?`, `labels?`, `state?`, `sync?`, `conflict?`, `where?` ([where.md](where.md))",
        "one status object per device (`GET /devices` pages them: `limit`, `cursor`, `q`, `where`)", "GET /devices",
            returns="list[StatusRow]"),
    _op("summary", "viewer", "Fleet counts at a glance: online, offline, quarantined, conflicts, sync.",
        "StatusArgs", "", "`{devices, online, offline, quarantined, conflicts, sync: {in_sync, drift, pending, "
        "rejected, unknown, invalid}}`", "GET /summary", returns="FleetSummary"),
    _op("kick", "operator", "Close a device's current connection.",
        "DeviceRefArgs", "`device`", "`{device, kicked, supported, detail}`; with an external broker `kicked` and "
        "`supported` are false and `detail` says why", "POST /devices/{device}/kick", returns="Kicked"),
    _op("clear_conflict", "operator", "Clear a device's identity-conflict flag and any quarantine.",
        "DeviceRefArgs", "`device`", "`{device, cleared}`", "POST /devices/{device}/clear-conflict",
            returns="ConflictCleared"),
    # ---- configs ---------------------------------------------------------------------------------------
    _op("push", "operator",
        "Store a new config version for a device and publish it; unchanged content stores nothing.",
        "PushArgs", "`device`, `config` or `patch` (RFC 7396), `if_version?`, `message?`, `force?`",
        "the version (without config) and `unchanged`: true when the content equalled the current one and "
        "nothing was stored (unless `force`)", "PUT /devices/{device}/config", "PATCH /devices/{device}/config",
            returns="ConfigVersion"),
    _op("get", "viewer", "A config version (the current one unless a version is given), with the device's report.",
        "GetArgs", "`device`, `version?`", "the version with its config and `report`",
        "GET /devices/{device}/config", "GET /devices/{device}/versions/{version}", returns="ConfigVersion"),
    _op("history", "viewer", "Every version of a device's config, each with the device's report of it.",
        "DeviceRefArgs", "`device`", "all versions (without configs), each with `report`: `{status, error, at, "
        "epoch}` or null", "GET /devices/{device}/versions", returns="list[ConfigVersion]"),
    _op("diff", "viewer", "What changed between two versions of a device's config.",
        "DiffArgs", "`device`, `a`, `b`", "`{diff, same}` (unified diff of pretty JSON; HTTP adds both configs)",
        "GET /devices/{device}/diff", returns="Diff"),
    _op("rollback", "operator",
        "Publish an old version's content again, as a new version (history is never rewritten).",
        "RollbackArgs", "`device`, `version`, `message?`", "the new version", "POST /devices/{device}/rollback",
            returns="ConfigVersion"),
    _op("wait", "viewer", "Wait for a device's report on a version.",
        "WaitArgs", "`device`, `version`, `timeout`", "`{device, version, status, error}` once the device reports "
        "`version` applied (or a later one) or rejected; error `timeout` otherwise", "POST /devices/{device}/wait",
            returns="ReportOutcome"),
    _op("explain", "viewer", "Per value of a device's config: its JSON pointer and the layer that set it.",
        "ExplainArgs", "`device`, `version?`", "per value of the config: `{pointer, value, layer}`",
        "GET /devices/{device}/explain", returns="list[Explained]"),
    _op("reconcile", "operator",
        "Deliver a device's current version again (its agent rewrites a config file edited on the device).",
        "ReconcileArgs", "`device`", "`{device, version, online, sync}`: `online` whether it was connected to get it "
        "now (an offline device gets it when it connects, as always); `sync` as it stood before",
        "POST /devices/{device}/reconcile", returns="Reconciled"),
    _op("reported", "viewer", "What a device last reported it is and runs, and (with history) what it said before.",
        "ReportedArgs", "`device`, `history?`",
        "`{device, document, seq, changed_at, at, epoch}` (`document` null before its first report; `history`: "
        "`[{seq, at, epoch, document}]`, newest first)", "GET /devices/{device}/reported", returns="ReportedState"),
    _op("push_many", "operator",
        "One config to every device, to those with all the labels or to those a filter matches, answered per device.",
        "PushManyArgs", "`all`, `labels` and/or `where`, `config`, `message?`, `force?`, `delivery_timeout?`, "
        "`report_timeout?`",
        "`{targeted, devices, unchanged, online, offline, delivered, acknowledged, applied, rejected, pending, "
        "errors, listed: {rejected, offline, silent}, per_device: {ID: {version, online, delivered, report, "
        "error}}, versions, timings_ms: {first_published, all_published}, waited}`: counted in devices "
        "([rollouts.md](rollouts.md#fleet-answers)); `delivered` (and its old name `acknowledged`) is `null` with "
        "an external broker. Stored and published in chunks (see [operations.md](operations.md#fleet-pushes)); "
        "progress messages `{\"id\", \"progress\": {...}}` go to `reply_to`: `{\"stored\", \"of\"}` after each "
        "chunk, then the counts while it waits for acknowledgements (and, with `report_timeout`, for every "
        "device's report)", "POST /push", returns="FleetAnswer"),
    _op("push_preview", "viewer",
        "What a fleet push would change, stored nowhere: how many devices, which, and one device's diff.",
        "PushPreviewArgs", "`all`, `labels` and/or `where`, `config`",
        "`{targeted, change, unchanged, devices, more, example}`: `devices` names the first 200 that would get a "
        "new version (`more`: how many besides), `example` is the first one's `{device, from_version, to_version, "
        "diff}` (a unified diff) or null; schemas are checked when a push stores, not here",
        "POST /push/preview", returns="PushPreview"),
    # ---- audit, backup ---------------------------------------------------------------------------------
    _op("audit", "viewer", "Who did what, when: every admin action, oldest first (secrets never appear).",
        "AuditArgs", "`device?`, `limit?`", "audit entries, oldest first", "GET /audit", "GET /devices/{device}/audit",
            returns="list[AuditEntry]"),
    _op("backup", "admin", "A consistent copy of the store, written on the service's machine.",
        "BackupArgs", "`path` (absolute, on the service's machine)",
        "`{path, bytes}`: a consistent copy of the store, mode 0600", "POST /backup", returns="BackupResult"),
    # ---- rollouts --------------------------------------------------------------------------------------
    _op("rollout.start", "operator",
        "Start a staged rollout: wave by wave, on while devices apply, halting and reverting on rejections.",
        "RolloutStartArgs", "`all`, `labels` and/or `where`, `config` (or `layer: {name, content, labels?, "
        "priority?}`), `waves?` or `wave_size?`, `max_rejected?` (N or P%), `min_applied?`, `wave_timeout?`, "
        "`pause?`, `message?`",
        "the rollout's status (as `rollout.status`)", "POST /rollouts", returns="RolloutStatus"),
    _op("rollout.preview", "viewer",
        "What a rollout would do, started nowhere: its devices, the size of each wave, the configs it changes.",
        "RolloutStartArgs", "as `rollout.start`",
        "`{targeted, waves, change, unchanged, example}`: `waves` the devices per wave (which device is in which is "
        "drawn when it starts), `example` the first changed device's `{device, from_version, to_version, diff}` (a "
        "config rollout) or null; every schema is checked, as at the start", "POST /rollouts/preview",
        returns="RolloutPreview"),
    _op("rollout.status", "viewer",
        "Per wave: targeted, online, delivered, applied, rejected, offline, pending, reverted; errors by message.",
        "RolloutRefArgs", "`rollout`", "`{id, state, reason, message, target, policy, actor, created_at, "
        "finished_at, wave, waves: [{wave, targeted, published, online, delivered, applied, rejected, offline, "
        "pending, reverted, errors}], devices, kept}`: each wave's numbers frozen when it is decided "
        "([rollouts.md](rollouts.md#staged-rollouts))", "GET /rollouts/{rollout}", returns="RolloutStatus"),
    _op("rollout.list", "viewer", "Every rollout, oldest first.",
        "StatusArgs", "", "`[{id, state, reason, actor, created_at, finished_at, wave, waves}]`", "GET /rollouts",
            returns="list[RolloutSummary]"),
    _op("rollout.pause", "operator", "Stop a rollout before its next step (a wave already out stays out).",
        "RolloutRefArgs", "`rollout`", "the rollout's status", "POST /rollouts/{rollout}/pause",
            returns="RolloutStatus"),
    _op("rollout.resume", "operator", "Go on with a paused rollout.",
        "RolloutRefArgs", "`rollout`", "the rollout's status", "POST /rollouts/{rollout}/resume",
            returns="RolloutStatus"),
    _op("rollout.abort", "operator", "Stop a rollout for good; with revert, undo what it changed.",
        "RolloutRefArgs", "`rollout`, `revert?`", "the rollout's status (with `revert`, once the devices are back)",
        "POST /rollouts/{rollout}/abort", returns="RolloutStatus"),
    # ---- layers ----------------------------------------------------------------------------------------
    _op("layer.set", "operator",
        "Set a layer; every device whose config changes gets a new version (streamed in chunks, as a fleet push).",
        "LayerSetArgs", "`name`, `content`, `labels?`, `where?`, `priority?`, `message?`, `force?`",
        "`{layer, version, devices, versions}` (+ `new_devices_invalid` when `force` stored a layer a new device "
        "would break)", "PUT /layers/{name}", returns="LayerChange"),
    _op("layer.preview", "viewer",
        "What a layer change would do, stored nowhere: the devices it changes, one diff, what schemas say.",
        "LayerSetArgs", "as `layer.set` (`message` and `force` unused)",
        "`{layer, change, devices, more, example, invalid, new_devices_invalid}`: `devices` the first 200 it "
        "changes, `example` the first one's `{device, from_version, to_version, diff}`, `invalid` and "
        "`new_devices_invalid` the schema violations `layer.set` would refuse it for (one line each)",
        "POST /layers/{name}/preview", returns="LayerPreview"),
    _op("layer.get", "viewer", "A layer's content (the current version unless a version is given).",
        "LayerRefArgs", "`name`, `version?`", "the layer's version: `{version, content, labels, priority, message, "
        "created_at, actor, removed}`", "GET /layers/{name}", returns="LayerVersion"),
    _op("layer.list", "viewer", "The layers in force, in merge order (the device's own layer comes last).",
        "StatusArgs", "", "the layers in force, in merge order", "GET /layers", returns="list[LayerInForce]"),
    _op("layer.history", "viewer", "Every version of a layer, removals included.",
        "LayerRefArgs", "`name`", "every version of the layer", "GET /layers/{name}/history",
            returns="list[LayerVersion]"),
    _op("layer.diff", "viewer", "Unified diff between two versions of a layer.",
        "LayerDiffArgs", "`name`, `a`, `b`", "`{diff, same}` (HTTP adds `a` and `b`)", "GET /layers/{name}/diff",
            returns="Diff"),
    _op("layer.rollback", "operator", "A layer's older version (content, labels, priority) as its new version.",
        "LayerRefArgs", "`name`, `version`, `message?`", "as `layer.set`", "POST /layers/{name}/rollback",
            returns="LayerChange"),
    _op("layer.remove", "operator",
        "Stop applying a layer (its history stays); devices whose config changes get a new version.",
        "LayerRefArgs", "`name`, `message?`, `force?`", "`{layer, version, removed, devices}`",
        "DELETE /layers/{name}", returns="LayerChange"),
    # ---- schemas ---------------------------------------------------------------------------------------
    _op("schema.set", "admin",
        "Set the schema for the fleet or for devices with labels; refused if current configs break it.",
        "SchemaSetArgs", "`labels?`, `document`, `force?`, `if_version?` (stored only if the schema is at that "
        "version, 0: none yet; else `version_conflict`)", "`{schema, version, invalid_devices}`",
        "PUT /schemas/{name}", returns="SchemaChange"),
    _op("schema.preview", "viewer",
        "What setting a schema would say, stored nowhere: the devices whose current config it refuses.",
        "SchemaSetArgs", "as `schema.set` (`force` unused)",
        "`{schema, version, invalid_devices, more, violations}` (the first 200 devices and violations, one line "
        "each), or `invalid_schema` when the document is not a JSON Schema", "POST /schemas/{name}/preview",
        returns="SchemaPreview"),
    _op("schema.get", "viewer", "A schema document (the current version unless a version is given).",
        "SchemaRefArgs", "`labels?`, `version?`", "`{schema, version, document, created_at, actor}`",
        "GET /schemas/{name}", returns="SchemaVersion"),
    _op("schema.list", "viewer", "The schemas in force.",
        "StatusArgs", "", "`[{schema, labels, version}]`", "GET /schemas", returns="list[SchemaInForce]"),
    _op("schema.history", "viewer", "Every version of a schema, removals included.",
        "SchemaRefArgs", "`labels?`", "every version of the schema", "GET /schemas/{name}/history",
            returns="list[SchemaVersion]"),
    _op("schema.remove", "admin", "Stop enforcing a schema (its history stays).",
        "SchemaRefArgs", "`labels?`", "`{schema, version, removed}`", "DELETE /schemas/{name}", returns="SchemaChange"),
    # ---- tokens ----------------------------------------------------------------------------------------
    _op("token.create", "admin", "Create a bearer token (shown only this once; only its hash is kept).",
        "TokenCreateArgs", "`name`, `role` (`viewer`, `operator`, `admin`)",
        "`{id, name, role, token}` (the token only here)", "POST /tokens", returns="TokenCreated"),
    _op("token.list", "admin", "Tokens with their roles (never the tokens themselves).",
        "StatusArgs", "", "`[{id, name, role, created_at, created_by}]` (HTTP adds `last_used_at`)", "GET /tokens",
            returns="list[TokenInfo]"),
    _op("token.revoke", "admin", "Revoke a token: it stops working at once.",
        "TokenRefArgs", "`token` (id or name)", "`{id, name, role, revoked}`", "DELETE /tokens/{token}",
            returns="TokenRevoked"),
    # ---- onboarding by claim ---------------------------------------------------------------------------
    _op("claim.create", "admin",
        "Create a claim: a credential a batch of devices shares to get identities of their own (shown once).",
        "ClaimCreateArgs", "`name`, `labels`, `uses`, `expires_in` (seconds), `broker?` (the URL devices use), "
        "`ca?` (a claim CA, PEM)",
        "`{id, name, labels, uses, expires_at, secret, credential, broker}`: `credential` is the claim file a "
        "device's agent reads (`henge agent --claim FILE`); the secret only here; `broker`: what an external "
        "broker did with the claim's user (as `device.add`'s)", "POST /claims", returns="ClaimCreated"),
    _op("claim.list", "admin", "Claims with their uses, expiry and state (never their secrets).",
        "StatusArgs", "", "`[{id, name, labels, uses, used, left, expires_at, state, ca, created_at, created_by}]`",
        "GET /claims", returns="list[ClaimInfo]"),
    _op("claim.revoke", "admin", "Revoke a claim: it stops working at once (devices it created keep theirs).",
        "ClaimRefArgs", "`claim` (id or name)", "`{id, name, used, revoked, broker}`", "DELETE /claims/{claim}",
        returns="ClaimRevoked"),
    # ---- HTTP-only views (the console's) ---------------------------------------------------------------
    _op("me", "viewer", "The token's name and role (the console shows what the role allows).",
        "StatusArgs", "", "`{name, role}`", "GET /me", admin=False, returns="Caller"),
    _op("presence", "viewer", "A device's recent connects and disconnects, newest first (this run's events).",
        "DeviceRefArgs", "`device`", "`{device, changes}`", "GET /devices/{device}/presence", admin=False,
            returns="PresenceChanges"),
    _op("timeline", "viewer",
        "A device's presence over the last day or week, from the stored history: segments and marks.",
        "TimelineArgs", "`device`, `window` (`24h` or `7d`)",
        "`{device, window, from, to, segments: [{from, to, state}], marks: [{at, state, reason, epoch}]}`: "
        "`state` online, offline or unknown (before the first change kept) for segments, takeover or conflict for "
        "marks; kept a week, it survives restarts", "GET /devices/{device}/timeline", admin=False,
        returns="PresenceTimeline"),
    _op("series", "viewer",
        "The fleet over the last day or week: devices, online, in sync, pending, rejected, drift, conflicts.",
        "SeriesArgs", "`window` (`24h`: a point a minute; `7d`: a point per 10 minutes, averaged)",
        "`{window, step_s, points: [{at, devices, online, in_sync, pending, rejected, drift, conflicts}]}`: "
        "stored once a minute and kept a week (it survives restarts); a minute the service was down has no point",
        "GET /series", admin=False, returns="FleetSeries"),
    _op("events", "viewer", "Server-Sent Events; Last-Event-ID resumes from the replay buffer.",
        "StatusArgs", "`device?`, `type?`", "an event stream", "GET /events", admin=False, returns="Event"),
)

OPS: dict[str, Op] = {op.name: op for op in TABLE}
ADMIN_OPS: frozenset[str] = frozenset(op.name for op in TABLE if op.admin)
ROUTES: dict[tuple[str, str], Op] = {(r.method, r.path): op for op in TABLE for r in op.routes}


def doc(name: str) -> str:
    """The one-line doc of an operation (the CLI's help lines come from here)."""
    return OPS[name].doc


def protocol_table() -> str:
    """docs/protocol.md's table of the admin protocol's operations."""
    lines = ["| op | role | args | result |", "|---|---|---|---|"]
    lines += [f"| `{op.name}` | {op.role} | {op.args_doc} | {op.result} |" for op in TABLE if op.admin]
    return "\n".join(lines)


def http_table() -> str:
    """docs/http.md's table of routes (under ``/api/v1``)."""
    lines = ["| method | path | role | op | what |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | `/api/v1{r.path}` | {op.role} | `{op.name}` | {op.doc} |"
              for op in TABLE for r in op.routes]
    return "\n".join(lines)


GENERATED = {"docs/protocol.md": ("ops:protocol", protocol_table), "docs/http.md": ("ops:http", http_table)}


def with_tables(path: str, text: str) -> str:
    """``text`` (a doc of :data:`GENERATED`) with its table between its markers written anew."""
    marker, table = GENERATED[path]
    start, end = f"<!-- {marker}: generated by python -m henge_mqtt.ops -->", f"<!-- /{marker} -->"
    before, found, rest = text.partition(start)
    if not found:
        raise ValueError(f"{path} has no {start} marker")
    return f"{before}{start}\n{table()}\n{end}{rest.partition(end)[2]}"


if __name__ == "__main__":  # rewrite the docs' tables: python -m henge_mqtt.ops
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in GENERATED:
        (root / path).write_text(with_tables(path, (root / path).read_text()))
