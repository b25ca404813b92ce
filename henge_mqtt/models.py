"""Values that cross a boundary (wire, store, CLI): validated once, immutable afterwards.

This module imports nothing else of henge's but the pure ``ids``, so every other layer can depend on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .ids import DEVICE_ID_PATTERN, device_id_problem, is_valid_device_id, parse_labels
from .roles import Role

_quote: Callable[[str], str] = encode_basestring_ascii  # json.dumps of a str is this call


def _check_device_id(value: str) -> str:
    problem = device_id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


DeviceId = Annotated[str, AfterValidator(_check_device_id)]


def _object_only(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("config must be a JSON object")
    return value


ConfigObject = Annotated[dict[str, Any], BeforeValidator(_object_only)]


def canonical_json(config: dict[str, Any]) -> bytes:
    """The byte string the snapshot's sha256 covers; part of the wire contract."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config)).hexdigest()


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Snapshot(Frozen):
    """What a device receives, retained, on its config topic."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # a newer service may add fields

    device: DeviceId
    version: int = Field(ge=1)
    sha256: str
    issued_at: str
    config: dict[str, Any]
    layers: list[str] = Field(default_factory=list)  # name@version of every layer that made the config

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()

    @staticmethod
    def payload_tail(sha256: str, issued_at: str, config_json: str, layers_json: str = "[]") -> str:
        """The document after its device and version: what a fleet push's devices under the same
        layers share (the config serialized once, not validated and dumped for each of 10,000)."""
        return f',"sha256":"{sha256}","issued_at":"{issued_at}","config":{config_json},"layers":{layers_json}}}'

    @staticmethod
    def fast_payload(device: str, version: int, tail: str) -> bytes:
        """The same document as :meth:`to_payload`, from a :meth:`payload_tail` (the id quoted as
        ``json.dumps`` quotes a string, by the escaper it calls)."""
        return f'{{"device":{_quote(device)},"version":{version}{tail}'.encode()


class VersionReport(Frozen):
    """What the device said about one version: kept with the version, whatever came after it."""

    status: Literal["applied", "rejected"]
    error: str | None = None
    at: datetime
    epoch: int | None = None  # the connection it came in on (None: recorded before epochs were kept)


class ConfigVersion(Frozen):
    """One immutable row of a device's history."""

    device: DeviceId
    version: int = Field(ge=1)
    config: dict[str, Any]
    sha256: str
    message: str = ""
    created_at: datetime
    actor: str
    # The device's own layer at this version, when layers made ``config`` differ from it.
    own: dict[str, Any] | None = None
    layers: list[str] = Field(default_factory=list)  # name@version of the layers merged into config
    report: VersionReport | None = None  # the device's report of this version (history and get only)

    @property
    def device_layer(self) -> dict[str, Any]:
        return self.own if self.own is not None else self.config

    def renumbered(self, device: str, version: int) -> ConfigVersion:
        """This row as another device's version ``version``, every other field the same object: what
        a fleet push makes of one template per device. Unvalidated (the template is valid, and so
        are the id and number the store chose), and without ``model_copy``'s generic copies: 2.4 us
        a row against 6.4, on the store's thread, which holds the GIL the delivering loop waits for."""
        row = ConfigVersion.__new__(ConfigVersion)
        fields = self.__dict__.copy()
        fields["device"] = device
        fields["version"] = version
        _set = object.__setattr__
        _set(row, "__dict__", fields)
        _set(row, "__pydantic_fields_set__", set(self.__pydantic_fields_set__))
        _set(row, "__pydantic_extra__", None)
        _set(row, "__pydantic_private__", None)
        return row

    def snapshot(self) -> Snapshot:
        return Snapshot(
            device=self.device,
            version=self.version,
            sha256=self.sha256,
            issued_at=rfc3339(self.created_at),
            config=self.config,
            layers=self.layers,
        )


