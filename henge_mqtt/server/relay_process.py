"""A listener process: it holds device sockets for the core, which holds everything else.

One process may hold no more sockets than its open-file limit (20,000 here: about 18,000 devices).
With ``listener_processes: N`` the core (:mod:`.relay`) binds every device port N times with
``SO_REUSEPORT`` and starts N of these, each with one of the sockets: the kernel spreads new
connections over them, and each process relays its devices' bytes, unchanged, over one link to
the core (:mod:`.relay_wire`). The core parses, authenticates, keeps the session table and
every deadline, exactly as for a socket of its own, so an MQTT client sees one broker.

What this process decides alone: whether it has room for one more socket (its own file limit,
``--max-connections``), and cutting off a device that does not read what is sent to it
(``--max-write``: the core cannot see this socket's buffer). Its link is its life: when the core
closes it or dies, this process ends and the kernel closes its devices' sockets. It imports only
the standard library and the server's listener, so it stays small.

TLS ends here, as in the core: the server's certificate, and when the listeners ask for client
certificates, the CAs the core's listener trusts (its ``cafile`` and every claim CA, then each new
claim CA as a TRUST frame) and its verify mode. The certificate a handshake verified goes up with
the connection's OPEN; the core authenticates with it as with one of its own sockets.

Run by the core only: ``python -m henge_mqtt.server.relay_process --link FD`` with the sockets to
listen on as JSON on standard input (a CA bundle may be longer than a command line may be).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import resource
import socket
import ssl
import sys
from typing import Any

from .listener import Acceptor
from .relay_wire import ABORT, CLOSE, DATA, EOF, HELLO, LOST, OPEN, TRUST, LinkEnd

log = logging.getLogger("henge_mqtt.server.relay_process")


class Device(asyncio.Protocol):
    """One device's socket: its bytes go up the link as they come."""

    __slots__ = ("number", "paused", "tls", "transport", "up")

    def __init__(self, up: Uplink, tls: bool = False) -> None:
        self.up = up
        self.tls = tls
        self.number = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not an asyncio.Transport subclass)
        self.up.opened(self)

    def data_received(self, data: bytes) -> None:
        self.up.send(DATA, self.number, data)

    def eof_received(self) -> bool | None:
        return None  # the socket closes; the core hears LOST

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.lost(self, "")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class Uplink(LinkEnd):
    """This process's end of the link: device bytes up, the core's bytes and orders down."""

    def __init__(self, max_connections: int, max_write: int, done: asyncio.Future[None],
                 contexts: list[ssl.SSLContext]) -> None:
        super().__init__(log, "relay")
        self.contexts = contexts  # of the TLS listeners that ask for client certificates: TRUST adds to them
        self.max_connections = max_connections
        self.max_write = max_write
        self.done = done
        self.devices: dict[int, Device] = {}
        self.sockets = 0  # admitted, from accept to connection_lost
        self.refused_at_limit = 0
        self.next_number = 0
        self.reading = True  # False while the core reads slower than the devices send

    # ---- the link -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.send(HELLO, 0, str(os.getpid()).encode())

    def data_received(self, data: bytes) -> None:
        devices = self.devices
        for kind, number, payload in self.frames(data):
            if kind == TRUST:
                self.trust(payload.decode("utf-8", "replace"))
                continue
            device = devices.get(number)
            if device is None or device.transport is None:
                continue  # gone already: its LOST is on the way to the core
            transport = device.transport
            if kind == DATA:
                transport.write(payload)
                if device.paused and transport.get_write_buffer_size() > self.max_write:
                    self.lost(device, "slow_consumer")  # the core logs it (rate-limited), as its own
                    transport.abort()
            elif kind == CLOSE:
                transport.close()
            elif kind == EOF:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            elif kind == ABORT:
                del devices[number]  # the core has forgotten it: no LOST
                transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.reading = False
        for device in self.devices.values():
            if device.transport is not None:
                device.transport.pause_reading()

    def resume_writing(self) -> None:
        self.reading = True
        for device in self.devices.values():
            if device.transport is not None and not device.transport.is_closing():
                device.transport.resume_reading()

    def trust(self, pem: str) -> None:
        """A claim CA the core's listeners now trust (as :func:`~henge_mqtt.service.claims.trust_claim_ca`)."""
        for context in self.contexts:
            try:
                context.load_verify_locations(cadata=pem)
            except ssl.SSLError as exc:  # the core loaded it first: not expected; said, not fatal
                log.error("relay.trust_failed error=%s", exc)
                return
            if context.verify_mode == ssl.CERT_NONE:
                context.verify_mode = ssl.CERT_OPTIONAL

    # ---- devices ----------------------------------------------------------------------------------

    def opened(self, device: Device) -> None:
        self.next_number = self.next_number % 0xFFFFFFFF + 1
        while self.next_number in self.devices:
            self.next_number = self.next_number % 0xFFFFFFFF + 1
        device.number = self.next_number
        self.devices[device.number] = device
        assert device.transport is not None
        peer = device.transport.get_extra_info("peername")
        host, port = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else ("unknown", 0)
        opened = f"{host} {port}{' tls' if device.tls else ''}".encode()
        cert = device.transport.get_extra_info("peercert") if device.tls else None
        if cert:  # verified in the handshake: what the core authenticates with
            opened += b"\n" + json.dumps({"subject": cert.get("subject", ()),
                                          "issuer": cert.get("issuer", ())}).encode()
        self.send(OPEN, device.number, opened)
        if not self.reading:
            device.transport.pause_reading()

    def lost(self, device: Device, why: str) -> None:
        if self.devices.get(device.number) is device:
            del self.devices[device.number]
            self.send(LOST, device.number, why.encode())
        if device.transport is not None:
            device.transport = None
            self.sockets -= 1

    # ---- admission (the Acceptor's): this process's own file budget -------------------------------

    def admit(self, admin_only: bool) -> bool:
        if self.sockets >= self.max_connections:
            return False
        self.sockets += 1
        return True

    def refused(self, admin_only: bool, reason: str) -> None:
        self.refused_at_limit += 1
        if self.refused_at_limit in (1, 10, 100) or self.refused_at_limit % 1000 == 0:
            log.warning("relay.max_connections limit=%d refused=%d (%s)", self.max_connections,
                        self.refused_at_limit, reason)

    def adopt_failed(self, admin_only: bool, error: BaseException) -> None:
        self.sockets -= 1


