"""The shapes of the service's answers: what each operation returns, typed.

``TypedDict``s, not classes: an answer is the JSON the admin protocol, the HTTP API and ``--json``
print, key for key, so the library hands out exactly that (a ``dict`` an application can pass on as
it is) while mypy checks every place that builds one. The op table (:mod:`henge_mqtt.ops`) names the
result of each operation; pydantic can validate any of them (``TypeAdapter(StatusRow)``).

Plain data like :mod:`henge_mqtt.models`: nothing of ours is imported here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, NotRequired, TypedDict

# ---- devices ---------------------------------------------------------------------------------------


class BrokerNote(TypedDict):
    """What the broker did with an identity change (``ports.IdentitySync``)."""

    applied: bool  # the broker knows it now
    how: str  # "store" (embedded), "dynamic-security" (Mosquitto, live) or "password-file"
    detail: str  # when not applied: what an operator must do


class DeviceSecret(TypedDict):
    """A device's new secret: shown in this answer only."""

    device: str
    secret: str
    labels: NotRequired[dict[str, str]]  # device.add says them back
    broker: NotRequired[BrokerNote]


class DeviceRemoved(TypedDict):
    device: str
    removed: bool
    broker: NotRequired[BrokerNote]


class DeviceLabels(TypedDict):
    device: str
    labels: dict[str, str]


class ExportedDevice(TypedDict):
    """One line of ``henge device export``: what ``device import`` reads back."""

    id: str
    labels: dict[str, str]


class Kicked(TypedDict):
    device: str
    kicked: bool
    supported: bool  # False with an external broker: ``detail`` says why
    detail: str


class ConflictCleared(TypedDict):
    device: str
    cleared: bool


class Caller(TypedDict):
    """Who an HTTP API token is (``GET /api/v1/me``)."""

    name: str
    role: str


class PresenceChanges(TypedDict):
    device: str
    changes: list[dict[str, Any]]  # events (models.Event), newest first


class Imported(TypedDict):
    secrets: dict[str, str]  # the new devices' secrets, shown in this answer only
    updated: int
    broker: NotRequired[BrokerNote]


class SessionInfo(TypedDict):
    """A device's persistent MQTT session: kept ``expiry`` seconds after it disconnects."""

    persistent: bool
    expiry: int
    expires_at: str | None  # None while connected


class StatusRow(TypedDict):
    """One device as ``henge status --json`` shows it (docs/protocol.md)."""

    device: str
    labels: dict[str, str]
    state: str  # online, offline, quarantined
    online: bool
    epoch: int
    since: str | None
    remote: str | None
    reason: str | None
    desired_version: int
    takeovers: int
    conflict: bool
    conflict_remotes: list[str]
    quarantined_until: str | None
    applied_version: int | None
    applied_at: str | None
    sync: str  # one of SYNC_STATES
    reported_at: str | None  # when its latest reported state arrived
    error: str | None
    rejected_version: int | None
    undeliverable: dict[str, Any] | None  # why its config cannot reach it (too large for its client)
    schema_error: str | None
    session: SessionInfo | None


# Every sync state a device can be in (docs/protocol.md#reports), in the order henge lists them;
# ``models.SyncState`` is the same set as a type (tests/test_twins.py checks they agree).
SYNC_STATES = ("in_sync", "drift", "pending", "rejected", "unknown", "invalid")


class SyncCounts(TypedDict):
    in_sync: int
    drift: int
    pending: int
    rejected: int
    unknown: int
    invalid: int


class FleetSummary(TypedDict):
    """The fleet at a glance: each device counted once per line (state, conflict, sync)."""

    devices: int
    online: int
    offline: int
    quarantined: int
    conflicts: int
    sync: SyncCounts


def fleet_summary(devices: Iterable[tuple[str, str, bool]]) -> FleetSummary:
    """The one way henge counts a fleet, from each device's ``(state, sync, conflict)``: the HTTP
    API's ``/summary``, the ``summary`` op, ``henge status``'s last line and ``--summary``."""
    states: Counter[str] = Counter()
    sync: Counter[str] = Counter()
    conflicts = total = 0
    for state, synced, conflict in devices:
        total += 1
        states[state] += 1
        sync[synced] += 1
        conflicts += conflict
    return {"devices": total, "online": states["online"], "offline": states["offline"],
            "quarantined": states["quarantined"], "conflicts": conflicts,
            "sync": {"in_sync": sync["in_sync"], "drift": sync["drift"], "pending": sync["pending"],
                     "rejected": sync["rejected"], "unknown": sync["unknown"], "invalid": sync["invalid"]}}


