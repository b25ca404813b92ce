"""Our own exception types: each message is meant to be read by a person and acted on."""

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


class ConfigTooLarge(ValidationFailed):
    code = "config_too_large"


class UnknownDevice(HengeError):
    code = "unknown_device"


class DuplicateDevice(HengeError):
    code = "duplicate_device"


class UnknownVersion(HengeError):
    code = "unknown_version"


class VersionConflict(HengeError):
    code = "version_conflict"


class WaitTimeout(HengeError):
    code = "timeout"


class StoreError(HengeError):
    code = "store_error"


class ServiceUnavailable(HengeError):
    code = "service_unavailable"


class AuthenticationFailed(HengeError):
    code = "authentication_failed"


class SettingsError(HengeError):
    code = "settings_error"


class RemoteError(HengeError):
    """An error the service reported back over the admin protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

