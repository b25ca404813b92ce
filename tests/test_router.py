"""Routing against the definition: the topic tree finds exactly the filters that match, and the
retained store exactly the topics a filter matches, for any topics and filters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from henge_mqtt.server.router import RetainedStore, SubscriptionIndex, filter_matches, valid_filter

level = st.sampled_from(["a", "b", "c", "", "$s", "dev1", "x y"])
topics = st.lists(level, min_size=1, max_size=4).map("/".join).filter(bool)
filters = st.lists(st.sampled_from(["a", "b", "", "+", "$s", "dev1"]), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"]), "#"])
).filter(valid_filter)


@given(st.lists(st.tuples(st.integers(0, 5), filters, st.integers(0, 1)), max_size=25),
       st.lists(st.tuples(st.integers(0, 5), filters), max_size=8), topics)
def test_index_matches_exactly_the_matching_filters(
    adds: list[tuple[int, str, int]], removes: list[tuple[int, str]], topic: str
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    model: dict[tuple[int, str], int] = {}
    for sub, topic_filter, q in adds:
        index.add(sub, topic_filter, q)
        model[(sub, topic_filter)] = q
    for sub, topic_filter in removes:
        index.remove(sub, topic_filter)
        model.pop((sub, topic_filter), None)
    expected: dict[int, int] = {}
    for (sub, topic_filter), q in model.items():
        if filter_matches(topic_filter, topic):
            expected[sub] = max(q, expected.get(sub, -1))
    assert index.match(topic) == expected
    assert len(index) == len(model)


def test_removing_every_filter_prunes_the_tree() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for i in range(100):
        index.add(f"d{i}", f"henge/devices/d{i}/#", 1)
    for i in range(100):
        index.remove(f"d{i}", f"henge/devices/d{i}/#")
    assert len(index) == 0 and index._root.children is None


@given(st.lists(st.tuples(topics, st.binary(max_size=3), st.booleans()), max_size=90), filters,
       st.sampled_from([1, 2, 1000]), st.sampled_from([1, 5, 40, 4096]))
def test_retained_matching_is_exact(writes: list[tuple[str, bytes, bool]], topic_filter: str, block: int,
                                    pending: int) -> None:
    """Small blocks: the topics' order kept across splits and emptied blocks. New topics go into the
    order when ``pending`` of them wait or a wildcard asks (here after any write drawn with ``ask``,
    and at the end): one by one if few wait (at most half of ``pending``, and 32), else all blocks
    rebuilt."""
    store = RetainedStore(block=block, pending=pending)
    model: dict[str, bytes] = {}

    def check() -> None:
        found = {t: d for t, d, _, _ in store.matching(topic_filter)}
        assert found == {t: d for t, d in model.items() if filter_matches(topic_filter, t)}

    for topic, data, ask in writes:
        store.set(topic, data, 1)
        if data:
            model[topic] = data
        else:
            model.pop(topic, None)
        if ask:
            check()
    check()
    assert len(store) == len(model)


def test_a_fleets_new_topics_settle_in_order() -> None:
    """20,000 new topics (a fleet's first push beside its presence topics), then a wildcard: every
    one found, in order, in blocks of at most twice the block size."""
    store = RetainedStore(block=1000)
    for i in range(10_000):
        store.set(f"henge/devices/dev{i:05}/presence", b"p", 1)
    for i in reversed(range(10_000)):
        store.set(f"henge/devices/dev{i:05}/config", b"c", 1)
    store.clear("henge/devices/dev00007/config")
    found = [t for t, _, _, _ in store.matching("henge/devices/+/config")]
    assert found == [f"henge/devices/dev{i:05}/config" for i in range(10_000) if i != 7]
    assert [t for t, _, _, _ in store.matching("henge/devices/dev00042/#")] == [
        "henge/devices/dev00042/config", "henge/devices/dev00042/presence"]
    blocks = store._sorted._blocks
    assert all(0 < len(b) <= 2000 for b in blocks) and sum(map(len, blocks)) == 19_999
