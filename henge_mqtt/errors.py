"""Our own exception types: each message is meant to be read by a person and acted on.

The tree (``code`` in parentheses is what the admin protocol and the CLI's ``--json`` report)::

    HengeError (error)
    ├── ValidationFailed (invalid)
    │   ├── InvalidDeviceId (invalid_device_id)
    │   ├── InvalidConfig (invalid_config)
    │   │   └── SchemaViolation (schema_violation): .errors, one per violation (schema, device, pointer, message)
    │   ├── InvalidSchema (invalid_schema): not a JSON Schema 2020-12 document
    │   └── ConfigTooLarge (config_too_large)
    ├── UnknownDevice (unknown_device): .device
    ├── DuplicateDevice (duplicate_device)
    ├── UnknownVersion (unknown_version)
    ├── UnknownLayer (unknown_layer)
    ├── UnknownRollout (unknown_rollout)
    ├── RolloutConflict (rollout_conflict): a device already in an active rollout, or a state change that does not apply
    ├── VersionConflict (version_conflict): .device, .expected, .current
    ├── LabelsConflict (labels_conflict): .device, .current: an edit began from other labels (If-Match)
    ├── WaitTimeout (timeout)
    ├── StoreError (store_error)
    │   └── Fenced (fenced): this instance lost the PostgreSQL store's lease; another one is active
    ├── ServiceUnavailable (service_unavailable)
    ├── AuthenticationFailed (authentication_failed)
    ├── Forbidden (forbidden): an HTTP API token whose role does not allow the operation
    ├── UnknownToken (unknown_token)
    ├── DuplicateToken (duplicate_token)
    ├── UnknownClaim (unknown_claim)
    ├── ClaimRefused (claim_refused): .reason: used_up, expired, revoked, replay, duplicate_device
    ├── SettingsError (settings_error)
    ├── NotSupported (not_supported): an operation the running broker cannot do
    └── RemoteError (any code): an error the service reported over the admin protocol
"""

from __future__ import annotations


class HengeError(Exception):
    """Base of every error henge raises on purpose; ``code`` is stable for scripts."""

    code = "error"


class ValidationFailed(HengeError):
    code = "invalid"


class InvalidDeviceId(ValidationFailed):
    code = "invalid_device_id"


class InvalidConfig(ValidationFailed):
    code = "invalid_config"


class SchemaViolation(InvalidConfig):
    """A config a schema refuses: one line per error, each naming the JSON pointer of the value."""

    code = "schema_violation"
    MAX_LINES = 20

    def __init__(self, errors: list[dict[str, str]], *, what: str = "nothing was stored") -> None:
        lines = [self.line(e) for e in errors[: self.MAX_LINES]]
        if len(errors) > self.MAX_LINES:
            lines.append(f"... and {len(errors) - self.MAX_LINES} more errors")
        lines.append(f"the config does not match its schemas; {what}")
        super().__init__("\n".join(lines))
        self.errors = errors

    @staticmethod
    def line(error: dict[str, str]) -> str:
        """One violation as people read it: ``device: /pointer: message (schema fleet@2)``."""
        device = f"{error['device']}: " if error.get("device") else ""
        return f"{device}{error['pointer'] or '/'}: {error['message']} (schema {error['schema']})"


class InvalidSchema(ValidationFailed):
    code = "invalid_schema"


class ConfigTooLarge(ValidationFailed):
    code = "config_too_large"


class UnknownDevice(HengeError):
    """No device has this id (``device``); or, for a selection by labels, no device matched (``device``
    is None and the message says what was asked)."""

    code = "unknown_device"

    def __init__(self, device: str | None, *, also: str = "", message: str | None = None) -> None:
        text = message if message is not None else f"unknown device {device!r}"
        super().__init__(f"{text}; {also}" if also else text)
        self.device = device


class DuplicateDevice(HengeError):
    code = "duplicate_device"


class UnknownVersion(HengeError):
    code = "unknown_version"


class UnknownLayer(HengeError):
    code = "unknown_layer"


class UnknownRollout(HengeError):
    code = "unknown_rollout"


class RolloutConflict(HengeError):
    code = "rollout_conflict"


class VersionConflict(HengeError):
    code = "version_conflict"

    def __init__(self, device: str, *, expected: int, current: int) -> None:
        super().__init__(
            f"version conflict on {device!r}: expected current version {expected}, it is {current}; "
            "nothing was stored"
        )
        self.device = device
        self.expected = expected
        self.current = current


class LabelsConflict(HengeError):
    """A labels edit that began from labels someone has changed since (HTTP ``If-Match``)."""

    code = "labels_conflict"

    def __init__(self, device: str, *, current: dict[str, str]) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(current.items())) or "none"
        super().__init__(f"the labels of {device!r} changed since this edit began (now: {shown}); nothing was stored")
        self.device = device
        self.current = current


class WaitTimeout(HengeError):
    code = "timeout"


class StoreError(HengeError):
    code = "store_error"


class Fenced(StoreError):
    code = "fenced"


class ServiceUnavailable(HengeError):
    code = "service_unavailable"


class AuthenticationFailed(HengeError):
    code = "authentication_failed"


class Forbidden(HengeError):
    code = "forbidden"

    def __init__(self, message: str, *, role: str = "", needed: str = "") -> None:
        super().__init__(message)
        self.role = role
        self.needed = needed


class UnknownToken(HengeError):
    code = "unknown_token"


class DuplicateToken(HengeError):
    code = "duplicate_token"


class UnknownClaim(HengeError):
    code = "unknown_claim"


class ClaimRefused(HengeError):
    """A device's claim that cannot be honoured; ``reason`` says which rule (docs/onboarding.md)."""

    code = "claim_refused"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SettingsError(HengeError):
    code = "settings_error"


class NotSupported(HengeError):
    code = "not_supported"


class RemoteError(HengeError):
    """An error the service reported back over the admin protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

