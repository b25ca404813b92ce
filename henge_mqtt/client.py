"""The admin client on asyncio: how a script, the CLI's event streams and watches, talk to a running
service over MQTT. The CLI's one-shot commands use the blocking one (``admin_call``); both speak
``admin_protocol``. ``Endpoint`` (where the service is) lives in ``endpoint``, and is here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import admin_protocol as protocol
from .endpoint import CONFIG_FILE, Endpoint, load_context
from .errors import ServiceUnavailable
from .mqtt_client import MqttClient, MqttClientError
from .topics import Topics

if TYPE_CHECKING:
    from .models import Event

__all__ = ["CONFIG_FILE", "AdminClient", "Endpoint", "load_context"]

# Requests and replies are plain JSON here (docs/protocol.md): the CLI starts without loading pydantic.


class AdminClient:
    """One admin connection: requests out on the admin topic, replies (and progress) back on this
    client's own reply topic, events on request. It runs on henge's own MQTT client (``mqtt_client``),
    not aiomqtt: a CLI command starts without loading paho-mqtt, and a reply is handed over from
    ``data_received`` with no reader task in between."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.topics = Topics(endpoint.topic_prefix)
        self.client_id = protocol.client_id()
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
                on_message=self._on_message, keepalive=protocol.KEEPALIVE, tls=e.tls_context(),
                timeout=self.timeout, unix=e.socket)
        except MqttClientError as exc:
            raise (protocol.refused(e, exc.code) if exc.code is not None else
                   protocol.unreachable(e, str(exc))) from exc
        except (OSError, TimeoutError) as exc:
            raise protocol.unreachable(e, str(exc) or f"no answer within {self.timeout:g} s") from exc
        try:
            await self._client.subscribe([(self._reply_topic, 1)], timeout=self.timeout)
        except (MqttClientError, TimeoutError) as exc:  # the service went away right after CONNACK
            self._client.close()
            raise ServiceUnavailable(f"{protocol.LOST} at {e.where}: {exc}") from exc
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
        failure = ServiceUnavailable(protocol.LOST)
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self._events is not None:
            self._events.put_nowait(None)

    def _open(self) -> MqttClient:
        """The connection, or the one error a call on a lost one gets."""
        if self._client is None or not self._client.is_open:
            raise ServiceUnavailable(protocol.LOST)
        return self._client

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self._reply_topic:
            body = protocol.body_of(payload)
            if body is None:
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
        request_id, request = protocol.request(op, args, self._reply_topic)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._replies[request_id] = waiter
        limit = self.timeout + (wait or 0.0)
        ticked = False
        sending = client.publish(self.topics.admin_requests, request, qos=1)
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
            raise protocol.no_answer(op, limit, ticked) from exc
        except MqttClientError as exc:
            raise ServiceUnavailable(f"{protocol.LOST}: {exc}") from exc
        finally:
            self._replies.pop(request_id, None)
            self._progress.pop(request_id, None)
            if not sending.done():
                sending.cancel()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # a failure set by the watcher and superseded by another: retrieved
        return protocol.result_of(reply)

    async def events(self) -> AsyncIterator[Event]:
        """Every service event from now on, until the connection ends."""
        client = self._open()
        self._events = asyncio.Queue()
        try:
            await client.subscribe([(self.topics.events, 0)], timeout=self.timeout)
        except (MqttClientError, TimeoutError) as exc:
            raise ServiceUnavailable(f"{protocol.LOST}: {exc}") from exc
        while True:
            event = await self._events.get()
            if event is None:
                raise ServiceUnavailable(protocol.LOST)
            yield event
