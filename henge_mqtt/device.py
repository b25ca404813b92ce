"""The device side: a library and the ``henge agent`` command for Linux devices.

The agent holds one connection as its device, applies each new, verified snapshot (write a file
atomically, or run a command with the config on stdin), reports applied/rejected, remembers what
it did across reboots, and reconnects forever with bounded, jittered exponential backoff. It
also reports what the device is and runs (its reported state, docs/protocol.md#reported-state):
a base set of its own plus what ``--report-cmd`` prints, on connect, after each config, and every
``report_interval`` when something changed, such as the config file edited on the device. It
imports nothing of the server side: it is what runs on the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from pydantic import ValidationError

from . import __version__
from .backoff import Backoff
from .ids import StrictJSONError, strict_json
from .models import Snapshot, config_sha256, rfc3339, utc_now
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


def write_private(path: Path, data: bytes) -> None:
    """``atomic_write`` for a secret: the file is its owner's alone (0600) from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
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


# MQTT 5.0 reason codes the agent acts on (the server's DISCONNECT or CONNACK).
SESSION_TAKEN_OVER = 0x8E
BAD_CREDENTIALS = (4, 0x86)  # 3.1.1 CONNACK 4, 5.0 CONNACK 0x86
NOT_AUTHORIZED = (5, 0x87)  # 3.1.1 CONNACK 5, 5.0 CONNACK 0x87
UNSUPPORTED_PROTOCOL = (1, 0x84)  # 3.1.1 CONNACK 1 (a 3.1.1-only broker answering 5.0), 5.0 CONNACK 0x84
STOP_GRACE = 1.0  # seconds the agent spends saying goodbye on SIGTERM


class Disconnected(Exception):
    """The server ended the session; ``reason`` is its 5.0 reason code (None: no DISCONNECT)."""

    def __init__(self, reason: int | None, text: str | None) -> None:
        super().__init__(text or (f"reason 0x{reason:02x}" if reason is not None else "connection lost"))
        self.reason = reason
        self.text = text


