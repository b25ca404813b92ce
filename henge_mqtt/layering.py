"""Config layering, pure: RFC 7396 merge patches, the layers in force, and which layer set each value.

No I/O and nothing of ours: the store derives configs with it, the service explains them with it,
and ``tests/test_layering_properties.py`` checks its laws with hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .where import STANDING_ROOTS, Where, parse

FLEET_LAYER = "fleet"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass(frozen=True, slots=True)
class Layer:
    """A config layer in force: the fleet's (``name == "fleet"``) or a label layer."""

    name: str
    version: int
    selector: dict[str, str]
    priority: int
    content: dict[str, Any]
    message: str = ""
    staged_by: str = ""  # a rollout staging this version: it is not in force yet
    where: str = ""  # a filter over what the device is (docs/where.md): id, labels, reported state
    _match: Where | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.where:  # stored only once it parsed: a WhereError here is a bug, not input
            object.__setattr__(self, "_match", parse(self.where, allowed=STANDING_ROOTS))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" + (f" (rollout {self.staged_by})" if self.staged_by else "")

    @property
    def reads_reported(self) -> bool:
        """Whether the device's reported state decides if this layer applies (so a report that
        changes it may change the device's config)."""
        return self._match is not None and "reported" in self._match.roots

    def applies(self, labels: dict[str, str], device: str = "", reported: Mapping[str, Any] | None = None) -> bool:
        """Every label of the selector, and the ``where`` filter (``device`` "" and ``reported``
        None: a device henge knows nothing of yet, as a new one)."""
        if not all(labels.get(k) == v for k, v in self.selector.items()):
            return False
        if self._match is None:
            return True
        facts: dict[str, Any] = {"id": device, "labels": labels}
        if reported is not None:
            facts["reported"] = reported
        return self._match.matches(facts)


def explain(chain: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Which layer of ``chain`` (merged in order, RFC 7396) set each value of the result:
    ``{pointer: layer}`` (an object belongs to the layer that created it)."""
    owner: dict[str, str] = {}

    def drop(where: str) -> None:
        for known in [k for k in owner if k == where or k.startswith(where + "/")]:
            del owner[known]

    def apply(target: dict[str, Any], patch: dict[str, Any], base: str, layer: str) -> None:
        for key, value in patch.items():
            where = f"{base}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if value is None:
                target.pop(key, None)
                drop(where)
            elif isinstance(value, dict):
                if not isinstance(target.get(key), dict):
                    drop(where)
                    target[key] = {}
                    owner[where] = layer
                apply(target[key], value, where, layer)
            else:
                drop(where)
                target[key] = value
                owner[where] = layer

    result: dict[str, Any] = {}
    for layer, content in chain:
        apply(result, content, "", layer)
    return owner


def applying(layers: Iterable[Layer], labels: dict[str, str], device: str = "",
             reported: Mapping[str, Any] | None = None) -> list[Layer]:
    """The layers that apply to a device with ``labels`` (and, for layers with a ``where``, its id
    and reported state), in merge order: the fleet's, then label layers by priority (lowest
    first) and name."""
    layers = list(layers)
    fleet = [layer for layer in layers if layer.name == FLEET_LAYER]
    rest = sorted((layer for layer in layers if layer.name != FLEET_LAYER
                   and layer.applies(labels, device, reported)),
                  key=lambda layer: (layer.priority, layer.name))
    return fleet + rest


def merge(applied: list[Layer], own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A device's config: its own layer over ``applied`` (RFC 7396, in order), and the refs used."""
    if not applied:
        return own, []  # no layer: the device layer is the config exactly as given
    config: dict[str, Any] = {}
    for layer in applied:
        config = merge_patch(config, layer.content)
    config = merge_patch(config, own)
    return config, [layer.ref for layer in applied] + ["device"]
