"""The admin protocol's messages (docs/protocol.md), shared by its two clients: ``client`` (asyncio:
event streams, watches, library users) and ``admin_call`` (blocking: the CLI's one-shot commands,
which so start without loading asyncio). Both say a failure in the same words, from here.

A request is JSON on the admin topic: an id, the op, its args and this client's reply topic. What
comes back on the reply topic with that id is a progress tick (``{"id", "progress"}``, for an op
that says how far it is) or the reply (``{"id", "ok", "result" | "error"}``).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .codec import CONNACK_REASONS
from .errors import AuthenticationFailed, HengeError, RemoteError, ServiceUnavailable

if TYPE_CHECKING:
    from .endpoint import Endpoint

KEEPALIVE = 30  # seconds: an admin connection pings when it has said nothing for half of it


def client_id() -> str:
    """Unique, not secret (``os.urandom``: ``secrets`` would load OpenSSL's hashes into every command)."""
    return f"henge-cli-{os.urandom(6).hex()}"


def request(op: str, args: dict[str, Any], reply_to: str) -> tuple[str, bytes]:
    """A request's id and its payload."""
    request_id = os.urandom(8).hex()
    return request_id, json.dumps({"id": request_id, "op": op, "args": args, "reply_to": reply_to}).encode()


def body_of(payload: bytes) -> dict[str, Any] | None:
    """A reply or progress tick as the service sends it; None for anything else on the topic."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return None
    return body


def result_of(reply: dict[str, Any]) -> Any:
    """The op's result, or its failure as :class:`RemoteError` with the service's code and message."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise RemoteError(str(error.get("code", "error")), str(error.get("message", "request failed")))
    return reply.get("result")


def refused(endpoint: Endpoint, code: int) -> HengeError:
    """The service answered the CONNECT with ``code`` (not 0)."""
    if code in (4, 5):
        return AuthenticationFailed(f"the service at {endpoint.where} refused the admin credentials for "
                                    f"{endpoint.username!r}")
    return ServiceUnavailable(f"cannot connect to the service at {endpoint.where}: the broker refused the "
                              f"connection: {CONNACK_REASONS.get(code, code)}")


def unreachable(endpoint: Endpoint, why: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"cannot reach the service at {endpoint.where} (is `henge serve` running?): {why}")


def no_answer(op: str, limit: float, ticked: bool) -> ServiceUnavailable:
    silent = " of its last progress" if ticked else ""
    return ServiceUnavailable(f"the service did not answer {op!r} within {limit:g} s{silent}")


LOST = "lost the connection to the service"