def new_version(device: str, version: int, config: dict[str, Any], sha256: str, *, message: str,
                created_at: datetime, actor: str, own: dict[str, Any] | None,
                layers: list[str]) -> ConfigVersion:
    """A row the store worked out itself (its fields already valid), built without validation and
    with every field given: pydantic then resolves no default, 10 us a row instead of 16. A fleet
    push builds one per layer set and copies it per device (:meth:`ConfigVersion.renumbered`)."""
    return ConfigVersion.model_construct(device=device, version=version, config=config, sha256=sha256,
                                         message=message, created_at=created_at, actor=actor, own=own,
                                         layers=layers, report=None)


class Device(Frozen):
    id: DeviceId
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    desired_version: int = 0


class Report(Frozen):
    """What a device tells us about a version it was asked to run."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = Field(ge=1)
    status: Literal["applied", "rejected"]
    # A long error is cut to 4,096 characters and kept: dropping the report would hide the rejection.
    error: Annotated[str | None, AfterValidator(lambda v: v if v is None or len(v) <= 4096 else v[:4095] + "…")] = None


PresenceState = Literal["online", "offline"]


class Presence(Frozen):
    """The server-owned, retained presence record of one device."""

    device: DeviceId
    state: PresenceState
    epoch: int
    since: str
    reason: str
    remote: str | None = None

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()


class AdminRequest(Frozen):
    """An admin request: ``op`` names the operation, ``args`` is checked against that op's model."""

    id: str = Field(min_length=1, max_length=128)
    op: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    reply_to: str = Field(min_length=1, max_length=256)


class AdminError(Frozen):
    code: str
    message: str


class AdminReply(Frozen):
    id: str
    ok: bool
    result: Any = None
    error: AdminError | None = None


class Event(Frozen):
    """A service event, as streamed by ``henge events --follow``."""

    type: str
    at: str
    device: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# ---- per-operation arguments of the admin protocol -------------------------------------------


class DeviceAddArgs(Frozen):
    device: DeviceId
    labels: dict[str, str] = Field(default_factory=dict)


class DeviceRefArgs(Frozen):
    device: DeviceId


class PushArgs(Frozen):
    device: DeviceId
    config: ConfigObject | None = None
    patch: ConfigObject | None = None  # an RFC 7396 merge patch of the current config, instead of config
    if_version: int | None = Field(default=None, ge=0)
    message: str = Field(default="", max_length=1024)
    force: bool = False  # store a new version even if the content is unchanged


class GetArgs(Frozen):
    device: DeviceId
    version: int | None = Field(default=None, ge=1)


class DiffArgs(Frozen):
    device: DeviceId
    a: int = Field(ge=1)
    b: int = Field(ge=1)


class RollbackArgs(Frozen):
    device: DeviceId
    version: int = Field(ge=1)
    message: str = Field(default="", max_length=1024)


SyncState = Literal["in_sync", "drift", "pending", "rejected", "unknown", "invalid"]  # results.SYNC_STATES


class StatusArgs(Frozen):
    device: DeviceId | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    state: Literal["online", "offline", "quarantined"] | None = None
    sync: SyncState | None = None
    conflict: bool | None = None
    where: str | None = Field(default=None, max_length=2048)  # docs/where.md


class WaitArgs(Frozen):
    device: DeviceId
    version: int = Field(ge=1)
    timeout: float = Field(default=30.0, gt=0, le=86400)


class ImportedDevice(Frozen):
    id: DeviceId
    labels: dict[str, str] = Field(default_factory=dict)


class ImportArgs(Frozen):
    devices: list[ImportedDevice] = Field(min_length=1, max_length=100_000)
    update: bool = False


class BackupArgs(Frozen):
    path: str = Field(min_length=1, max_length=4096)


class LabelArgs(Frozen):
    device: DeviceId
    set: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")], str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class PushManyArgs(Frozen):
    all: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    where: str | None = Field(default=None, max_length=2048)  # docs/where.md
    config: ConfigObject
    message: str = Field(default="", max_length=1024)
    delivery_timeout: float = Field(default=30.0, ge=0, le=3600)
    force: bool = False  # a new version also for devices already at this config
    report_timeout: float | None = Field(default=None, gt=0, le=86400)  # then wait this long for every report


