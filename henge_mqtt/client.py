"""The admin client: how the CLI (or any script) talks to a running service over MQTT."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import AuthenticationFailed, RemoteError, ServiceUnavailable
from .mqtt_client import MqttClient, MqttClientError
from .paths import ADMIN_FILE, SERVICE_FILE
from .topics import Topics

if TYPE_CHECKING:
    from .models import Event

# Requests and replies are plain JSON here (docs/protocol.md): the CLI starts without loading pydantic.


@dataclass(frozen=True, slots=True)
class Endpoint:
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


class AdminClient:
    """One admin connection: requests out on the admin topic, replies (and progress) back on this
    client's own reply topic, events on request. It runs on henge's own MQTT client (``mqtt_client``),
    not aiomqtt: a CLI command starts without loading paho-mqtt, and a reply is handed over from
    ``data_received`` with no reader task in between."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.topics = Topics(endpoint.topic_prefix)
        self.client_id = f"henge-cli-{secrets.token_hex(6)}"
        self._reply_topic = self.topics.admin_reply(self.client_id)
        self._client: MqttClient | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._progress: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._events: asyncio.Queue[Event | None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AdminClient:
        e = self.endpoint
        try:
            self._client = await MqttClient.connect(
                e.host, e.port, client_id=self.client_id, username=e.username, password=e.secret,
                on_message=self._on_message, keepalive=30, tls=e.tls_context(), timeout=self.timeout,
                unix=e.socket)
        except MqttClientError as exc:
            if exc.code in (4, 5):
                raise AuthenticationFailed(
                    f"the service at {e.where} refused the admin credentials for {e.username!r}"
                ) from exc
            if exc.code is not None:
                raise ServiceUnavailable(f"cannot connect to the service at {e.where}: {exc}") from exc
            raise ServiceUnavailable(
                f"cannot reach the service at {e.where} (is `henge serve` running?): {exc}") from exc
        except (OSError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.timeout:g} s"
            raise ServiceUnavailable(
                f"cannot reach the service at {e.where} (is `henge serve` running?): {why}"
            ) from exc
        try:
            await self._client.subscribe([(self._reply_topic, 1)], timeout=self.timeout)
        except (MqttClientError, TimeoutError) as exc:  # the service went away right after CONNACK
            self._client.close()
            raise ServiceUnavailable(f"lost the connection to the service at {e.where}: {exc}") from exc
        self._watch = asyncio.create_task(self._watch_connection(self._client))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._client is not None:
            self._client.close()

    async def _watch_connection(self, client: MqttClient) -> None:
        """A lost connection fails every waiting call at once (and ends an event stream)."""
        await client.closed
        failure = ServiceUnavailable("lost the connection to the service")
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self._events is not None:
            self._events.put_nowait(None)

    def _open(self) -> MqttClient:
        """The connection, or the one error a call on a lost one gets."""
        if self._client is None or not self._client.is_open:
            raise ServiceUnavailable("lost the connection to the service")
        return self._client

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self._reply_topic:
            try:
                body = json.loads(payload)
            except ValueError:
                return
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                return
            if "progress" in body:
                listener = self._progress.get(body["id"])
                if listener is not None:
                    listener(body["progress"])
                return
            waiter = self._replies.pop(body["id"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        elif topic == self.topics.events and self._events is not None:
            from .models import Event

            try:
                self._events.put_nowait(Event.model_validate_json(payload))
            except ValueError:
                return

    async def call(
        self, op: str, /, *, wait: float | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
        **args: Any,
    ) -> Any:
        """Run one admin operation; raises :class:`RemoteError` with the service's code and message.

        ``wait`` is how long the reply may take when the operation itself waits (``wait`` op). An
        operation that says how far it is (progress ticks: a fleet push, an import making its
        devices' secrets) may take longer: each tick gives it that long again.
        """
        client = self._open()
        request_id = secrets.token_hex(8)
        request = {"id": request_id, "op": op, "args": args, "reply_to": self._reply_topic}
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._replies[request_id] = waiter
        limit = self.timeout + (wait or 0.0)
        ticked = False
        sending = client.publish(self.topics.admin_requests, json.dumps(request).encode(), qos=1)
        try:
            async with asyncio.timeout(limit) as deadline:

                def tick(state: dict[str, Any]) -> None:
                    nonlocal ticked
                    ticked = True
                    deadline.reschedule(loop.time() + limit)
                    if progress is not None:
                        progress(state)

                self._progress[request_id] = tick
                # A lost connection fails the waiter at once: do not sit out the publish's own timeout.
                either: list[asyncio.Future[Any]] = [sending, waiter]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if sending.done():
                    sending.result()  # the publish failed: MqttClientError
                reply = await waiter
        except TimeoutError as exc:
            silent = " of its last progress" if ticked else ""
            raise ServiceUnavailable(f"the service did not answer {op!r} within {limit:g} s{silent}") from exc
        except MqttClientError as exc:
            raise ServiceUnavailable(f"lost the connection to the service: {exc}") from exc
        finally:
            self._replies.pop(request_id, None)
            self._progress.pop(request_id, None)
            if not sending.done():
                sending.cancel()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # a failure set by the watcher and superseded by another: retrieved
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RemoteError(str(error.get("code", "error")), str(error.get("message", "request failed")))
        return reply.get("result")

    async def events(self) -> AsyncIterator[Event]:
        """Every service event from now on, until the connection ends."""
        client = self._open()
        self._events = asyncio.Queue()
        try:
            await client.subscribe([(self.topics.events, 0)], timeout=self.timeout)
        except (MqttClientError, TimeoutError) as exc:
            raise ServiceUnavailable(f"lost the connection to the service: {exc}") from exc
        while True:
            event = await self._events.get()
            if event is None:
                raise ServiceUnavailable("lost the connection to the service")
            yield event
