"""Onboarding by claim (docs/onboarding.md): a new device trades a claim credential, shared by a
batch, for an identity of its own.

The device connects with user name ``claim:<claim id>``, the claim's secret as password and a
random nonce as client id; it may then only publish ``{prefix}/claim/{nonce}/request`` and read
``{prefix}/claim/{nonce}/response``. Everything a refusal needs is checked on the loop, from
memory, before the PUBACK (a 5.0 device hears why in its reason code); the device itself is
created in one store transaction, then the answer, with its secret, goes to the response topic.
Claiming CONNECTs with a valid claim credential are rate-limited together
(``claim_rate``/``claim_burst``; a wrong one is refused before it takes a turn, so guesses cannot
crowd out the batch), and a claiming connection's publishes by the device limits, so a flood of
claims costs a bounded amount.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ClaimRefused, HengeError, ValidationFailed
from ..ids import StrictJSONError, device_id_problem, strict_json
from ..logs import LogLimiter
from ..models import ConfigVersion
from ..ports import BrokerPort, Name, PeerCert, Principal, Refusal, name_of
from ..sessions import take_token
from ..store import StoreWorker
from ..topics import Topics
from .events import Events

log = logging.getLogger("henge_mqtt.service")

NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
# A secret a device chooses for itself: random, as henge's own are (they are hashed fast, and for
# NATS with bcrypt's least cost: no cost factor protects a guessable one).
PROPOSED_SECRET = re.compile(r"[A-Za-z0-9._~+/=-]{22,128}")
REQUEST_FIELDS = {"device", "serial", "secret", "claim", "claim_secret"}
MAX_REQUEST_BYTES = 4096
# MQTT 5.0 reason codes in the PUBACK of a claim request.
NOT_AUTHORIZED = 0x87
PAYLOAD_FORMAT_INVALID = 0x99


def ca_subject(pem: str) -> Name:
    """The subject of the one CA certificate in ``pem``; ValidationFailed otherwise."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ValidationFailed(f"--ca: not a PEM certificate: {exc}") from None
    found = context.get_ca_certs()
    if len(found) != 1:
        raise ValidationFailed(f"--ca: give one CA certificate (CA:TRUE), not {len(found)}")
    return name_of(found[0]["subject"])


def trust_claim_ca(contexts: list[ssl.SSLContext], pem: str, subject: Name, *, new: bool) -> None:
    """Make the TLS listeners that ask for client certificates accept certificates the claim CA
    signed; ``new``: first refuse a CA whose name another trusted CA has (its certificates could
    not be told apart)."""
    if new:
        for context in contexts:
            if any(name_of(c["subject"]) == subject for c in context.get_ca_certs()):
                raise ValidationFailed("--ca: a CA the listeners trust already has this name; a claim CA needs "
                                       "a name of its own")
    for context in contexts:
        context.load_verify_locations(cadata=pem)
        if context.verify_mode == ssl.CERT_NONE:
            context.verify_mode = ssl.CERT_OPTIONAL


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    device: str
    extra: dict[str, str]  # labels the device gives of itself: its serial
    secret: str | None  # the secret the device chose for itself (the answer then carries none)
    claim: str | None  # the claim and its secret: how a request says whose it is behind an external broker
    claim_secret: str | None


