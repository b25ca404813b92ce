"""``--json`` output as people and ``jq`` read it: ``json.dumps(value, indent=2, sort_keys=True)``,
byte for byte, in 52-62% of its time on a large answer (``python bench/json_output.py``).

With ``indent`` the standard library leaves its C encoder for its pure-Python one, a generator per
container: the answer of ``henge push --all --json`` on 10,000 devices (an entry per device) took
46-49 ms to write on a fast hour of this machine (113 on a slow one), ``henge status -o json`` of
10,000 devices 110-115 ms (262); here 24-30 and 69 (67 and 161). One recursive function
writes the containers, each scalar is written in place (its type looked up once, strings through
the C escaper the standard encoder uses itself), and pieces are joined once. A value of a type
other than JSON's own (dict, list, tuple, str, int, float, bool, None; subclasses included) or a
key that is not a string is handed to ``json.dumps`` with the whole document, so the output is
always the standard library's; ``tests/test_cli.py`` checks that on generated documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

__all__ = ["dumps"]

_INF = float("inf")
_string: Callable[[str], str] = encode_basestring_ascii


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == _INF:
        return "Infinity"
    if value == -_INF:
        return "-Infinity"
    return float.__repr__(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _null(value: None) -> str:
    return "null"


_SCALARS: dict[type, Callable[[Any], str]] = {str: _string, int: int.__repr__, float: _float, bool: _bool,
                                              type(None): _null}


class _Other(Exception):
    """A value this module does not write itself: the standard library writes the whole document."""


def dumps(value: Any) -> str:
    """``json.dumps(value, indent=2, sort_keys=True)``."""
    out: list[str] = []
    append = out.append
    scalar = _SCALARS.get
    string = _string

    def write(item: Any, newline: str) -> None:
        kind = type(item)
        inner = newline + "  "
        separator = "," + inner
        if kind is dict:
            if not item:
                append("{}")
                return
            try:
                keys = sorted(item)
            except TypeError:
                raise _Other from None
            append("{")
            first = True
            for key in keys:
                if type(key) is not str:
                    raise _Other  # json writes int, float, bool and None keys as strings its own way
                element = item[key]
                head = (inner if first else separator) + string(key) + ": "
                first = False
                encode = scalar(type(element))
                if encode is not None:
                    append(head + encode(element))
                else:
                    append(head)
                    write(element, inner)
            append(newline + "}")
        elif kind is list or kind is tuple:
            # The element loop again, as for a dict's: one loop over (label, value) pairs for both
            # made the answer of a 10,000-device push 1.5x slower to write (bench/json_output.py).
            if not item:
                append("[]")
                return
            append("[")
            first = True
            for element in item:
                head = inner if first else separator
                first = False
                encode = scalar(type(element))
                if encode is not None:
                    append(head + encode(element))
                else:
                    append(head)
                    write(element, inner)
            append(newline + "]")
        else:
            encode = scalar(kind)
            if encode is None:
                raise _Other
            append(encode(item))

    try:
        write(value, "\n")
    except (_Other, RecursionError):
        return json.dumps(value, indent=2, sort_keys=True)
    return "".join(out)
