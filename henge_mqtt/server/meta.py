"""What a message keeps of its 5.0 properties, once, for every subscriber and every later delivery.

A message that never expires (the common case: a snapshot's content type and version) keeps its
property section encoded, shared between messages with the same one; one with a Message Expiry
Interval keeps a :class:`Meta`, which encodes what is left of its interval at each delivery (a
retained message, or one waiting in a session, is dropped once it expired [MQTT-3.3.2-5]).
"""

from __future__ import annotations

from .. import codec

# The 5.0 properties a forwarded message keeps [MQTT-3.3.2-*]; the rest are per hop.
FORWARDED = (codec.PAYLOAD_FORMAT_INDICATOR, codec.CONTENT_TYPE, codec.RESPONSE_TOPIC, codec.CORRELATION_DATA,
             codec.USER_PROPERTY)


class Meta:
    """A message's 5.0 side: properties to forward and when it expires (None: never)."""

    __slots__ = ("expires", "props")

    def __init__(self, props: codec.Props | None, expires: float | None) -> None:
        self.props = props
        self.expires = expires

    def encoded(self, now: float) -> bytes | None:
        """The property section for a 5.0 subscriber now; None once the message expired."""
        props = dict(self.props or {})
        if self.expires is not None:
            left = int(self.expires - now + 0.999)
            if left <= 0:
                return None
            props[codec.MESSAGE_EXPIRY_INTERVAL] = left
        return codec.encode_props(props)


# Properties many messages share -> (their body, the whole section: its length, then the body).
_SHARED_PROPS: dict[tuple[tuple[int, object], ...], tuple[bytes, bytes]] = {}
# Whole sections with user properties, by their content: a fleet push's snapshots mostly share their
# version and digest too, so 10,000 deliveries encode one section (and keep one). Emptied when full.
_WITH_USERS: dict[tuple[bytes, tuple[tuple[str, str], ...]], bytes] = {}
_MAX_WITH_USERS = 256
# The last properties seen and their section: the service passes one props object per version and
# digest (props are never changed once published), so a fleet push's 10,000 snapshots look it up once.
_last: tuple[object, bytes | None] = (None, None)


def meta_of(props: codec.Props | None, now: float) -> bytes | Meta | None:
    """What a message keeps of its 5.0 properties: encoded bytes when it never expires (the common
    case: a snapshot's content type and version), a :class:`Meta` when its expiry must count down."""
    global _last
    if not props:
        return None
    if props is _last[0]:
        return _last[1]
    meta = _meta_of(props, now)
    if not isinstance(meta, Meta):
        _last = (props, meta)
    return meta


def _meta_of(props: codec.Props, now: float) -> bytes | Meta | None:
    kept = {k: v for k, v in props.items() if k in FORWARDED}
    expiry = props.get(codec.MESSAGE_EXPIRY_INTERVAL)
    if isinstance(expiry, int):  # a stored message stops at 0 [MQTT-3.3.2-5]
        return Meta(kept or None, now + expiry)
    if not kept:
        return None
    users = kept.pop(codec.USER_PROPERTY, None)
    key = tuple(sorted(kept.items()))
    shared = _SHARED_PROPS.get(key)  # e.g. every presence record's: one bytes object for the fleet
    if shared is None:
        body = codec.props_body(kept)
        shared = (body, codec.encode_length(len(body)) + body)
        if len(_SHARED_PROPS) < 64:
            _SHARED_PROPS[key] = shared
    if not users:
        return shared[1]
    # A snapshot's own user properties (its version and digest) after the shared part.
    pairs = tuple((str(name), str(text)) for name, text in users)  # type: ignore[attr-defined]
    section = _WITH_USERS.get((shared[0], pairs))
    if section is None:
        body = shared[0] + codec.props_body({codec.USER_PROPERTY: list(pairs)})
        section = codec.encode_length(len(body)) + body
        if len(_WITH_USERS) >= _MAX_WITH_USERS:
            _WITH_USERS.clear()
        _WITH_USERS[(shared[0], pairs)] = section
    return section


# (topic, payload, retain, encoded 5.0 properties): a delivery as it was sent
Sent = tuple[str, bytes, bool, "bytes | None"]
