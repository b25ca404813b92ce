"""The device side: a library and the ``henge agent`` command for Linux devices.

The agent holds one connection as its device, applies each new, verified snapshot (write a file
atomically, or run a command with the config on stdin), reports applied/rejected, remembers what
it did across reboots, and reconnects forever with bounded, jittered exponential backoff. It
imports nothing of the server side (no amqtt): it is what runs on the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import ValidationError

from .backoff import Backoff
from .models import Snapshot, config_sha256
from .topics import Topics

log = logging.getLogger(__name__)

# A connection that ends sooner than this after CONNACK looks like a takeover or a quarantine.
SHORT_LIVED = 5.0


@dataclass(slots=True)
class AgentState:
    """What survives a reboot: the last version applied, and the last one rejected."""

    applied_version: int = 0
    rejected_version: int = 0

    @classmethod
    def load(cls, path: Path) -> AgentState:
        try:
            data = json.loads(path.read_text())
            return cls(int(data.get("applied_version", 0)), int(data.get("rejected_version", 0)))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as exc:
            log.warning("agent.state_unreadable path=%s error=%s", path, exc)
            return cls()

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps({"applied_version": self.applied_version,
                                       "rejected_version": self.rejected_version}).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temp file in the same dir, fsync it, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ApplyFailed(Exception):
    """The device could not run this config; the message goes back to the operator."""


Applier = Callable[[dict[str, Any]], Awaitable[None]]


def write_file_applier(target: Path) -> Applier:
    async def apply(config: dict[str, Any]) -> None:
        try:
            atomic_write(target, json.dumps(config, indent=2, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            raise ApplyFailed(f"cannot write {target}: {exc.strerror or exc}") from exc

    return apply


def exec_applier(command: list[str], timeout: float = 120.0) -> Applier:
    async def apply(config: dict[str, Any]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ApplyFailed(f"cannot run {command[0]}: {exc.strerror or exc}") from exc
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(json.dumps(config).encode()), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ApplyFailed(f"{command[0]} did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            text = stderr.decode(errors="replace").strip()[-2000:]
            raise ApplyFailed(text or f"{command[0]} exited with status {proc.returncode}")

    return apply


@dataclass
class Agent:
    host: str
    port: int
    device: str
    secret: str
    apply: Applier
    state_path: Path
    topic_prefix: str = "henge"
    keepalive: int = 30
    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.topics = Topics(self.topic_prefix)
        self.session = ""
        self.state = AgentState.load(self.state_path)

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; never gives up on the network."""
        while not stop.is_set():
            started = time.monotonic()
            accepted = False
            try:
                session = secrets.token_hex(8)  # names this connection in the presence protocol
                will = aiomqtt.Will(self.topics.device_presence(self.device),
                                    json.dumps({"state": "offline", "session": session}), qos=1)
                async with aiomqtt.Client(
                    self.host, self.port, identifier=self.device, username=self.device, password=self.secret,
                    keepalive=self.keepalive, timeout=self.connect_timeout, clean_session=True, will=will,
                ) as client:
                    self.session = session
                    accepted = True
                    started = time.monotonic()
                    log.info("agent.connected device=%s broker=%s:%d", self.device, self.host, self.port)
                    await self._session(client, stop)
                    if stop.is_set():
                        return
            except aiomqtt.MqttCodeError as exc:
                log.warning("agent.refused device=%s rc=%s", self.device, exc.rc)
                if exc.rc in (4, 134):
                    log.error("agent.bad_credentials device=%s: check the secret file", self.device)
                delay = self.backoff.failed_hard()
                await self._sleep(stop, delay)
                continue
            except (aiomqtt.MqttError, OSError) as exc:
                log.info("agent.disconnected device=%s error=%s", self.device, exc)
            lasted = time.monotonic() - started
            if accepted and lasted < SHORT_LIVED:
                log.warning(
                    "agent.closed_early device=%s lasted=%.1fs: another client may be using the identity %s",
                    self.device, lasted, self.device,
                )
                delay = self.backoff.failed_hard()
            else:
                if accepted:
                    self.backoff.reset()
                delay = self.backoff.next_delay()
            log.info("agent.reconnect_in device=%s delay=%.2fs", self.device, delay)
            await self._sleep(stop, delay)

    @staticmethod
    async def _sleep(stop: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        presence = self.topics.device_presence(self.device)
        await client.publish(presence, json.dumps({"state": "online", "session": self.session}), qos=1)
        await client.subscribe(self.topics.config(self.device), qos=1)
        if self.state.applied_version:
            # Heal a report lost with the previous connection; the server keeps the highest.
            await self._report(client, self.state.applied_version, "applied", None)
        messages = aiter(client.messages)
        while True:
            next_message = asyncio.ensure_future(anext(messages))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait((next_message, stopped), return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                next_message.cancel()
                await asyncio.gather(next_message, return_exceptions=True)
                body = {"state": "offline", "session": self.session, "reason": "client_disconnect"}
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(presence, json.dumps(body), qos=1, timeout=2)
                return
            stopped.cancel()
            message = next_message.result()
            await self.handle(client, message.payload if isinstance(message.payload, bytes) else b"")

    async def handle(self, client: aiomqtt.Client, payload: bytes) -> None:
        if not payload:
            return  # cleared: the device was removed
        try:
            snap = Snapshot.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("agent.bad_snapshot device=%s error=%s", self.device, exc.errors()[0]["msg"])
            return
        if snap.device != self.device or snap.sha256 != config_sha256(snap.config):
            log.warning("agent.unverified_snapshot device=%s version=%d", self.device, snap.version)
            return
        if snap.version <= self.state.applied_version or snap.version == self.state.rejected_version:
            log.debug("agent.skip device=%s version=%d", self.device, snap.version)
            return
        try:
            await self.apply(snap.config)
        except ApplyFailed as exc:
            self.state.rejected_version = snap.version
            self.state.save(self.state_path)
            log.warning("agent.rejected device=%s version=%d error=%s", self.device, snap.version, exc)
            await self._report(client, snap.version, "rejected", str(exc))
            return
        self.state.applied_version = snap.version
        self.state.save(self.state_path)
        log.info("agent.applied device=%s version=%d", self.device, snap.version)
        await self._report(client, snap.version, "applied", None)

    async def _report(self, client: aiomqtt.Client, version: int, status: str, error: str | None) -> None:
        body: dict[str, Any] = {"version": version, "status": status}
        if error is not None:
            body["error"] = error[:4000]
        await client.publish(self.topics.report(self.device), json.dumps(body), qos=1)


def parse_exec(command: str) -> list[str]:
    parts = shlex.split(command)
    if not parts:
        raise ValueError("--exec needs a command")
    return parts