def tls_context(tls: dict[str, Any]) -> ssl.SSLContext:
    """The core's listener's context, again: ``{"cert": [certfile, keyfile], "cas": PEM, "verify": mode}``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls["cert"])
    if tls["cas"]:
        context.load_verify_locations(cadata=tls["cas"])
    context.verify_mode = ssl.VerifyMode(tls["verify"])
    return context


async def serve(link_fd: int, listen: list[dict[str, Any]], contexts: list[ssl.SSLContext | None],
                max_connections: int, max_write: int, handshake_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    # TLS ends here: the core gets the plaintext, and the client certificate the handshake verified.
    up = Uplink(max_connections, max_write, done,
                [c for c, spec in zip(contexts, listen, strict=True) if c is not None and spec["tls"]["asks"]])
    link = socket.socket(fileno=link_fd)
    link.setblocking(False)
    await loop.connect_accepted_socket(lambda: up, link)
    acceptors = []
    for spec, context in zip(listen, contexts, strict=True):
        sock = socket.socket(fileno=spec["fd"])
        sock.setblocking(False)
        acceptor = Acceptor(sock, functools.partial(Device, up, context is not None), up, ssl_context=context,
                            handshake_timeout=handshake_timeout)
        acceptor.start()
        acceptors.append(acceptor)
    await done
    # The core closed the link, or died: the kernel closes every device socket as this process ends,
    # all at once, which is quicker than closing them one by one here.
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="henge-relay", description="henge's listener process (run by the core)")
    parser.add_argument("--link", type=int, required=True)
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    parser.add_argument("--max-connections", type=int, required=True)
    parser.add_argument("--max-write", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s listener-process-{args.index}: %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Its own session (the core starts it so): a terminal's ^C reaches the core, which ends the link.
    # Standard input: [{fd, tls: null | {cert: [certfile, keyfile], cas: PEM, verify: mode, asks: bool}}]
    listen = json.loads(sys.stdin.read())
    try:
        contexts = [tls_context(spec["tls"]) if spec["tls"] else None for spec in listen]
    except (OSError, ssl.SSLError) as exc:  # files changed since the core loaded them: one line, no traceback
        log.error("relay.tls_failed error=%s: the TLS listener's certificate, key or CAs cannot be loaded", exc)
        return 1
    asyncio.run(serve(args.link, listen, contexts, args.max_connections, args.max_write, args.handshake_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