def summary_line(summary: FleetSummary) -> str:
    """A summary on one line, ``key=count`` (``henge status``'s last line)."""
    flat = {k: v for k, v in summary.items() if k != "sync"} | dict(summary["sync"])
    return " ".join(f"{k}={v}" for k, v in flat.items())


class ReportOutcome(TypedDict):
    device: str
    version: int
    status: str  # applied, rejected
    error: str | None


class AuditEntry(TypedDict):
    id: int
    at: str | None
    actor: str
    action: str
    device: str | None
    summary: dict[str, Any]


# ---- configs ---------------------------------------------------------------------------------------


class Diff(TypedDict):
    diff: str  # unified, of the pretty JSON
    same: bool
    a: Any  # the older side (a config, or a layer's version)
    b: Any


class Explained(TypedDict):
    pointer: str  # RFC 6901
    value: Any
    layer: str  # fleet@3, a label layer's ref, or "device"


class Reconciled(TypedDict):
    device: str
    version: int  # the current version, delivered again
    online: bool  # connected to get it now
    sync: str  # as it stood before (drift, for a device whose file was edited)


class ReportedDocument(TypedDict):
    seq: int
    at: str  # when it arrived (RFC 3339)
    epoch: int | None  # the connection it came in on
    document: dict[str, Any]


class ReportedState(TypedDict):
    """What a device last said it is and runs (docs/protocol.md#reported-state)."""

    device: str
    document: dict[str, Any] | None  # None: it never reported
    seq: int  # +1 at every change; 0 before the first
    changed_at: str | None
    at: str | None  # when the latest message arrived, changed or not
    epoch: int | None
    history: NotRequired[list[ReportedDocument]]  # newest first, the current one included


class DeviceOutcome(TypedDict):
    version: int
    online: bool
    delivered: bool | None  # None with an external broker (acknowledgements are not observable)
    report: str | None
    error: str | None


class Listed(TypedDict):
    rejected: list[str]
    offline: list[str]
    silent: list[str]


class PushPreviewDiff(TypedDict):
    device: str
    from_version: int | None  # None: the device has no config yet
    to_version: int
    diff: str  # unified, of the indented key-sorted JSON (as henge diff)


class PushPreview(TypedDict):
    """What a fleet push would store now; nothing is stored."""

    targeted: int
    change: int  # devices that would get a new version
    unchanged: int  # already at what they would get
    devices: list[str]  # the first PREVIEW_DEVICES of those that would change, by id
    more: int  # how many more would change
    example: PushPreviewDiff | None  # the first one's change


TimelineSegment = TypedDict("TimelineSegment", {"from": str, "to": str, "state": str})  # online, offline, unknown


class TimelineMark(TypedDict):
    at: str
    state: str  # takeover (a newer connection took over), conflict (two devices fighting over the identity)
    reason: str | None
    epoch: int | None


PresenceTimeline = TypedDict("PresenceTimeline", {
    "device": str, "window": str, "from": str, "to": str,
    "segments": list[TimelineSegment],  # the whole window, oldest first
    "marks": list[TimelineMark],
})


class SeriesPoint(TypedDict):
    at: str  # the minute it starts (RFC 3339)
    devices: int
    online: int
    in_sync: int
    pending: int
    rejected: int
    drift: int
    conflicts: int


class FleetSeries(TypedDict):
    """The fleet over time (store/series.py)."""

    window: str  # 24h or 7d
    step_s: int  # seconds per point (a point is the average of its minutes)
    points: list[SeriesPoint]  # oldest first; a minute with no sample (the service was down) has none


class LayerPreview(TypedDict):
    """What a layer change would do; nothing is stored."""

    layer: str
    change: int  # devices whose config it changes
    devices: list[str]  # the first 200 of them, by id
    more: int
    example: PushPreviewDiff | None  # the first one's change
    invalid: list[str]  # schema violations it would cause now (``device: /pointer: message (schema S)``)
    new_devices_invalid: list[str]  # and for a device added later


class RolloutPreview(TypedDict):
    """What a rollout would do; nothing is started."""

    targeted: int
    waves: list[int]  # devices per wave (which ones: drawn when it starts)
    change: int  # of those, devices whose config it changes
    unchanged: int
    example: PushPreviewDiff | None  # the first changed device's diff (a config rollout)


