"""Load generator: raw MQTT 3.1.1 clients over asyncio sockets, one process per share of the fleet.

It deliberately uses no code of henge's (nor any MQTT library): the same bytes go to every broker.
Each worker process runs its clients in one event loop and reports timestamps (time.time(), the
same clock across processes) back to the orchestrator through a multiprocessing queue.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any


def _str(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int = 120,
                   mqtt5: bool = False, persistent: bool = False) -> bytes:
    """CONNECT; ``persistent``: CleanSession 0 (3.1.1) / Clean Start 0 with Session Expiry 1 h (5.0)."""
    flags = 0x00 if persistent else 0x02
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    body = _str("MQTT") + bytes([5 if mqtt5 else 4, flags]) + struct.pack("!H", keepalive)
    props = (b"\x05\x11" + struct.pack("!I", 3600)) if persistent else b"\x00"  # Session Expiry Interval
    body += (props if mqtt5 else b"") + payload  # 5.0: its property section
    return bytes([0x10]) + _remaining(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int = 1, mqtt5: bool = False) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if mqtt5 else b"") + _str(topic) + bytes([qos])
    return bytes([0x82]) + _remaining(len(body)) + body


def _skip_properties(body: bytes, offset: int) -> int:
    length, shift = 0, 0
    while True:
        byte = body[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return offset + length
        shift += 7


def publish_packet(topic: str, data: bytes, packet_id: int, qos: int = 1, retain: bool = True) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + data
    return bytes([0x30 | (qos << 1) | int(retain)]) + _remaining(len(body)) + body


def puback(packet_id: int) -> bytes:
    return bytes([0x40, 0x02]) + struct.pack("!H", packet_id)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    mult, length = 1, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            break
    return first >> 4, first & 0x0F, await reader.readexactly(length)


@dataclass
class Client:
    device: str
    secret: str | None
    topic: str
    filter: str = ""  # what it subscribes to: its config topic, or a wildcard over its own subtree
    mqtt5: bool = False
    persistent: bool = False  # CleanSession 0: the broker keeps a session for it
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    subscribed_at: float = 0.0
    messages: list[tuple[float, bytes]] = field(default_factory=list)
    wrong: int = 0
    closed_at: float = 0.0
    got: asyncio.Event = field(default_factory=asyncio.Event)
    ping_sent: float = 0.0
    rtts: list[float] = field(default_factory=list)
    report: bool = False  # answer every config with an "applied" report, as a device agent would
    announce: bool = False  # say "online" on presence/device, retained, as henge's agent does

    async def open(self, host: str, port: int, timeout: float = 30.0) -> None:
        """CONNECT and SUBSCRIBE, bounded: a broker that never answers is a failure, not a hang."""
        async with asyncio.timeout(timeout):
            await self._open(host, port)

    async def _open(self, host: str, port: int) -> None:
        local = (SOURCE_HOST, 0) if SOURCE_HOST else None  # past 28,000 ephemeral ports per source address
        self.reader, self.writer = await asyncio.open_connection(host, port, local_addr=local)
        self.writer.write(connect_packet(self.device, self.device if self.secret else None, self.secret,
                                         mqtt5=self.mqtt5, persistent=self.persistent))
        kind, _, body = await read_packet(self.reader)
        if kind != 2 or body[1] != 0:
            raise ConnectionError(f"{self.device}: CONNACK {body[1] if len(body) > 1 else '?'}")
        self.writer.write(subscribe_packet(1, self.filter or self.topic, mqtt5=self.mqtt5))
        while True:
            kind, flags, body = await read_packet(self.reader)
            if kind == 9:
                if body[-1] >= 0x80:  # refused (NATS: JetStream not ready): connected but deaf is a failure
                    raise ConnectionError(f"{self.device}: SUBACK {body[-1]:#x}")
                break
            self._on_packet(kind, flags, body)
        if self.announce:
            state = json.dumps({"state": "online", "session": f"{self.device}-{time.time_ns()}"}).encode()
            self.writer.write(publish_packet(self.topic.rsplit("/", 1)[0] + "/presence/device", state, 0, qos=0))
        self.subscribed_at = time.time()

    def _on_packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == 13 and self.ping_sent:
            self.rtts.append(time.time() - self.ping_sent)
            self.ping_sent = 0.0
        if kind != 3:
            return
        topic_len = struct.unpack("!H", body[:2])[0]
        topic = body[2:2 + topic_len].decode()
        qos = (flags >> 1) & 3
        offset = 2 + topic_len
        if qos:
            packet_id = struct.unpack("!H", body[offset:offset + 2])[0]
            offset += 2
            assert self.writer is not None
            self.writer.write(puback(packet_id))
        if self.mqtt5:
            offset = _skip_properties(body, offset)
        payload = body[offset:]
        if topic != self.topic:
            own = self.filter and topic.startswith(self.topic.rsplit("/", 1)[0] + "/")
            if not own:  # another device's topic: a leak
                self.wrong += 1
            return
        elif payload:
            try:
                if json.loads(payload).get("device", self.device) != self.device:
                    self.wrong += 1
            except ValueError:
                pass
            self.messages.append((time.time(), payload))
            self.got.set()
            if self.report and self.writer is not None:
                version = json.loads(payload).get("version")
                report = json.dumps({"version": version, "status": "applied"}).encode()
                self.writer.write(publish_packet(self.topic.rsplit("/", 1)[0] + "/report", report, 0, qos=0,
                                                 retain=False))

    async def pump(self) -> None:
        assert self.reader is not None
        try:
            while True:
                kind, flags, body = await read_packet(self.reader)
                self._on_packet(kind, flags, body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.closed_at = time.time()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


async def _bounded(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with sem:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


# The push's probe pings at most this often: 20 a second stays within henge's packet rate for a
# device (10 a second, a burst of 50) for a 5 s push; at 100 a second henge cut the probe off as a
# flood once its answers came back fast (2026-12-04), and the probe's device then missed the push.
PING_EVERY = 0.05

SOURCE_HOST: str | None = None  # this worker's own loopback address (127.0.0.x), when the fleet needs it


async def run_worker(spec: dict[str, Any], commands: Any, results: Any) -> None:
    """Follow the orchestrator's commands: connect, await_push, storm, hold, stop."""
    global SOURCE_HOST
    SOURCE_HOST = spec.get("source_host")
    host, port = spec["host"], spec["port"]
    sub_filter = spec.get("filter", "")
    mqtt5 = bool(spec.get("mqtt5"))
    persistent = bool(spec.get("persistent"))
    clients = [Client(d, s, spec["topic"].format(device=d), sub_filter.format(device=d) if sub_filter else "",
                      mqtt5, persistent, report=bool(spec.get("report")), announce=bool(spec.get("announce")))
               for d, s in spec["devices"]]
    pumps: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, commands.get)
        name = command["cmd"]
        if name == "connect":
            await asyncio.sleep(max(0.0, command["start_at"] - time.time()))
            ports = spec.get("ports") or [port]  # a cluster: devices spread over its nodes
            outcome = await _bounded([c.open(host, ports[i % len(ports)]) for i, c in enumerate(clients)],
                                     spec.get("concurrency", 500))
            errors = [repr(o) for o in outcome if isinstance(o, BaseException)]
            pumps = [asyncio.create_task(c.pump()) for c in clients if c.reader is not None]
            results.put({"cmd": name, "done_at": max((c.subscribed_at for c in clients), default=0.0),
                         "errors": errors[:5], "failed": len(errors)})
        elif name == "await_push":
            marker = command["marker"].encode()
            deadline = time.time() + command["timeout"]
            probe = clients[0] if command.get("ping") and clients else None
            last_ping = 0.0
            while time.time() < deadline and not all(any(marker in m for _, m in c.messages) for c in clients):
                if (probe is not None and not probe.ping_sent and probe.writer is not None
                        and time.time() - last_ping >= PING_EVERY):
                    probe.ping_sent = last_ping = time.time()  # one ping in flight at a time: its RTT is the stall
                    probe.writer.write(b"\xc0\x00")
                await asyncio.sleep(0.01)
            arrivals = [next((t for t, m in c.messages if marker in m), None) for c in clients]
            results.put({"cmd": name, "last": max((a for a in arrivals if a), default=0.0),
                         "first": min((a for a in arrivals if a), default=0.0),
                         "ping_max": max(probe.rtts, default=0.0) if probe else None,
                         "missing": sum(1 for a in arrivals if a is None), "wrong": sum(c.wrong for c in clients),
                         **({"arrivals": {c.device: a for c, a in zip(clients, arrivals, strict=True)}}
                            if command.get("arrivals") else {})})
        elif name == "storm":
            # Reconnect the first k clients with the same ids while the old sockets stay open.
            k = command["count"]
            await asyncio.sleep(max(0.0, command["start_at"] - time.time()))
            olds = clients[:k]
            news = [Client(c.device, c.secret, c.topic, c.filter, c.mqtt5, c.persistent) for c in olds]
            outcome = await _bounded([n.open(host, port) for n in news], spec.get("concurrency", 500))
            errors = [repr(o) for o in outcome if isinstance(o, BaseException)]
            new_pumps = [asyncio.create_task(n.pump()) for n in news if n.reader is not None]
            deadline = time.time() + command["timeout"]
            while time.time() < deadline and not all(n.got.is_set() for n in news if n.reader is not None):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # give the broker time to close the displaced connections
            results.put({
                "cmd": name,
                "current_at": max((n.messages[0][0] for n in news if n.messages), default=0.0),
                "without_config": sum(1 for n in news if not n.messages),
                "failed": len(errors), "errors": errors[:5],
                "old_still_open": sum(1 for o in olds if not o.closed_at),
                "wrong": sum(n.wrong for n in news) + sum(o.wrong for o in olds),
            })
            pumps += new_pumps
        elif name == "report_state":
            # Every client publishes its reported state (QoS 1) every `interval` s for `duration` s, the
            # fleet spread evenly over the interval; one message in `change_every` changes the document.
            live = [c for c in clients if c.writer is not None]
            start, every = command["start_at"], command["interval"]
            sent = await asyncio.gather(*(_reporting(c, start + every * i / max(1, len(live)),
                                                     start + command["duration"], every, command["change_every"])
                                          for i, c in enumerate(live)))
            results.put({"cmd": name, "sent": sum(sent)})
        elif name == "stop":
            for c in clients:
                c.close()
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            results.put({"cmd": name})
            return