class TimelineArgs(Frozen):
    device: DeviceId
    window: Literal["24h", "7d"] = "24h"


class SeriesArgs(Frozen):
    window: Literal["24h", "7d"] = "24h"


class PushPreviewArgs(Frozen):
    all: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    where: str | None = Field(default=None, max_length=2048)  # docs/where.md
    config: ConfigObject


class SchemaSetArgs(Frozen):
    labels: dict[str, str] = Field(default_factory=dict)
    document: dict[str, Any]
    force: bool = False
    if_version: int | None = Field(default=None, ge=0)  # stored only if this is the schema's current version


class SchemaRefArgs(Frozen):
    labels: dict[str, str] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1)


LayerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class LayerSetArgs(Frozen):
    name: LayerName
    content: ConfigObject
    labels: dict[str, str] | None = None  # None: keep the layer's labels (a new label layer needs some)
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    message: str = Field(default="", max_length=1024)
    force: bool = False  # store it even if a device added later would break its schemas
    where: str | None = Field(default=None, max_length=2048)  # None: keep; "": none (docs/where.md)
    if_version: int | None = Field(default=None, ge=0)  # stored only if this is the layer's current version


class LayerRefArgs(Frozen):
    name: LayerName
    version: int | None = Field(default=None, ge=1)
    message: str = Field(default="", max_length=1024)
    force: bool = False


class LayerDiffArgs(Frozen):
    name: LayerName
    a: int = Field(ge=1)
    b: int = Field(ge=1)


class ExplainArgs(Frozen):
    device: DeviceId
    version: int | None = Field(default=None, ge=1)


class ReconcileArgs(Frozen):
    device: DeviceId


class ReportedArgs(Frozen):
    device: DeviceId
    history: bool = False


class LayerChange(Frozen):
    name: LayerName
    content: ConfigObject | None  # None: the layer's removal, staged
    labels: dict[str, str] | None = None
    priority: int | None = Field(default=None, ge=-1000, le=1000)


class RolloutStartArgs(Frozen):
    all: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    where: str | None = Field(default=None, max_length=2048)  # docs/where.md
    config: ConfigObject = Field(default_factory=dict)
    layer: LayerChange | None = None  # a staged layer change instead of a config for every target
    waves: list[float] | None = Field(default=None, min_length=1, max_length=100)
    wave_size: int | None = Field(default=None, ge=1)
    max_rejected: str = Field(default="1", max_length=16)
    min_applied: float = Field(default=90.0, ge=0, le=100)
    wave_timeout: float = Field(default=300.0, gt=0, le=7 * 86400)
    pause: float = Field(default=0.0, ge=0, le=7 * 86400)
    message: str = Field(default="", max_length=1024)


class RolloutRefArgs(Frozen):
    rollout: str = Field(min_length=1, max_length=64)
    revert: bool = False


class TokenCreateArgs(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    role: Role


class ClaimCreateArgs(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    labels: dict[str, str] = Field(default_factory=dict)
    uses: int = Field(ge=1, le=1_000_000)
    expires_in: float = Field(gt=0, le=366 * 86400)  # seconds from now
    broker: str | None = Field(default=None, max_length=512)  # what devices connect to (the claim file's)
    ca: str | None = Field(default=None, max_length=16384)  # a claim CA (PEM): its certificates may claim


class ClaimRefArgs(Frozen):
    claim: str = Field(min_length=1, max_length=64)


class TokenRefArgs(Frozen):
    token: str = Field(min_length=1, max_length=64)


class AuditArgs(Frozen):
    device: DeviceId | None = None
    limit: int = Field(default=100, ge=1, le=100_000)


__all__ = ["DEVICE_ID_PATTERN", "device_id_problem", "is_valid_device_id", "parse_labels"]
