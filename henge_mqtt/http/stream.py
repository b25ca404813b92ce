"""Live events for HTTP clients (Server-Sent Events): numbered, replayable, never a brake.

Every service event gets an id ``<run>-<n>``: ``n`` only goes up within one run of the service,
and ``run`` changes at every start, so a client resuming with an id from another run is told to
reload (``event: reset``) instead of being handed a stream with a silent hole in it. The newest
events are kept for ``Last-Event-ID``, bounded in bytes (``REPLAY_BYTES``), not in events: a connect
storm of 10,000 devices is 10,000 events, and a count bound made the buffer grow with the fleet
(about 0.4 KB per connected device). Each is kept as its UTF-8 JSON, made once. Each client has a
bounded backlog, and a client that lets it fill is dropped (``event: dropped``): the broker never
waits for a reader.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..models import Event

PRESENCE_TYPES = frozenset({"connected", "disconnected"})
REPLAY_BYTES = 1024 * 1024  # the replay buffer: about 3,500 events of the usual size
ITEM_BYTES = 120  # what an Item and its place in the deque cost beside its JSON (counted in the bound)


@dataclass(slots=True)
class Item:
    """One event as streamed: its JSON as UTF-8, made once (about 180 bytes; the model is not kept),
    and what the filters look at."""

    seq: int
    type: str
    device: str | None
    json: bytes

    @property
    def size(self) -> int:
        return len(self.json) + ITEM_BYTES


@dataclass(slots=True, eq=False)
class Client:
    devices: frozenset[str] | None
    types: frozenset[str] | None
    backlog: int
    pending: deque[Item] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    closed: bool = False

    def wants(self, item: Item) -> bool:
        return (self.devices is None or item.device in self.devices) and (self.types is None or item.type in self.types)

    def offer(self, item: Item) -> None:
        if self.dropped or not self.wants(item):
            return
        if len(self.pending) >= self.backlog:
            self.dropped = True  # too slow: its backlog is freed, the stream ends with event: dropped
            self.pending.clear()
        else:
            self.pending.append(item)
        self.wake.set()


class EventHub:
    def __init__(self, *, replay_bytes: int = REPLAY_BYTES, backlog: int = 5_000, heartbeat: float = 15.0) -> None:
        self.run = secrets.token_hex(4)
        self.heartbeat = heartbeat
        self._backlog = backlog
        self._seq = 0
        self._replay_bytes = replay_bytes
        self._buffered = 0  # bytes in _buffer, as Item.size counts them
        self._buffer: deque[Item] = deque()
        self._clients: set[Client] = set()
        self.dropped = 0

    @property
    def buffered(self) -> int:
        """Bytes the replay buffer holds (at most the bound, or one event if that one is bigger)."""
        return self._buffered

    @property
    def clients(self) -> int:
        return len(self._clients)

    def on_event(self, event: Event) -> None:
        """The service's event listener: O(clients), no I/O."""
        self._seq += 1
        item = Item(self._seq, event.type, event.device, event.model_dump_json().encode())
        self._buffer.append(item)
        self._buffered += item.size
        while self._buffered > self._replay_bytes and len(self._buffer) > 1:
            self._buffered -= self._buffer.popleft().size
        for client in self._clients:
            client.offer(item)

    def last_id(self) -> str:
        return f"{self.run}-{self._seq}"

    def presence(self, device: str, limit: int = 50) -> list[Event]:
        """The device's recent connects and disconnects still in the replay buffer, newest first."""
        found: list[Event] = []
        for item in reversed(self._buffer):
            if item.device == device and item.type in PRESENCE_TYPES:
                found.append(Event.model_validate_json(item.json))
                if len(found) >= limit:
                    break
        return found

    def close(self) -> None:
        for client in self._clients:
            client.closed = True
            client.wake.set()

    def subscribe(self, *, devices: frozenset[str] | None, types: frozenset[str] | None,
                  last_event_id: str | None) -> tuple[Client, str | None]:
        """A new client, with the replayed events already in its backlog; the second value is a
        reason to reload when ``last_event_id`` cannot be resumed from."""
        client = Client(devices, types, self._backlog)
        reset: str | None = None
        if last_event_id:
            run, _, seq_text = last_event_id.rpartition("-")
            oldest = self._buffer[0].seq if self._buffer else self._seq + 1
            if run != self.run or not seq_text.isdigit():
                reset = "the service restarted since that event"
            elif int(seq_text) < oldest - 1:
                reset = "that event is no longer in the replay buffer"
            else:
                after = int(seq_text)
                for item in self._buffer:
                    if item.seq > after and client.wants(item):
                        client.pending.append(item)
        self._clients.add(client)
        return client, reset

    async def stream(self, client: Client, reset: str | None) -> AsyncIterator[str]:
        """The SSE text for one client until it is dropped or the service stops (the ASGI server
        cancels it when the client goes away)."""
        try:
            yield "retry: 2000\n\n"
            if reset is not None:
                yield f"id: {self.last_id()}\nevent: reset\ndata: {{\"reason\": \"{reset}\"}}\n\n"
            while True:
                if client.dropped:
                    self.dropped += 1
                    yield "event: dropped\ndata: {\"reason\": \"the client read too slowly\"}\n\n"
                    return
                if client.pending:
                    chunk = []
                    while client.pending:
                        item = client.pending.popleft()
                        chunk.append(f"id: {self.run}-{item.seq}\ndata: {item.json.decode()}\n\n")
                    yield "".join(chunk)
                    continue
                if client.closed:
                    return
                client.wake.clear()  # nothing is pending, and nothing can arrive before the wait
                try:
                    await asyncio.wait_for(client.wake.wait(), self.heartbeat)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self._clients.discard(client)
