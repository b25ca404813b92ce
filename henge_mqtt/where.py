"""``--where``: a small filter language over what henge knows of a device (docs/where.md).

    reported.fw < "2.4" and labels.site in ["berlin", "paris"]
    not reported.battery exists or (state == "online" and sync != "in_sync")

Grammar (EBNF; keywords are lower case, whitespace is free)::

    expr     = term { "or" term }
    term     = factor { "and" factor }
    factor   = "not" factor | "(" expr ")" | test
    test     = field ( "exists" | ["not"] "in" list | op value )
    op       = "==" | "=" | "!=" | "<" | "<=" | ">" | ">="
    list     = "[" value { "," value } "]"
    value    = string | number | "true" | "false" | "null"
    field    = root { "." name }
    name     = letters, digits, "_", "-" (not starting with a digit or "-"), or a "quoted" string

Parsed by hand into a tree of frozen dataclasses and evaluated against a device's fields; never
``eval``, no regular expressions over user text, every size bounded (the text, nesting, 64
tests, list length; a list is one set lookup), so a filter from the network costs at most a few
microseconds per device.

Comparisons are typed: a number with a number, a string with a string, never across (``"5" < 7``
is false, not an error). Two strings that are both dotted numbers (``2.10``, ``2.4.1``) compare as
versions, number by number (``"2.10" > "2.4"``); other strings compare by code point. A field a
device does not have makes every test on it false (``!=`` and ``not in`` included): ask with
``exists``, or negate a whole test (``not reported.fw == "2.4"`` is true for a device with no fw).

Pure: nothing of henge is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_LENGTH = 2048
MAX_DEPTH = 32
MAX_LIST = 1000
MAX_TESTS = 64  # tests in one filter: what one device costs is bounded, whatever the text

# The roots a field may start with, and whether names follow it (``labels.site``) or not (``id``).
ROOTS: dict[str, bool] = {"id": False, "labels": True, "reported": True, "state": False, "sync": False,
                          "online": False, "version": False, "applied_version": False}
# What a standing target may use (a layer's or a rollout's): what the device is, not how it is now.
STANDING_ROOTS = frozenset({"id", "labels", "reported"})

_OPS = ("==", "!=", "<=", ">=", "<", ">", "=")
_KEYWORDS = frozenset({"and", "or", "not", "in", "exists", "true", "false", "null"})


class WhereError(ValueError):
    """A filter that does not parse, or asks for a field this use does not allow: says where."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message if position is None else f"{message} at column {position + 1}")
        self.position = position


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
Lookup = Callable[[tuple[str, ...]], Any]


# ---- the tree ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare:
    field: tuple[str, ...]
    op: str  # one of _OPS, "=" made "=="
    value: Any

    def test(self, get: Lookup) -> bool:
        have = get(self.field)
        return have is not MISSING and _compare(have, self.op, self.value)