class Onboarding:
    def __init__(self, worker: StoreWorker, broker: BrokerPort, topics: Topics, events: Events, *,
                 rate: float, burst: int, spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 publish_rows: Callable[[list[ConfigVersion]], Coroutine[Any, Any, Any]],
                 check_id: Callable[[str], None], external: bool = False,
                 tell_broker: Callable[[str, str], Coroutine[Any, Any, Any]] | None = None) -> None:
        self.worker = worker
        self.broker = broker
        self.topics = topics
        self.events = events
        self.rate = rate
        self.burst = burst
        # Behind an external broker henge sees a request, not who sent it: each request carries its
        # claim's credential, the device chooses its own secret (any claimer may read an answer
        # there), and the broker learns the new identity (``tell_broker``) before the answer.
        self.external = external
        self._tell_broker = tell_broker
        self._full_at = 0.0  # the claims' rate (``take_token``)
        self._spawn = spawn
        self._publish_rows = publish_rows
        self._check_id = check_id
        self._claim_of: OrderedDict[str, str] = OrderedDict()  # nonce -> the claim its connection used
        self._cert_cn: dict[str, str] = {}  # nonce -> the CN of the claim CA's certificate it claimed with
        self._in_flight: dict[str, int] = {}  # claim -> requests being stored (counted against its uses)
        self._answering: set[str] = set()  # nonces whose request is being stored
        self._log = LogLimiter(log)

    # ---- CONNECT -------------------------------------------------------------------------------------

    def authenticate(self, claim_id: str, secret: str | None, nonce: str,
                     cert: PeerCert | None = None) -> Principal | Refusal:
        """A claiming CONNECT: the claim's secret, or a certificate its claim CA signed (the TLS
        handshake verified it; its CN is then the only id it may claim)."""
        refused = self._admit(claim_id, secret, nonce, cert)
        if refused is None:
            return Principal("claim", nonce)
        code, text = refused
        why: Literal["bad_credentials", "not_authorized", "rate_limited"] = (
            "bad_credentials" if code == "bad_credentials" else "rate_limited" if code == "rate_limited"
            else "not_authorized")
        return Refusal(why, text)

    def _admit(self, claim_id: str, secret: str | None, nonce: str,
               cert: PeerCert | None = None, *, turn_taken: bool = False) -> tuple[str, str] | None:
        """Whether this credential may claim with this nonce now: None, or ``(code, why)``. Admitted,
        the nonce is the claim's until it is answered. ``turn_taken``: the caller took its turn of
        the rate limit already."""
        store = self.worker.store
        record = store.claim_record(claim_id)
        by_cert = (record is not None and record.ca_issuer is not None and cert is not None and bool(cert.cn)
                   and cert.issuer == record.ca_issuer)
        if not by_cert:
            record = store.check_claim(claim_id, secret or "")
        if record is None:  # a guess costs a hash, like a wrong device secret; it takes no claim's turn
            self._refused("bad_credentials", claim_id, nonce)
            return "bad_credentials", "bad claim credential"
        if not turn_taken and not self._take_turn(claim_id):
            return "rate_limited", "claiming too often: retry later"
        if not NONCE.fullmatch(nonce):
            self._refused("bad_nonce", claim_id, nonce)
            return "bad_nonce", "the nonce (the client id) must be random: 16-64 of A-Z a-z 0-9 _ -"
        claimed = store.nonce_used(nonce)
        if claimed is not None and not self._never_connected(claimed):
            self._refused("replay", claim_id, nonce)
            return "replay", "this nonce claimed before: use a new one"
        refused = record.refusal(time.time())
        if refused is not None and (claimed is None or refused.reason == "revoked"):
            # (A nonce asking again for its lost answer had its use: only a revocation stops it.)
            self._refused(refused.reason, claim_id, nonce)
            return refused.reason, str(refused)
        self._claim_of[nonce] = claim_id
        if by_cert and cert is not None and cert.cn:
            self._cert_cn[nonce] = cert.cn
        else:
            self._cert_cn.pop(nonce, None)
        if len(self._claim_of) > 100_000:  # connections that never asked: forget the oldest
            self._cert_cn.pop(self._claim_of.popitem(last=False)[0], None)
        return None

    def _take_turn(self, claim_id: str) -> bool:
        taken, self._full_at = take_token(self._full_at, time.monotonic(), self.rate, self.burst)
        if taken:
            return True
        self.events.count("claims_rate_limited")
        self._log.log(logging.WARNING, "claim.rate_limited", "claim=%s", claim_id)
        return False

    # ---- the request -----------------------------------------------------------------------------------

    def on_request(self, nonce: str, payload: bytes) -> int:
        """The 5.0 reason code for the PUBACK; the answer goes to the response topic either way."""
        # Behind a broker any claim holder can publish here, a bad request or a wrong credential too:
        # every request takes its turn first, so the work henge does for them is bounded by the rate.
        if self.external and not self._take_turn("?"):
            self._answer(nonce, ok=False, code="rate_limited", message="claiming too often: retry later")
            return NOT_AUTHORIZED
        try:
            request = self._parse(payload)
        except ValueError as exc:
            who = self._claim_of.get(nonce, "?")
            self._refused("invalid", who, nonce)
            self._answer(nonce, ok=False, code="invalid", message=str(exc))
            return PAYLOAD_FORMAT_INVALID
        if self.external and (request.claim is None or request.claim_secret is None or request.secret is None):
            self._refused("invalid", request.claim or "?", nonce)
            self._answer(nonce, ok=False, code="invalid", message=(
                "behind an external broker a request carries claim, claim_secret and the device's own secret"))
            return PAYLOAD_FORMAT_INVALID
        if nonce in self._answering:  # (before admitting: that would hand a nonce being answered over)
            self._answer(nonce, ok=False, code="replay", message="this request is being answered")
            return NOT_AUTHORIZED
        if self.external:  # no connection said whose it is: the request does, every time
            assert request.claim is not None
            turned_away = self._admit(request.claim, request.claim_secret, nonce, turn_taken=True)
            if turned_away is not None:
                self._answer(nonce, ok=False, code=turned_away[0], message=turned_away[1])
                return NOT_AUTHORIZED
        claim_id = self._claim_of.get(nonce)
        if claim_id is None:
            return NOT_AUTHORIZED
        device = request.device
        try:
            cn = self._cert_cn.get(nonce)
            if cn is not None and device != cn:
                raise ValueError(f"with a claim CA's certificate the device id is its CN ({cn!r}), not {device!r}")
            self._check_id(device)
            store = self.worker.store
            record = store.claim_record(claim_id)
            refused = record.refusal(time.time()) if record is not None else ClaimRefused("revoked", "no such claim")
            claimed = store.nonce_used(nonce)
            if claimed is not None:  # asked again: the answer was lost, if its device never connected
                if claimed != device or not self._never_connected(device):
                    raise ClaimRefused("replay", "this nonce claimed before: use a new one")
                if refused is not None and refused.reason == "revoked":
                    raise refused
                self._answering.add(nonce)
                self._spawn(self._reclaim(claim_id, nonce, device, request.secret))
                return 0
            if refused is None and record is not None and record.used + self._in_flight.get(claim_id, 0) >= record.uses:
                refused = ClaimRefused("used_up", f"claim {record.name} is used up ({record.uses} devices)")
            if refused is None and store.has_device(device):
                refused = ClaimRefused("duplicate_device", f"device {device!r} already exists")
            if refused is not None:
                raise refused
        except ClaimRefused as exc:
            self._refused(exc.reason, claim_id, nonce)
            self._answer(nonce, ok=False, code=exc.reason, message=str(exc))
            return NOT_AUTHORIZED
        except (HengeError, ValueError) as exc:
            self._refused("invalid", claim_id, nonce)
            self._answer(nonce, ok=False, code="invalid", message=str(exc))
            return PAYLOAD_FORMAT_INVALID
        self._answering.add(nonce)
        self._in_flight[claim_id] = self._in_flight.get(claim_id, 0) + 1
        self._spawn(self._claim(claim_id, nonce, device, request.extra, request.secret))
        return 0

    @staticmethod
    def _parse(payload: bytes) -> ClaimRequest:
        if len(payload) > MAX_REQUEST_BYTES:
            raise ValueError(f"a claim request is at most {MAX_REQUEST_BYTES} bytes")
        try:
            body = strict_json(payload.decode("utf-8"))
        except (UnicodeDecodeError, StrictJSONError, ValueError) as exc:
            raise ValueError(f"not strict JSON: {exc}") from None
        if not isinstance(body, dict) or not set(body) <= REQUEST_FIELDS or not {"device", "serial"} & set(body):
            raise ValueError('give {"device": ID} or {"serial": SERIAL} (or both), and optionally secret, claim '
                             "and claim_secret; nothing else")
        if not all(isinstance(value, str) for value in body.values()):
            raise ValueError(", ".join(sorted(body)) + ": strings")
        device, serial = body.get("device"), body.get("serial")
        chosen = device if device is not None else serial
        assert isinstance(chosen, str)
        problem = device_id_problem(chosen)
        if problem:
            raise ValueError(problem + (" (a serial without a device id becomes the id)" if device is None else ""))
        if serial is not None and (not serial or len(serial) > 128):
            raise ValueError("serial: 1-128 characters")
        secret = body.get("secret")
        if secret is not None and not PROPOSED_SECRET.fullmatch(secret):
            raise ValueError("secret: 22-128 random characters of A-Z a-z 0-9 . _ ~ + / = - (e.g. 24 random bytes "
                             "in base64url)")
        return ClaimRequest(chosen, {"serial": serial} if serial is not None else {}, secret, body.get("claim"),
                            body.get("claim_secret"))

    async def _claim(self, claim_id: str, nonce: str, device: str, extra: dict[str, str], chosen: str | None) -> None:
        layered: list[ConfigVersion] = []
        try:
            secret, labels = await self.worker.run(self.worker.store.claim_device, claim_id, nonce, device, extra,
                                                   layered, chosen)
        except HengeError as exc:  # refused in the transaction (a race the loop's checks lost), or a schema
            reason = exc.reason if isinstance(exc, ClaimRefused) else exc.code
            self._refused(reason, claim_id, nonce)
            self._answer(nonce, ok=False, code=reason, message=str(exc))
            return
        else:
            record = self.worker.store.claim_record(claim_id)
            if record is not None:  # counted as used in the same step as it stops being in flight
                record.used += 1
        finally:
            self._answering.discard(nonce)
            self._in_flight[claim_id] -= 1
            if not self._in_flight[claim_id]:
                del self._in_flight[claim_id]
        self._claim_of.pop(nonce, None)
        self._cert_cn.pop(nonce, None)
        self.events.count("claims")
        self.events.emit("device_claimed", device, claim=claim_id, labels=labels)
        log.info("claim.device device=%s claim=%s", device, claim_id)
        if self._tell_broker is not None:  # the broker knows the device before the device hears it may connect
            await self._tell_broker(device, secret)
        self._answer(nonce, ok=True, device=device, labels=labels,
                     **({} if chosen else {"secret": secret}))
        await self._publish_rows(layered)

    def _never_connected(self, device: str) -> bool:
        return self.broker.session(device, time.time()).epoch == 0

    async def _reclaim(self, claim_id: str, nonce: str, device: str, chosen: str | None) -> None:
        try:
            secret = await self.worker.run(self.worker.store.reclaim_device, nonce, device, chosen,
                                           keep=self.external)
        except ClaimRefused as exc:
            self._refused(exc.reason, claim_id, nonce)
            self._answer(nonce, ok=False, code=exc.reason, message=str(exc))
            return
        finally:
            self._answering.discard(nonce)
        labels = (await self.worker.run(self.worker.store.labels_of, device))
        log.info("claim.again device=%s claim=%s: its first answer was lost", device, claim_id)
        if self._tell_broker is not None:  # (the broker may have missed it the first time)
            await self._tell_broker(device, secret)
        self._answer(nonce, ok=True, device=device, labels=labels, **({} if chosen else {"secret": secret}))

    def _answer(self, nonce: str, *, ok: bool, **fields: Any) -> None:
        body = {"ok": ok, **fields}
        self.broker.publish(self.topics.claim_response(nonce), json.dumps(body).encode(), qos=1)

    def _refused(self, reason: str, claim_id: str, nonce: str) -> None:
        self.events.count("claims_refused")
        self.events.emit("claim_refused", None, claim=claim_id, reason=reason)
        self._log.log(logging.WARNING, "claim.refused", "claim=%s nonce=%s reason=%s", claim_id, nonce[:8], reason)

