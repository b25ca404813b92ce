"""Where the service is and how to log in to it: an :class:`Endpoint` from a data dir (the files
``henge serve`` writes), an ``mqtt[s]://`` URL, or a context of the client config file.

Apart from the admin clients (``client`` on asyncio, ``admin_call`` blocking) so that a one-shot
command finds its service without loading asyncio, and ``ssl`` only for ``mqtts://``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import AuthenticationFailed, ServiceUnavailable
from .paths import ADMIN_FILE, SERVICE_FILE

if TYPE_CHECKING:
    import ssl


class Endpoint(NamedTuple):
    """Where the service is (a NamedTuple: the CLI starts without loading ``dataclasses``)."""

    host: str
    port: int
    username: str
    secret: str
    topic_prefix: str = "henge"
    socket: str | None = None  # the service's admin Unix socket: used instead of host:port when set
    tls: bool = False  # mqtts://
    ca: str | None = None  # CA file for mqtts:// (else the system's)
    cert: str | None = None  # client certificate and key, for a listener that asks for one
    key: str | None = None

    @property
    def where(self) -> str:
        return self.socket if self.socket else f"{self.host}:{self.port}"

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> Endpoint:
        """Find a local service through the files ``henge serve`` writes into its data dir."""
        try:
            service = json.loads((data_dir / SERVICE_FILE).read_text())
        except FileNotFoundError as exc:
            raise ServiceUnavailable(
                f"no running service found in {data_dir.resolve()} (no {SERVICE_FILE}): point --data (or "
                f"HENGE_DATA) at the data dir of a running service, start one with "
                f"`henge serve --data {data_dir}`, or pass --broker"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable(f"cannot read {data_dir / SERVICE_FILE}: {exc}") from exc
        try:
            admin = json.loads((data_dir / ADMIN_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise AuthenticationFailed(f"cannot read admin credentials in {data_dir}: {exc}") from exc
        host = str(service["host"])
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        socket = service.get("admin_socket")
        # The admin socket is never crowded out by devices; a path too long for AF_UNIX cannot be used.
        usable = isinstance(socket, str) and os.path.exists(socket) and len(socket.encode()) < 104
        return cls(host, int(service["port"]), str(admin["name"]), str(admin["secret"]),
                   str(service.get("topic_prefix", "henge")), socket if usable else None)

    @classmethod
    def from_url(cls, url: str, context: dict[str, Any] | None = None) -> Endpoint:
        """``mqtt[s]://host:port``; credentials and TLS files from the environment (HENGE_ADMIN_USER,
        HENGE_ADMIN_SECRET, HENGE_TOPIC_PREFIX, HENGE_CA, HENGE_CERT, HENGE_KEY), else the context."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ServiceUnavailable(f"invalid broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
        ctx = context or {}

        def setting(env: str, key: str, default: str | None = None) -> str | None:
            value = os.environ.get(env) or ctx.get(key)
            return str(value) if value is not None else default

        secret = setting("HENGE_ADMIN_SECRET", "secret")
        if not secret:
            raise AuthenticationFailed("set HENGE_ADMIN_SECRET (and HENGE_ADMIN_USER), or a secret in the "
                                       "context, to use --broker")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), setting("HENGE_ADMIN_USER", "user",
                   "henge-admin") or "henge-admin", secret, setting("HENGE_TOPIC_PREFIX", "topic_prefix", "henge")
                   or "henge", tls=tls, ca=setting("HENGE_CA", "ca"), cert=setting("HENGE_CERT", "cert"),
                   key=setting("HENGE_KEY", "key"))

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        import ssl

        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ServiceUnavailable(f"cannot load the TLS files for the service: {exc}") from exc
        return context


CONFIG_FILE = Path("~/.config/henge/config.yaml")


def load_context(name: str | None) -> dict[str, Any] | None:
    """A named context of the client config file (kubeconfig-like), or its ``current`` one.

    ``~/.config/henge/config.yaml`` (or ``$HENGE_CONFIG``)::

        current: gateway-1
        contexts:
          gateway-1: {broker: "mqtts://gw1:8883", user: henge-admin, secret: "...", ca: /etc/henge/ca.pem}
          lab: {data: /var/lib/henge}
    """
    path = Path(os.environ.get("HENGE_CONFIG") or CONFIG_FILE).expanduser()
    if not path.exists():
        if name:
            raise ServiceUnavailable(f"no context {name!r}: {path} does not exist")
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ServiceUnavailable(f"cannot read {path}: {exc}") from exc
    contexts = config.get("contexts") if isinstance(config, dict) else None
    if not isinstance(contexts, dict):
        raise ServiceUnavailable(f"{path}: expected a contexts: mapping")
    chosen = name or config.get("current")
    if chosen is None:
        return None
    context = contexts.get(chosen)
    if not isinstance(context, dict):
        raise ServiceUnavailable(f"no context {chosen!r} in {path} (it has: {', '.join(sorted(contexts)) or 'none'})")
    return context