def _key(value: Any) -> tuple[str, Any] | None:
    """A value as ``in`` looks it up: typed (1 and 1.0 are one number; true is not 1), or None
    for an object or a list (never in a list of values)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z", None)
    return None


@dataclass(frozen=True, slots=True)
class In:
    field: tuple[str, ...]
    values: frozenset[tuple[str, Any]]  # as _key makes them: one lookup, however long the list
    negated: bool

    def test(self, get: Lookup) -> bool:
        have = get(self.field)
        if have is MISSING:
            return False
        key = _key(have)
        return (key is not None and key in self.values) != self.negated


@dataclass(frozen=True, slots=True)
class Exists:
    field: tuple[str, ...]

    def test(self, get: Lookup) -> bool:
        return get(self.field) is not MISSING


@dataclass(frozen=True, slots=True)
class Not:
    inner: Node

    def test(self, get: Lookup) -> bool:
        return not self.inner.test(get)


@dataclass(frozen=True, slots=True)
class All:
    parts: tuple[Node, ...]

    def test(self, get: Lookup) -> bool:
        return all(p.test(get) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Any_:
    parts: tuple[Node, ...]

    def test(self, get: Lookup) -> bool:
        return any(p.test(get) for p in self.parts)


Node = Compare | In | Exists | Not | All | Any_


@dataclass(frozen=True, slots=True)
class Where:
    """A parsed filter: ``matches(fields)`` for one device; ``roots``: what it reads."""

    text: str
    tree: Node
    roots: frozenset[str]

    def matches(self, fields: Mapping[str, Any]) -> bool:
        """``fields``: the roots (``{"id": ..., "labels": {...}, "reported": {...}, ...}``)."""

        def get(path: tuple[str, ...]) -> Any:
            value: Any = fields.get(path[0], MISSING)
            for name in path[1:]:
                if not isinstance(value, dict):
                    return MISSING
                value = value.get(name, MISSING)
            return value

        return self.tree.test(get)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _version(text: str) -> tuple[int, ...] | None:
    parts = text.split(".")
    if all(p.isascii() and p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return None


def _compare(have: Any, op: str, want: Any) -> bool:
    if op in ("==", "!="):
        numbers = _is_number(have) and _is_number(want)
        same = bool(have == want) and (numbers or type(have) is type(want))
        return same if op == "==" else not same
    if _is_number(have) and _is_number(want):
        a, b = have, want
    elif isinstance(have, str) and isinstance(want, str):
        va, vb = _version(have), _version(want)
        a, b = (va, vb) if va is not None and vb is not None else (have, want)
    else:
        return False
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


# ---- parsing -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # name, string, number, op, punct, end
    text: str
    value: Any
    pos: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        start = i
        if ch in "()[],.":
            out.append(_Token("punct", ch, None, i))
            i += 1
        elif ch in "=!<>":
            op = next((o for o in _OPS if text.startswith(o, i)), None)
            if op is None:
                raise WhereError(f"unknown operator {ch!r}", i)
            out.append(_Token("op", op, None, i))
            i += len(op)
        elif ch in "\"'":
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise WhereError("a string is not closed", start)
                c = text[i]
                if c == ch:
                    i += 1
                    break
                if c == "\\" and i + 1 < n:
                    escaped = text[i + 1]
                    chars.append({"n": "\n", "t": "\t"}.get(escaped, escaped))
                    i += 2
                    continue
                chars.append(c)
                i += 1
            out.append(_Token("string", text[start:i], "".join(chars), start))
        elif ch in "0123456789" or (ch == "-" and text[i + 1:i + 2] in tuple("0123456789")):
            i = _number_end(text, i)
            literal = text[start:i]
            if i < n and (text[i].isalnum() or text[i] in "._"):
                word = text[start:i] + "".join(c for c in text[i:i + 32].split()[0] if c.isalnum() or c in "._-")
                raise WhereError(f"{word} is not a number: quote strings and versions (\"{word}\")", start)
            value: Any = float(literal) if any(c in literal for c in ".eE") else int(literal)
            if not math.isfinite(value):
                raise WhereError(f"not a finite number: {literal!r}", start)
            out.append(_Token("number", literal, value, start))
        elif ch.isalpha() or ch == "_":
            i += 1
            while i < n and (text[i].isalnum() or text[i] in "_-"):
                i += 1
            out.append(_Token("name", text[start:i], None, start))
        else:
            raise WhereError(f"unexpected {ch!r}", i)
    out.append(_Token("end", "", None, n))
    return out


def _number_end(text: str, i: int) -> int:
    """Where the JSON number starting at ``i`` ends (``-``, digits, ``.digits``, an exponent)."""
    digits = "0123456789"

    def run(j: int) -> int:
        start = j
        while j < len(text) and text[j] in digits:
            j += 1
        if j == start:
            raise WhereError("a number needs digits", j)
        return j

    if text[i] == "-":
        i += 1
    i = run(i)
    if text[i:i + 1] == ".":
        i = run(i + 1)
    if text[i:i + 1] in ("e", "E"):
        i += 1
        if text[i:i + 1] in ("+", "-"):
            i += 1
        i = run(i)
    return i


class _Parser:
    def __init__(self, text: str, allowed: frozenset[str] | None) -> None:
        self.tokens = _tokens(text)
        self.i = 0
        self.depth = 0
        self.allowed = allowed
        self.roots: set[str] = set()
        self.tests = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        if self.tok.kind == "name" and self.tok.text == word:
            self.i += 1
            return True
        return False

    def expect(self, text: str, what: str) -> None:
        if self.tok.kind != "punct" or self.tok.text != text:
            raise WhereError(f"expected {what}, found {self._found()}", self.tok.pos)
        self.i += 1

    def _found(self) -> str:
        return "the end" if self.tok.kind == "end" else repr(self.tok.text)

    def parse(self) -> Node:
        node = self.expr()
        if self.tok.kind != "end":
            raise WhereError(f"expected and, or or the end, found {self._found()}", self.tok.pos)
        return node

    def expr(self) -> Node:
        parts = [self.term()]
        while self.keyword("or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Any_(tuple(parts))

    def term(self) -> Node:
        parts = [self.factor()]
        while self.keyword("and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def factor(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise WhereError(f"nested more than {MAX_DEPTH} deep", self.tok.pos)
        try:
            if self.keyword("not"):
                return Not(self.factor())
            if self.tok.kind == "punct" and self.tok.text == "(":
                self.i += 1
                node = self.expr()
                self.expect(")", "')'")
                return node
            return self.test()
        finally:
            self.depth -= 1

    def test(self) -> Node:
        field = self.field()
        if self.keyword("exists"):
            return self.counted(Exists(field))
        negated = self.keyword("not")
        if self.keyword("in"):
            return self.counted(In(field, frozenset(k for k in map(_key, self.list()) if k is not None), negated))
        if negated:
            raise WhereError(f"expected in after not, found {self._found()}", self.tok.pos)
        if self.tok.kind != "op":
            raise WhereError(f"expected an operator (== != < <= > >= in exists), found {self._found()}",
                             self.tok.pos)
        op = self.take().text
        return self.counted(Compare(field, "==" if op == "=" else op, self.value()))

    def counted(self, node: Node) -> Node:
        self.tests += 1
        if self.tests > MAX_TESTS:
            raise WhereError(f"more than {MAX_TESTS} tests in one filter (use in [...] for many values)",
                             self.tok.pos)
        return node

    def field(self) -> tuple[str, ...]:
        tok = self.tok
        if tok.kind != "name" or tok.text in _KEYWORDS:
            raise WhereError(f"expected a field (id, labels.NAME, reported.PATH, state, sync, ...), found "
                             f"{self._found()}", tok.pos)
        root = self.take().text
        if root not in ROOTS:
            raise WhereError(f"unknown field {root!r} (fields: {', '.join(ROOTS)})", tok.pos)
        if self.allowed is not None and root not in self.allowed:
            raise WhereError(f"{root} cannot be used here (only {', '.join(sorted(self.allowed))}: what a "
                             "device is, not how it is now)", tok.pos)
        self.roots.add(root)
        path = [root]
        while self.tok.kind == "punct" and self.tok.text == ".":
            self.i += 1
            name = self.tok
            if name.kind == "name" or (name.kind == "string" and name.value):
                self.i += 1
                path.append(name.value if name.kind == "string" else name.text)
            else:
                raise WhereError(f"expected a name after '.', found {self._found()}", name.pos)
        if ROOTS[root] and len(path) == 1:
            raise WhereError(f"{root} needs a name: {root}.NAME", tok.pos)
        if not ROOTS[root] and len(path) > 1:
            raise WhereError(f"{root} has no members", tok.pos)
        return tuple(path)

    def list(self) -> tuple[Any, ...]:
        self.expect("[", "'[' to start a list")
        values = [self.value()]
        while self.tok.kind == "punct" and self.tok.text == ",":
            self.i += 1
            values.append(self.value())
            if len(values) > MAX_LIST:
                raise WhereError(f"a list of more than {MAX_LIST} values", self.tok.pos)
        self.expect("]", "',' or ']'")
        return tuple(values)

    def value(self) -> Any:
        tok = self.take()
        if tok.kind in ("string", "number"):
            return tok.value
        if tok.kind == "name" and tok.text in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[tok.text]
        if tok.kind == "name":
            raise WhereError(f"expected a value, found {tok.text!r} (quote strings: \"{tok.text}\")", tok.pos)
        self.i -= 1
        raise WhereError(f"expected a value, found {self._found()}", tok.pos)


def parse(text: str, *, allowed: frozenset[str] | None = None) -> Where:
    """The filter ``text`` says; ``allowed``: the roots this use may read (None: all of them).
    Raises :class:`WhereError`, naming the column."""
    if len(text) > MAX_LENGTH:
        raise WhereError(f"longer than {MAX_LENGTH} characters")
    if not text.strip():
        raise WhereError("empty")
    parser = _Parser(text, allowed)
    tree = parser.parse()
    return Where(text, tree, frozenset(parser.roots))
