"""Who receives a PUBLISH, and which retained messages a new subscription gets.

Exact filters (almost every device subscribes to its own config topic) live in one dict: a
publish finds them with one lookup. Wildcard filters live in a topic tree, so a publish walks
only the branches its own levels name, plus the ``+`` and ``#`` branches on the way: its cost is
the filters that could match it, not the number of filters in the fleet. Retained messages are
kept in a dict plus their topics in order (in blocks), so a wildcard subscription reads only the
topics under its literal prefix (``henge/devices/d1/#`` reads d1's topics, not the fleet's).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic matching, including the rule that wildcards never match ``$`` topics."""
    if topic_filter == topic:
        return True
    if not is_wildcard(topic_filter):
        return False
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class _Node(Generic[S]):
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] | None = None
        self.subs: dict[S, int] | None = None


class SubscriptionIndex(Generic[S]):
    """Subscribers (any hashable: a connection) per filter, with their granted QoS.

    An exact filter with one subscriber (a device and its config topic: nearly all of them) is kept
    as a ``(subscriber, qos)`` pair, not a dict: about 170 bytes less per connected device.
    """

    def __init__(self) -> None:
        self._exact: dict[str, tuple[S, int] | dict[S, int]] = {}
        self._root: _Node[S] = _Node()
        self._count = 0

    def add(self, sub: S, topic_filter: str, qos: int) -> None:
        if is_wildcard(topic_filter):
            node = self._root
            for level in topic_filter.split("/"):
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
            if node.subs is None:
                node.subs = {}
            subs = node.subs
        else:
            found = self._exact.get(topic_filter)
            if found is None:
                self._exact[topic_filter] = (sub, qos)
                self._count += 1
                return
            if isinstance(found, tuple):
                if found[0] == sub:
                    self._exact[topic_filter] = (sub, qos)
                    return
                found = self._exact[topic_filter] = {found[0]: found[1]}
            subs = found
        if sub not in subs:
            self._count += 1
        subs[sub] = qos

    def remove(self, sub: S, topic_filter: str) -> None:
        if not is_wildcard(topic_filter):
            found = self._exact.get(topic_filter)
            if isinstance(found, tuple):
                if found[0] == sub:
                    del self._exact[topic_filter]
                    self._count -= 1
            elif found is not None and found.pop(sub, None) is not None:
                self._count -= 1
                if len(found) == 1:
                    ((other, qos),) = found.items()
                    self._exact[topic_filter] = (other, qos)
                elif not found:
                    del self._exact[topic_filter]
            return
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level) if node.children else None
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.subs is None or node.subs.pop(sub, None) is None:
            return
        self._count -= 1
        if not node.subs:
            node.subs = None
        for parent, level in reversed(path):  # prune branches nobody subscribes under any more
            child = parent.children[level] if parent.children else None
            if child is None or child.subs or child.children:
                break
            assert parent.children is not None
            del parent.children[level]
            if not parent.children:
                parent.children = None

    def match(self, topic: str) -> dict[S, int]:
        """Each subscriber of ``topic`` once, with the highest QoS any of its filters granted."""
        exact = self._exact.get(topic)
        found: dict[S, int]
        if exact is None:
            found = {}
        elif isinstance(exact, tuple):
            found = {exact[0]: exact[1]}
        else:
            found = dict(exact)
        root = self._root
        if root.children is None:
            return found
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(root, levels, 0, found, dollar)
        return found

    def _walk(self, node: _Node[S], levels: list[str], i: int, found: dict[S, int], dollar: bool) -> None:
        children = node.children
        if children is None:
            return
        hash_node = children.get("#")
        if hash_node is not None and hash_node.subs and not (dollar and i == 0):
            _merge(found, hash_node.subs)  # '#' also matches the parent level [MQTT-4.7.1-2]
        if i == len(levels):
            return
        level = levels[i]
        last = i + 1 == len(levels)
        for child in (children.get(level), None if dollar and i == 0 else children.get("+")):
            if child is None:
                continue
            if last and child.subs:
                _merge(found, child.subs)
            if child.children is not None:
                self._walk(child, levels, i + 1, found, dollar)

    def __len__(self) -> int:
        return self._count


def _merge(found: dict[S, int], subs: dict[S, int]) -> None:
    """One subscriber matched by several filters: the highest QoS (bits 0-1), any option flag set."""
    for sub, options in subs.items():
        old = found.get(sub)
        found[sub] = options if old is None else max(old & 3, options & 3) | ((old | options) & ~3)