class FleetAnswer(TypedDict):
    """A fleet push, answered in devices (docs/rollouts.md#fleet-answers)."""

    targeted: int
    devices: int
    unchanged: int
    online: int
    offline: int
    delivered: int | None
    acknowledged: int | None  # the name before 'delivered'
    applied: int
    rejected: int
    pending: int
    errors: dict[str, int]
    listed: Listed
    per_device: dict[str, DeviceOutcome]
    versions: dict[str, int]
    timings_ms: NotRequired[dict[str, float | None]]
    waited: NotRequired[float | None]


# ---- rollouts --------------------------------------------------------------------------------------


class WaveStatus(TypedDict):
    wave: int
    targeted: int
    published: int
    online: int
    delivered: int | None
    applied: int
    rejected: int
    offline: int
    pending: int
    reverted: int
    errors: dict[str, int]


class RolloutSummary(TypedDict):
    id: str
    state: str
    reason: str | None
    actor: str
    created_at: str | None
    finished_at: str | None
    wave: int
    waves: int


class RolloutStatus(TypedDict):
    id: str
    state: str
    reason: str | None
    message: str
    target: dict[str, Any]
    policy: dict[str, Any]
    actor: str
    created_at: str | None
    finished_at: str | None
    wave: int
    waves: list[WaveStatus]
    devices: int
    kept: list[str]


# ---- layers and schemas ----------------------------------------------------------------------------


class LayerChange(TypedDict):
    layer: str
    version: int
    devices: int  # how many devices got a new version
    versions: NotRequired[dict[str, int]]
    removed: NotRequired[bool]
    new_devices_invalid: NotRequired[list[str]]  # what a device added later would break (with force)


class LayerInForce(TypedDict):
    layer: str
    version: int
    labels: dict[str, str]
    priority: int
    message: str
    where: str | None  # a filter over id, labels and reported state (docs/where.md)


class LayerVersion(TypedDict):
    layer: str
    version: int
    labels: dict[str, str]
    priority: int
    content: dict[str, Any] | None  # None: the layer was removed in this version
    removed: bool
    message: str
    created_at: str | None
    actor: str
    where: str | None


class SchemaChange(TypedDict):
    schema: str
    version: int
    invalid_devices: NotRequired[list[str]]
    removed: NotRequired[bool]


class SchemaPreview(TypedDict):
    """What setting a schema would do; nothing is stored."""

    schema: str
    version: int  # the version it would be
    invalid_devices: list[str]  # current devices whose config it refuses (the first 200)
    more: int
    violations: list[str]  # one line each (the first 200): ``device: /pointer: message (schema S)``


class SchemaInForce(TypedDict):
    schema: str
    labels: dict[str, str]
    version: int


class SchemaVersion(TypedDict):
    schema: NotRequired[str]  # the service adds it: "fleet" or the selector
    selector: str
    version: int
    removed: bool
    created_at: str | None
    actor: str
    document: dict[str, Any] | None


# ---- tokens, backup --------------------------------------------------------------------------------


class TokenCreated(TypedDict):
    id: str
    name: str
    role: str
    token: str  # shown in this answer only


class TokenInfo(TypedDict):
    id: str
    name: str
    role: str
    created_at: str | None
    created_by: str
    last_used_at: NotRequired[str | None]  # the HTTP API adds it (this run's last use)


class TokenRevoked(TypedDict):
    id: str
    name: str
    role: str
    revoked: bool


class ClaimCreated(TypedDict):
    id: str
    name: str
    labels: dict[str, str]
    uses: int
    expires_at: str
    secret: str  # shown in this answer only
    credential: dict[str, Any]  # the claim file: {claim, secret, broker, topic_prefix}
    broker: BrokerNote  # what an external broker did with the claim's user


class ClaimInfo(TypedDict):
    id: str
    name: str
    labels: dict[str, str]
    uses: int
    used: int
    left: int
    expires_at: str
    state: str  # active, used_up, expired, revoked
    ca: str | None  # its claim CA's name, when devices may claim with a certificate it signed
    created_at: str | None
    created_by: str


class ClaimRevoked(TypedDict):
    id: str
    name: str
    used: int
    revoked: bool
    broker: NotRequired[BrokerNote]  # what an external broker did with the claim's user (connections closed)


class BackupResult(TypedDict):
    path: str
    bytes: int