class _Client(aiomqtt.Client):
    """aiomqtt keeps the properties of CONNACK and DISCONNECT to itself; their 5.0 Reason String is
    what tells a device why it was refused or displaced, so this keeps it (and nothing else)."""

    server_reason: str | None = None
    server_code: int | None = None  # the reason code of the server's DISCONNECT, if it sent one

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        self.server_reason = getattr(properties, "ReasonString", None)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        self.server_reason = getattr(properties, "ReasonString", None) or self.server_reason
        value = getattr(reason_code, "value", None)
        self.server_code = value if isinstance(value, int) and value >= 0x80 else None
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else None


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
    mqtt5: bool = True  # MQTT 5.0 by default: the server then says why it closed a connection
    config_file: Path | None = None  # where the config lives on the device (--write): reported, reconciled
    report_cmd: list[str] | None = None  # prints a JSON object to report besides the base set
    report_interval: float = 60.0  # seconds between checks for a changed reported state

    def __post_init__(self) -> None:
        self.topics = Topics(self.topic_prefix)
        self.session = ""
        self.state = AgentState.load(self.state_path)
        self.last_disconnect: Disconnected | None = None
        self.started_at = rfc3339(utc_now())
        self.booted_at = boot_time()
        self.last_reported: dict[str, Any] | None = None  # what this connection last sent

    async def claim(self, claim: dict[str, Any], secret_path: Path, stop: asyncio.Event, *,
                    serial: str | None = None) -> bool:
        """Get this device's identity with a claim credential (docs/onboarding.md) and keep its
        secret in ``secret_path`` (mode 0600, written atomically) before anything else: False if
        ``stop`` came first. A refusal is for good (ClaimFailed); the network and a busy service
        (claiming too often) are tried again with the backoff."""
        # The nonce and the secret this device chose outlive a lost answer (and a reboot): asked again
        # with them, the service answers again.
        nonce_path = secret_path.with_name(secret_path.name + ".claim-nonce")
        nonce, chosen = read_claim_nonce(nonce_path)
        while not stop.is_set():
            try:
                secret = await claim_identity(self.host, self.port, claim, self.device, nonce, chosen, serial=serial,
                                              topic_prefix=self.topic_prefix, mqtt5=self.mqtt5)
            except ClaimBusy as exc:
                log.warning("agent.claim_busy device=%s: %s; trying again", self.device, exc)
            except MqttConnectError as exc:
                code = _code(exc)
                if code in UNSUPPORTED_PROTOCOL and self.mqtt5:
                    self.mqtt5 = False
                    continue
                log.warning("agent.claim_refused_at_connect device=%s code=%s: trying again", self.device, code)
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                log.warning("agent.claim_failed device=%s error=%s: trying again", self.device, exc or type(exc))
            else:
                write_private(secret_path, secret.encode() + b"\n")
                nonce_path.unlink(missing_ok=True)
                self.secret = secret
                log.info("agent.claimed device=%s secret=%s", self.device, secret_path)
                return True
            await self._sleep(stop, self.backoff.failed_hard())
        return False

    async def reported_document(self) -> dict[str, Any]:
        """What this device is and runs: ``--report-cmd``'s object, then the base set over it
        (docs/protocol.md#reported-state lists the base set)."""
        document = await run_report_cmd(self.report_cmd) if self.report_cmd else {}
        document.update({
            "agent": {"name": "henge-agent", "version": __version__},
            "platform": {"system": platform.system(), "release": platform.release(),
                         "machine": platform.machine(), "python": platform.python_version()},
            "started_at": self.started_at, "booted_at": self.booted_at,
            "applied_version": self.state.applied_version or None,
        })
        if self.config_file is not None:
            document["config_sha256"] = file_sha256(self.config_file)
        return document

    async def send_reported(self, client: aiomqtt.Client, *, force: bool = False) -> bool:
        """The reported state, when it changed since this connection last sent it (or ``force``)."""
        document = await self.reported_document()
        if document == self.last_reported and not force:
            return False
        await client.publish(self.topics.reported(self.device), json.dumps({"document": document}), qos=1)
        self.last_reported = document
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; never gives up on the network."""
        while not stop.is_set():
            started = time.monotonic()
            accepted = False
            displaced = False
            client: _Client | None = None
            try:
                session = secrets.token_hex(8)  # names this connection in the presence protocol
                # Retained, like every announcement: a service that restarts reads who is connected now.
                will = aiomqtt.Will(self.topics.device_presence(self.device),
                                    json.dumps({"state": "offline", "session": session}), qos=1, retain=True)
                client = _Client(
                    self.host, self.port, identifier=self.device, username=self.device, password=self.secret,
                    keepalive=self.keepalive, timeout=self.connect_timeout, clean_session=None if self.mqtt5 else True,
                    will=will, protocol=aiomqtt.ProtocolVersion.V5 if self.mqtt5 else aiomqtt.ProtocolVersion.V311,
                )
                async with client:
                    self.session = session
                    accepted = True
                    started = time.monotonic()
                    log.info("agent.connected device=%s broker=%s:%d mqtt=%s", self.device, self.host, self.port,
                             "5.0" if self.mqtt5 else "3.1.1")
                    await self._session(client, stop)
                    if stop.is_set():
                        return
            except MqttConnectError as exc:  # the CONNACK refused us
                code = _code(exc)
                if code in UNSUPPORTED_PROTOCOL and self.mqtt5:
                    # A broker with no MQTT 5.0 (a NATS cluster): 3.1.1 from now on, at once.
                    log.warning("agent.mqtt311 device=%s broker=%s:%d: the broker does not speak MQTT 5.0; "
                                "using 3.1.1", self.device, self.host, self.port)
                    self.mqtt5 = False
                    continue
                why = client.server_reason if client is not None else None
                log.warning("agent.refused device=%s code=%s reason=%s", self.device, code, why or exc)
                if code in BAD_CREDENTIALS:
                    log.error("agent.bad_credentials device=%s: check the secret file", self.device)
                await self._sleep(stop, self.backoff.failed_hard())
                continue
            except Disconnected as exc:
                self.last_disconnect = exc
                displaced = exc.reason == SESSION_TAKEN_OVER
                log.info("agent.disconnected device=%s reason=%s", self.device, exc)
            except (aiomqtt.MqttError, OSError) as exc:
                said = client.server_code if client is not None and accepted else None
                if said is not None:  # the server's DISCONNECT raced a publish or subscribe: believe it
                    self.last_disconnect = Disconnected(said, client.server_reason if client else None)
                    displaced = said == SESSION_TAKEN_OVER
                    log.info("agent.disconnected device=%s reason=%s", self.device, self.last_disconnect)
                else:
                    log.info("agent.disconnected device=%s error=%s", self.device, exc)
            if stop.is_set():
                return
            lasted = time.monotonic() - started
            if displaced or (accepted and lasted < SHORT_LIVED):
                # henge says so (0x8E); other brokers close a displaced client with another code (Mosquitto:
                # 0x80) or none (3.1.1): any connection closed within seconds counts as displaced.
                log.warning(
                    "agent.closed_early device=%s lasted=%.1fs: another client may be using the identity %s%s",
                    self.device, lasted, self.device, " (the server: session taken over)" if displaced else "",
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

    async def _session(self, client: _Client, stop: asyncio.Event) -> None:
        """One connection's life. Every wait races the connection itself: when the server closes
        it (a takeover, say), no publish or subscribe hangs on until its own timeout."""
        inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()

        async def pump() -> None:
            async for message in client.messages:
                inbox.put_nowait(message)

        reader = asyncio.create_task(pump())
        stopped = asyncio.create_task(stop.wait())
        try:
            async def guarded(coro: Awaitable[Any]) -> Any:
                op = asyncio.ensure_future(coro)
                done, _ = await asyncio.wait({op, reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if op in done:
                    return op.result()
                op.cancel()
                await asyncio.gather(op, return_exceptions=True)
                if reader in done:
                    self._raise_disconnected(client, reader)
                return None

            presence = self.topics.device_presence(self.device)
            await guarded(client.publish(presence, json.dumps({"state": "online", "session": self.session}), qos=1,
                                         retain=True))
            granted = await guarded(client.subscribe(self.topics.config(self.device), qos=1))
            if granted is not None and any(getattr(code, "value", code) >= 0x80 for code in granted):
                # Refused (an ACL, or a NATS node whose JetStream is not back yet after a node loss):
                # connected but deaf would be worse than trying again.
                raise aiomqtt.MqttError("the broker refused the config subscription; trying again")
            self.last_reported = None
            await guarded(self.send_reported(client))
            if self.state.applied_version and not stop.is_set():
                # Heal a report lost with the previous connection; the server keeps the highest.
                await guarded(self._report(client, self.state.applied_version, "applied", None))
            loop = asyncio.get_running_loop()
            next_check = loop.time() + self.report_interval
            while not stop.is_set():
                try:
                    message = await guarded(asyncio.wait_for(inbox.get(), max(0.0, next_check - loop.time())))
                except TimeoutError:
                    message = None
                if message is not None:
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    await guarded(self.handle(client, payload))
                if loop.time() >= next_check and not stop.is_set():
                    next_check = loop.time() + self.report_interval
                    await guarded(self.send_reported(client))
            body = {"state": "offline", "session": self.session, "reason": "client_disconnect"}
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(STOP_GRACE / 2):  # a goodbye, bounded: SIGTERM is prompt
                    await client.publish(presence, json.dumps(body), qos=1, retain=True, timeout=STOP_GRACE / 2)
        finally:
            for task in (reader, stopped):
                task.cancel()
            await asyncio.gather(reader, stopped, return_exceptions=True)

    @staticmethod
    def _raise_disconnected(client: _Client, reader: asyncio.Task[None]) -> None:
        exc = reader.exception() if not reader.cancelled() else None
        if exc is not None and not isinstance(exc, aiomqtt.MqttError):
            raise exc
        raise Disconnected(client.server_code, client.server_reason) from exc

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
        if snap.version == self.state.applied_version and self.config_file is not None and (
                file_sha256(self.config_file) != snap.sha256):
            # The version it runs, delivered again (henge push --reconcile, or a reconnect) while the
            # file says something else (edited on the device): the file is put back.
            log.warning("agent.reconcile device=%s version=%d: %s was changed on the device; writing it again",
                        self.device, snap.version, self.config_file)
        elif snap.version <= self.state.applied_version or snap.version == self.state.rejected_version:
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
        # The reported state first (its config_sha256 is now this version's), then the report: the
        # service never sees "applied" next to the old file's hash (it would read as drift).
        await self.send_reported(client)
        await self._report(client, snap.version, "applied", None)

    async def _report(self, client: aiomqtt.Client, version: int, status: str, error: str | None) -> None:
        body: dict[str, Any] = {"version": version, "status": status}
        if error is not None:
            body["error"] = error[:4000]
        await client.publish(self.topics.report(self.device), json.dumps(body), qos=1)


def read_claim_nonce(path: Path) -> tuple[str, str]:
    """``(nonce, secret)`` for this device's claim, made and kept in ``path`` (0600) before the
    first try, so that a try whose answer was lost is asked again with the same ones."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    try:
        kept = json.loads(text) if text.startswith("{") else {"nonce": text}
    except ValueError:
        kept = {}
    nonce, secret = kept.get("nonce"), kept.get("secret")
    if isinstance(nonce, str) and nonce and isinstance(secret, str) and secret:
        return nonce, secret
    nonce = nonce if isinstance(nonce, str) and nonce else secrets.token_urlsafe(16)
    secret = secrets.token_urlsafe(24)
    write_private(path, json.dumps({"nonce": nonce, "secret": secret}).encode())
    return nonce, secret


