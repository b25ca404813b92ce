"""Service settings: the YAML file (``listeners:`` plus the ``henge:`` section) and flags.

Settings own their values: they import nothing of henge but its errors, and the composer turns
them into the session table's and the server's own types.
"""

from __future__ import annotations

import os
import ssl as _ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SettingsError

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "broker_config"
DEFAULT_CONFIG_NAME = "default.yaml"


class SessionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    takeover_will: Literal["suppress", "publish"] = "suppress"
    conflict_policy: Literal["flag", "quarantine"] = "flag"
    conflict_takeovers: int = Field(default=4, ge=2)
    conflict_window: float = Field(default=60.0, gt=0)
    conflict_clear_after: float = Field(default=600.0, gt=0)
    quarantine_initial: float = Field(default=30.0, gt=0)
    quarantine_max: float = Field(default=3600.0, gt=0)
    connect_burst: float = Field(default=20.0, ge=1)
    connect_rate: float = Field(default=2.0, gt=0)


class ListenerConfig(BaseModel):
    """One device listener: TCP, with TLS when ``ssl`` is true (the keys amqtt's configuration used)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["tcp"] = "tcp"
    bind: str = "127.0.0.1:1883"
    ssl: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.bind.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"listener bind {self.bind!r}: expected HOST:PORT")
        return host.strip("[]"), int(port)

    def ssl_context(self, client_auth: str) -> _ssl.SSLContext | None:
        if not self.ssl:
            return None
        if self.certfile is None or self.keyfile is None:
            raise SettingsError(f"TLS listener {self.bind}: certfile and keyfile are required")
        try:
            context = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.certfile), str(self.keyfile))
            if self.cafile is not None:
                context.load_verify_locations(cafile=str(self.cafile))
                if client_auth != "off":
                    context.verify_mode = _ssl.CERT_REQUIRED if client_auth == "required" else _ssl.CERT_OPTIONAL
        except (OSError, _ssl.SSLError) as exc:
            raise SettingsError(f"TLS listener {self.bind}: cannot load certificates: {exc}") from exc
        return context


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("henge-data")
    listeners: dict[str, ListenerConfig] = Field(default_factory=lambda: {"default": ListenerConfig()})
    topic_prefix: str = Field(default="henge", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    max_config_bytes: int = Field(default=256 * 1024, ge=2)
    max_report_bytes: int = Field(default=16 * 1024, ge=64)
    # A device's reported state (what it is and runs): the message and the merged document alike.
    max_reported_bytes: int = Field(default=16 * 1024, ge=64, le=1024 * 1024)
    reported_history: int = Field(default=20, ge=1, le=1000)  # earlier documents kept per device
    # Onboarding by claim: claiming CONNECTs per second (all claims together), and the burst allowed.
    claim_rate: float = Field(default=100.0, gt=0, le=100_000)
    claim_burst: int = Field(default=1000, ge=1, le=1_000_000)
    max_keepalive: float = Field(default=300.0, gt=0)
    max_packet_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_inflight: int = Field(default=50, ge=1, le=65000)
    max_publish_bytes: int = Field(default=64 * 1024, ge=64)
    receive_maximum: int = Field(default=16, ge=1, le=65535)
    # The longest a persistent session (3.1.1 CleanSession 0, 5.0 Session Expiry) outlives its connection.
    session_expiry_max: int = Field(default=7 * 86400, ge=0, le=0xFFFFFFFF)
    pubrel_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_filters_per_subscribe: int = Field(default=16, ge=1)
    max_subscriptions: int = Field(default=64, ge=1)
    max_wildcard_subscriptions: int = Field(default=8, ge=0)
    max_connections: int | None = Field(default=None, ge=1)  # None: the open-file limit minus a reserve
    # Device sockets held by this many listener processes on the same ports (SO_REUSEPORT), beyond
    # the open-file limit of one process; 0: the service holds them itself. TLS ends in them (client
    # certificates verified there, against the CAs the listener trusts, reach the core with the connection).
    listener_processes: int = Field(default=0, ge=0, le=64)
    admin_socket: bool = True  # a Unix socket in the data dir for the CLI, never crowded out by devices
    store_synchronous: Literal["full", "normal"] = "full"
    store: str | None = Field(default=None, pattern=r"^postgres(ql)?://")  # None: SQLite in the data dir
    device_publish_rate: float = Field(default=10.0, gt=0)
    device_publish_burst: float = Field(default=50.0, ge=1)
    tls_client_auth: Literal["off", "optional", "required"] = "off"
    tls_cert_replaces_password: bool = False
    external_broker: str | None = None  # mqtt[s]://host:port: run against it instead of the embedded broker
    external_ca: Path | None = None
    external_cert: Path | None = None
    external_key: Path | None = None
    # A NATS cluster (broker-config nats): its connection events give presence for plain clients, and
    # identities reach it through its accounts file and a reload hook.
    # nats://host:port[,host:port...] (a NATS cluster's system events), or emqx (EMQX's $SYS client events)
    external_events: str | None = Field(default=None, pattern=r"^(nats://.+|emqx)$")
    external_events_resync: float = Field(default=15.0, gt=0)  # seconds between full snapshots of connections
    nats_accounts: Path | None = None  # the accounts file every NATS node includes: rewritten as identities change
    nats_reload: str | None = None  # a shell command run after each rewrite (broker-config nats writes one)
    http: str | None = "127.0.0.1:8080"  # HOST:PORT of the HTTP API and console (henge serve); None: off
    http_certfile: Path | None = None  # with http_keyfile: serve https
    http_keyfile: Path | None = None
    admin_name: str = Field(default="henge-admin", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    sessions: SessionConfig = Field(default_factory=SessionConfig)

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        *,
        data_dir: Path | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> Settings:
        """Read the YAML file, if any, and apply flag overrides.

        Without a file the built-in defaults apply; ``broker_config/default.yaml`` spells out
        exactly those defaults (a test keeps the two equal).
        """
        values: dict[str, Any] = {}
        origin = "built-in defaults"
        if config_file is not None:
            import yaml  # only with a file: 0.9 MB the process would hold for nothing otherwise

            origin = f"config file {config_file}"
            try:
                raw = yaml.safe_load(config_file.read_text()) or {}
            except OSError as exc:
                raise SettingsError(f"cannot read {origin}: {exc.strerror or exc}") from exc
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or "parse error"
                raise SettingsError(f"{origin} is not valid YAML: {problem}{where}") from exc
            if not isinstance(raw, dict):
                raise SettingsError(f"{origin} must hold a mapping")
            unknown = sorted(set(raw) - {"listeners", "henge"})
            if unknown:
                raise SettingsError(f"{origin}: unknown section {unknown[0]!r} (expected listeners: and henge:)")
            values = dict(raw.get("henge") or {})
            if "listeners" in raw:
                values["listeners"] = raw["listeners"]
        if data_dir is not None:
            values["data_dir"] = data_dir
        elif "data_dir" not in values:
            values["data_dir"] = Path(os.environ.get("HENGE_DATA", "henge-data"))
        try:
            settings = cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            section = "" if where.startswith("listeners") else "henge."
            raise SettingsError(f"{origin}: {section}{where}: {first['msg']}") from exc
        return settings.with_listener(host, port)

    def with_listener(self, host: str | None, port: int | None) -> Settings:
        if host is None and port is None:
            return self
        listeners = dict(self.listeners)
        default = listeners.get("default", ListenerConfig())
        old_host, _, old_port = default.bind.rpartition(":")
        new_host = host if host is not None else (old_host or "127.0.0.1")
        new_port = port if port is not None else int(old_port or 1883)
        if ":" in new_host and not new_host.startswith("["):
            new_host = f"[{new_host}]"
        listeners["default"] = default.model_copy(update={"bind": f"{new_host}:{new_port}"})
        return self.model_copy(update={"listeners": listeners})

    def external_tls_context(self) -> _ssl.SSLContext | None:
        if self.external_ca is None and self.external_cert is None:
            return None
        try:
            context = _ssl.create_default_context(cafile=str(self.external_ca) if self.external_ca else None)
            if self.external_cert is not None:
                context.load_cert_chain(str(self.external_cert), str(self.external_key) if self.external_key else None)
        except (OSError, _ssl.SSLError) as exc:
            raise SettingsError(f"cannot load the TLS files for the external broker: {exc}") from exc
        return context
