"""The laws of config layering (henge_mqtt/layering.py), pure and checked with hypothesis: RFC 7396
merge patches, and ``explain``, which names the layer that set each value of a merged config."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from henge_mqtt.layering import Layer, applying, explain, merge, merge_patch

KEYS = st.sampled_from(["a", "b", "c", "x/y", "t~n"])  # JSON pointer escapes too
LEAF = st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=3))
DOCS = st.recursive(LEAF, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=12)
OBJECTS = st.dictionaries(KEYS, DOCS, max_size=4)
PATCHES = st.recursive(st.one_of(LEAF, st.none()), lambda inner: st.dictionaries(KEYS, inner, max_size=3),
                       max_leaves=12).filter(lambda p: isinstance(p, dict))


def pointers(doc: Any, base: str = "") -> dict[str, Any]:
    """Every JSON pointer of ``doc`` (objects and leaves) with its value."""
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            where = f"{base}/{key.replace('~', '~0').replace('/', '~1')}"
            out[where] = value
            out.update(pointers(value, where))
    return out


@settings(max_examples=300, deadline=None)
@given(OBJECTS, PATCHES)
def test_a_merge_patch_applied_twice_changes_nothing_more(target: dict[str, Any], patch: dict[str, Any]) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@settings(max_examples=300, deadline=None)
@given(OBJECTS, PATCHES)
def test_a_merge_patch_leaves_no_null_and_keeps_what_it_does_not_name(target: dict[str, Any],
                                                                     patch: dict[str, Any]) -> None:
    result = merge_patch(target, patch)
    assert None not in pointers(result).values()
    for key, value in target.items():
        if key not in patch:
            assert result[key] == value
    assert target == merge_patch(target, {})  # the empty patch is the identity


@settings(max_examples=300, deadline=None)
@given(st.lists(PATCHES, min_size=1, max_size=4))
def test_explain_names_a_layer_for_every_value_of_the_merged_config(chain: list[dict[str, Any]]) -> None:
    named = [(f"layer{i}", content) for i, content in enumerate(chain)]
    merged: dict[str, Any] = {}
    for _, content in named:
        merged = merge_patch(merged, content)
    owners = explain(named)
    values = pointers(merged)
    assert set(owners) == set(values), "explain names exactly the values the merged config has"
    for where, layer in owners.items():
        if not isinstance(values[where], dict):  # a leaf: the last layer that named that pointer set it
            last = max(i for i, (_, content) in enumerate(named) if where in pointers(content))
            assert layer == named[last][0]


@given(st.dictionaries(st.sampled_from(["site", "tier"]), st.sampled_from(["a", "b"]), max_size=2),
       st.dictionaries(st.sampled_from(["site", "tier"]), st.sampled_from(["a", "b"]), max_size=2))
def test_a_layer_applies_exactly_to_devices_with_all_its_labels(selector: dict[str, str],
                                                                 labels: dict[str, str]) -> None:
    layer = Layer("l", 1, selector, 0, {})
    assert layer.applies(labels) == all(labels.get(k) == v for k, v in selector.items())


LABELS = st.dictionaries(st.sampled_from(["site", "tier"]), st.sampled_from(["a", "b"]), max_size=2)
LAYERS = st.lists(st.builds(Layer, name=st.sampled_from(["fleet", "l1", "l2", "l3"]), version=st.integers(1, 3),
                            selector=LABELS, priority=st.integers(-2, 2), content=PATCHES),
                  max_size=5, unique_by=lambda layer: layer.name)


@settings(max_examples=200, deadline=None)
@given(LAYERS, LABELS, OBJECTS)
def test_a_device_config_is_its_layers_in_order_then_its_own(layers: list[Layer], labels: dict[str, str],
                                                             own: dict[str, Any]) -> None:
    applied = applying(layers, labels)
    assert [layer.name for layer in applied if layer.name == "fleet"] == (
        ["fleet"] if any(layer.name == "fleet" for layer in layers) else [])
    rest = applied[1:] if applied and applied[0].name == "fleet" else applied
    assert all(layer.applies(labels) for layer in rest)
    assert [(layer.priority, layer.name) for layer in rest] == sorted((layer.priority, layer.name) for layer in rest)
    config, used = merge(applied, own)
    if not applied:
        assert (config, used) == (own, [])
    else:
        expected: dict[str, Any] = {}
        for layer in applied:
            expected = merge_patch(expected, layer.content)
        assert config == merge_patch(expected, own)
        assert used == [layer.ref for layer in applied] + ["device"]