class ClaimBusy(Exception):
    """The service answered "claiming too often" (behind an external broker it says so in the
    answer, not at CONNECT): try again after the backoff."""


class ClaimFailed(Exception):
    """The service refused this device's claim for good (used up, expired, revoked, an id that
    exists, a bad request): ``code`` says which; trying again will not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


CLAIM_TIMEOUT = 30.0  # seconds for the answer to a claim request


async def claim_identity(host: str, port: int, claim: dict[str, Any], device: str, nonce: str, secret: str, *,
                         serial: str | None = None, topic_prefix: str = "henge", mqtt5: bool = True,
                         timeout: float = CLAIM_TIMEOUT) -> str:
    """Trade a claim credential (the claim file's ``claim`` and ``secret``) for an identity of this
    device's own with the ``secret`` it chose (docs/onboarding.md), as the connection ``nonce``
    (random, 128 bits; the same nonce and secret again are answered again if the answer was lost).
    The request carries the claim's credential too, which is how it says whose it is behind an
    external broker. Returns the secret; raises ClaimFailed when the service refuses it, ClaimBusy
    when it asks to come back later, aiomqtt's errors (or TimeoutError) when the network fails
    (then the caller tries again)."""
    topics = Topics(topic_prefix)
    request: dict[str, Any] = {"device": device, "secret": secret, "claim": claim["claim"],
                               "claim_secret": claim["secret"]}
    if serial is not None:
        request["serial"] = serial
    client = _Client(host, port, identifier=nonce, username=f"claim:{claim['claim']}", password=claim["secret"],
                     timeout=timeout, protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311)
    try:
        async with asyncio.timeout(timeout), client:
            await client.subscribe(topics.claim_response(nonce), qos=1)
            await client.publish(topics.claim_request(nonce), json.dumps(request), qos=1)
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b"{}"
                answer = json.loads(payload)
                if answer.get("ok") and answer.get("device") == device:
                    return secret
                if answer.get("code") == "rate_limited":
                    raise ClaimBusy(str(answer.get("message", "claiming too often")))
                raise ClaimFailed(str(answer.get("code", "refused")),
                                  str(answer.get("message", "the claim was refused")))
    except MqttConnectError as exc:
        code = _code(exc)
        if code in BAD_CREDENTIALS:
            raise ClaimFailed("bad_credentials", "the claim file's credential is not accepted") from exc
        if code in NOT_AUTHORIZED:  # used up, expired or revoked: for good (a busy service says 3 / 0x9F)
            raise ClaimFailed("not_authorized", client.server_reason or "the claim cannot be used") from exc
        raise
    raise TimeoutError("no answer to the claim request")


REPORT_CMD_TIMEOUT = 10.0
REPORT_CMD_MAX_BYTES = 64 * 1024


def file_sha256(path: Path) -> str | None:
    """The config a file holds, as henge hashes configs: the SHA-256 of the canonical JSON of the
    object it parses to (so a pretty-printed copy of version 4 matches version 4's sha256); the
    SHA-256 of its bytes when it is not a JSON object (it then matches no version: drift); None
    when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        parsed = strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError, ValueError):
        parsed = None
    return config_sha256(parsed) if isinstance(parsed, dict) else hashlib.sha256(data).hexdigest()


def boot_time() -> str | None:
    """When the machine booted (Linux ``/proc/stat``), so uptime is ``now - booted_at``: a start time
    stays the same from one report to the next, an uptime would make every report a change."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return rfc3339(datetime.fromtimestamp(int(line.split()[1]), UTC))
    except (OSError, ValueError):
        return None
    return None


async def run_report_cmd(command: list[str]) -> dict[str, Any]:
    """What ``--report-cmd`` prints: one JSON object on stdout, within 10 s and 64 KiB; otherwise
    ``{"report_cmd_error": why}``, reported like the rest (the operator sees what went wrong)."""
    try:
        proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return {"report_cmd_error": f"cannot run {command[0]}: {exc.strerror or exc}"}
    try:
        out, err = await asyncio.wait_for(proc.communicate(), REPORT_CMD_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"report_cmd_error": f"{command[0]} did not finish within {REPORT_CMD_TIMEOUT:g} s"}
    if proc.returncode != 0:
        return {"report_cmd_error": (err.decode(errors="replace").strip()[-500:]
                                     or f"{command[0]} exited with status {proc.returncode}")}
    if len(out) > REPORT_CMD_MAX_BYTES:
        return {"report_cmd_error": f"{command[0]} printed {len(out)} bytes, over {REPORT_CMD_MAX_BYTES}"}
    try:
        found = strict_json(out.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError, ValueError) as exc:
        return {"report_cmd_error": f"{command[0]} did not print JSON: {exc}"}
    if not isinstance(found, dict):
        return {"report_cmd_error": f"{command[0]} printed JSON that is not an object"}
    return found


def parse_exec(command: str, option: str = "--exec") -> list[str]:
    try:
        parts = shlex.split(command)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"{option}: {exc}") from None
    if not parts:
        raise ValueError(f"{option} needs a command")
    return parts
