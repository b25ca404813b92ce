"""Device ids and labels: the syntax every layer checks, with no dependency at all.

Kept apart from the pydantic models so that the CLI can check its arguments without paying for
pydantic at start-up (a CLI call is measured in the fleet-push benchmark).
"""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def is_valid_device_id(value: str) -> bool:
    return bool(_DEVICE_ID_RE.fullmatch(value))


def device_id_problem(value: str) -> str | None:
    """Why ``value`` is not a device id, in words a person can act on (None when it is one)."""
    if is_valid_device_id(value):
        return None
    return (
        f"invalid device id {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit"
    )


def labels_tag(labels: dict[str, str]) -> str:
    """A short tag of a device's labels as they are (the HTTP API's ETag for them): an edit that
    began from other labels is refused (If-Match), never written over them."""
    import hashlib
    import json

    text = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; raises ValueError naming the bad pair."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _LABEL_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid label {pair!r}: expected key=value with a simple key")
        labels[key] = value
    return labels


class StrictJSONError(ValueError):
    """A config document that is not strict JSON: ``pointer`` says where (RFC 6901)."""


def strict_json(text: str) -> object:
    """JSON as RFC 8259 means it: NaN, Infinity and duplicate keys are refused, naming where.

    ``json.loads`` accepts ``NaN`` (stored as null elsewhere) and keeps the last of duplicate keys;
    a config that says something twice says nothing reliable.
    """
    import json

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in items:
            if key in result:
                raise StrictJSONError(f"duplicate key {key!r}")
            result[key] = value
        return result

    def constant(name: str) -> object:
        raise StrictJSONError(f"{name} is not a JSON number")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