class _SortedTopics:
    """Topics in order, as blocks of at most ``2 * block`` (the layout of ``sortedcontainers``):
    a new topic moves the pointers of one block, not of half the fleet's topics (a flat list did:
    4 us a topic at 20,000, 40 ms of a 10,000-device fleet's first push).

    New topics wait in a set until a prefix is asked for or ``pending`` of them are waiting, then go
    in together: one sort of the whole (two sorted runs, which the sort merges) instead of a
    bisection and a block's pointers moved per topic. A fleet's first push makes a topic per device,
    and the order is needed only by a wildcard subscription's retained messages."""

    __slots__ = ("_block", "_blocks", "_few", "_lasts", "_new", "_pending")

    def __init__(self, block: int = 1000, pending: int = 4096) -> None:
        self._block = block
        self._blocks: list[list[str]] = []
        self._lasts: list[str] = []  # each block's last topic
        self._new: set[str] = set()  # added, not yet in the blocks
        self._pending = pending
        self._few = min(32, pending // 2)  # up to this many go in one by one

    def add(self, topic: str) -> None:
        self._new.add(topic)
        if len(self._new) >= self._pending:
            self._settle()

    def _settle(self) -> None:
        """The waiting topics into the blocks: one by one if they are few, else all blocks rebuilt."""
        new, self._new = self._new, set()
        if len(new) <= self._few:
            for topic in new:
                self._insert(topic)
            return
        topics = [topic for block in self._blocks for topic in block]
        topics += new
        topics.sort()
        size = self._block
        self._blocks = [topics[i:i + size] for i in range(0, len(topics), size)]
        self._lasts = [block[-1] for block in self._blocks]

    def _insert(self, topic: str) -> None:
        if not self._blocks:
            self._blocks.append([topic])
            self._lasts.append(topic)
            return
        i = min(bisect.bisect_left(self._lasts, topic), len(self._lasts) - 1)
        block = self._blocks[i]
        bisect.insort(block, topic)
        self._lasts[i] = block[-1]
        if len(block) > 2 * self._block:
            half = len(block) // 2
            self._blocks[i:i + 1] = [block[:half], block[half:]]
            self._lasts[i:i + 1] = [block[half - 1], block[-1]]

    def remove(self, topic: str) -> None:
        if topic in self._new:
            self._new.discard(topic)
            return
        i = bisect.bisect_left(self._lasts, topic)
        block = self._blocks[i]
        del block[bisect.bisect_left(block, topic)]
        if block:
            self._lasts[i] = block[-1]
        else:
            del self._blocks[i], self._lasts[i]

    def starting_with(self, prefix: str) -> Iterator[str]:
        """Every topic that starts with ``prefix``, in order (of those added before the call)."""
        if self._new:
            self._settle()
        i = bisect.bisect_left(self._lasts, prefix)
        for k in range(i, len(self._blocks)):
            block = self._blocks[k]
            for j in range(bisect.bisect_left(block, prefix) if k == i else 0, len(block)):
                if not block[j].startswith(prefix):
                    return
                yield block[j]


class RetainedStore:
    """The last retained message of each topic; an empty payload clears it [MQTT-3.3.1-10, -11].

    Each message is ``(payload, qos, extra)``; ``extra`` is the broker's (5.0 properties, expiry),
    None for nearly all of them.
    """

    def __init__(self, *, block: int = 1000, pending: int = 4096) -> None:
        self._messages: dict[str, tuple[bytes, int, object]] = {}
        self._sorted = _SortedTopics(block, pending)

    def set(self, topic: str, data: bytes, qos: int, extra: object = None) -> None:
        if not data:
            self.clear(topic)
            return
        if topic not in self._messages:
            self._sorted.add(topic)
        self._messages[topic] = (data, qos, extra)

    def clear(self, topic: str) -> None:
        if self._messages.pop(topic, None) is not None:
            self._sorted.remove(topic)

    def get(self, topic: str) -> tuple[bytes, int, object] | None:
        return self._messages.get(topic)

    def matching(self, topic_filter: str) -> Iterator[tuple[str, bytes, int, object]]:
        if not is_wildcard(topic_filter):
            found = self._messages.get(topic_filter)
            if found is not None:
                yield topic_filter, found[0], found[1], found[2]
            return
        cut = min(i for i in (topic_filter.find("+"), topic_filter.find("#")) if i >= 0)
        prefix = topic_filter[:cut]
        parent = prefix[:-1] if topic_filter.endswith("/#") and cut == len(topic_filter) - 1 else None
        if parent is not None and parent in self._messages:  # 'a/#' matches 'a' itself
            data, qos, extra = self._messages[parent]
            yield parent, data, qos, extra
        for topic in self._sorted.starting_with(prefix):
            if filter_matches(topic_filter, topic):
                data, qos, extra = self._messages[topic]
                yield topic, data, qos, extra

    def __len__(self) -> int:
        return len(self._messages)