async def _reporting(c: Client, at: float, until: float, interval: float, change_every: int) -> int:
    """One device's reported state every ``interval`` s from ``at``; one in ``change_every`` changes."""
    k = 0
    while at < until:
        await asyncio.sleep(max(0.0, at - time.time()))
        doc = {"fw": "2.4.1", "hw": {"rev": "B", "ram_mb": 512}, "disk_free_mb": 1000 - k // change_every,
               "agent": {"name": "bench", "version": "1"}}
        assert c.writer is not None
        c.writer.write(publish_packet(c.topic.rsplit("/", 1)[0] + "/reported", json.dumps({"document": doc}).encode(),
                                      k % 60000 + 1, qos=1, retain=False))
        k += 1
        at += interval
    return k


def worker_main(spec: dict[str, Any], commands: Any, results: Any) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run_worker(spec, commands, results))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put({"cmd": "cpu", "cpu": usage.ru_utime + usage.ru_stime})


async def publish_all(host: str, port: int, topics: list[tuple[str, bytes]], username: str | None,
                      password: str | None, timeout: float = 120.0) -> None:
    """The fleet push for brokers without henge: one client publishes every retained QoS 1 message."""
    try:
        async with asyncio.timeout(timeout):
            await _publish_all(host, port, topics, username, password)
    except TimeoutError:
        pass  # the subscribers' missing counts tell the story


async def _publish_all(host: str, port: int, topics: list[tuple[str, bytes]], username: str | None,
                       password: str | None) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet("bench-publisher", username, password))
    kind, _, body = await read_packet(reader)
    assert kind == 2 and body[1] == 0, body
    pending = 0
    for i, (topic, data) in enumerate(topics):
        writer.write(publish_packet(topic, data, packet_id=(i % 65000) + 1))
        pending += 1
        if pending >= 1000:  # keep at most ~1000 in flight, like a pipelined client would
            while pending > 500:
                kind, _, _ = await read_packet(reader)
                pending -= kind == 4
        await writer.drain() if i % 500 == 0 else None
    while pending:
        kind, _, _ = await read_packet(reader)
        pending -= kind == 4
    writer.close()
