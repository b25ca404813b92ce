"""Config schemas: JSON Schema 2020-12 documents that every config must satisfy before it is stored.

One schema may hold for the whole fleet (selector ``""``, shown as ``fleet``) and one per label
selector (``site=berlin,tier=edge``: every label must match). A device's config must satisfy
every schema whose selector its labels match.

The checks run on the store's thread, inside the transaction that would store the version (the
store calls :meth:`Schemas.check` from ``_insert_version``), and schema changes run on that thread
too: a push and a schema change can never interleave, so nothing a schema in force refuses is
ever stored. The validator is python-jsonschema (``Draft202012Validator``): maintained, the
reference implementation of the 2020-12 draft in Python, with JSON-pointer paths for every error.
``format`` is an annotation, as the draft says by default: it is not asserted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when the first schema is compiled: 6.5 MB a gateway without schemas keeps
    from jsonschema import Draft202012Validator

from ..errors import InvalidSchema, SchemaViolation, ValidationFailed
from ..ids import parse_labels
from ..results import SchemaChange, SchemaInForce, SchemaPreview, SchemaVersion
from ..store import Store

log = logging.getLogger("henge_mqtt.service")
MAX_ERRORS_PER_CONFIG = 10


def selector_of(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_selector(name: str) -> dict[str, str]:
    """``fleet`` or ``k=v,k2=v2`` (also given as repeated ``--label``) to labels."""
    if name in ("", "fleet"):
        return {}
    try:
        return parse_labels(name.split(","))
    except ValueError as exc:
        raise ValidationFailed(f"a schema is named fleet or by its labels (k=v,k2=v2): {exc}") from exc


def display(selector: str) -> str:
    return selector or "fleet"


def pointer(path: Iterable[Any]) -> str:
    """RFC 6901: ``/a/0/b~1c``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@dataclass(frozen=True, slots=True)
class Compiled:
    selector: str
    labels: tuple[tuple[str, str], ...]
    version: int
    document: dict[str, Any]
    validator: Draft202012Validator

    @property
    def name(self) -> str:
        return f"{display(self.selector)}@{self.version}"

    def applies(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


def compile_schema(selector: str, version: int, document: Any) -> Compiled:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from referencing import Registry

    if not isinstance(document, dict):
        raise InvalidSchema("a schema must be a JSON object")
    declared = document.get("$schema")
    if declared not in (None, "https://json-schema.org/draft/2020-12/schema"):
        raise InvalidSchema(f"henge uses JSON Schema draft 2020-12; this document declares {declared!r}")
    try:
        Draft202012Validator.check_schema(document)
    except SchemaError as exc:
        raise InvalidSchema(f"not a valid JSON Schema 2020-12 document: {pointer(exc.absolute_path) or '/'}: "
                            f"{exc.message}") from exc
    remote = _remote_refs(document)
    if remote:
        raise InvalidSchema(f"{remote[0][0] or '/'}: $ref {remote[0][1]!r} points outside the document; henge "
                            "fetches nothing over the network, so every $ref must start with #")
    labels = tuple(sorted(parse_selector(selector).items()))
    # An empty registry: a reference is resolved inside the document or not at all (no retrieval).
    return Compiled(selector, labels, version, document, Draft202012Validator(document, registry=Registry()))


def _first(errors: list[dict[str, str]]) -> str:
    e = errors[0]
    return f"{e['pointer'] or '/'}: {e['message']} (schema {e['schema']})"


def _remote_refs(node: Any, path: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) and not value.startswith("#"):
                found.append((where, value))
            found += _remote_refs(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _remote_refs(value, f"{path}/{i}")
    return found


class Schemas:
    """The schemas in force and the devices whose current config breaks one (``invalid``).

    Every method but :meth:`invalid_error` runs on the store's thread.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._active: dict[str, Compiled] = {}
        self.invalid: dict[str, str] = {}  # device -> its first error, read by status on the loop

    def load(self) -> None:
        self._active = {sel: compile_schema(sel, v, doc) for sel, (v, doc) in self.store.schemas().items()}
        self.recheck_all()

    # ---- checks ----------------------------------------------------------------------------------

    def applicable(self, labels: dict[str, str]) -> list[Compiled]:
        return [c for c in self._active.values() if c.applies(labels)]

    @staticmethod
    def _errors(schemas: list[Compiled], config: dict[str, Any], device: str | None) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []
        if not schemas:
            return found
        from referencing.exceptions import Unresolvable

        for compiled in schemas:
            try:
                errors = sorted(compiled.validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
            except Unresolvable as exc:  # a local $ref to nothing: the config cannot be shown valid
                found.append({"schema": compiled.name, "pointer": "", "message": f"unresolvable $ref: {exc}"[:300]}
                             | ({"device": device} if device else {}))
                continue
            for error in errors[:MAX_ERRORS_PER_CONFIG]:
                found.append({"schema": compiled.name, "pointer": pointer(error.absolute_path),
                              "message": error.message[:300]} | ({"device": device} if device else {}))
        return found

    def check(self, device: str, config: dict[str, Any]) -> None:
        """The store's hook: raises before the version is inserted, and keeps ``invalid`` current."""
        if not self._active:
            self.invalid.pop(device, None)
            return
        errors = self._errors(self.applicable(self.store.labels_of(device)), config, None)
        if errors:
            raise SchemaViolation(errors)
        self.invalid.pop(device, None)

    def check_many(self, devices: list[str], config: dict[str, Any]) -> None:
        """One device layer for many devices (a fleet push): each device's resulting config, checked
        once per distinct set of layers and schemas, before anything is stored; every device that
        would break a schema is named."""
        if not self._active:
            return
        labels = self.store.labels_by_device(devices)
        verdicts: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, str]]] = {}
        errors: list[dict[str, str]] = []
        for device in devices:
            have = labels.get(device, {})
            layers = self.store.layers_for(have, device=device)
            schemas = self.applicable(have)
            key = (tuple(layer.ref for layer in layers), tuple(c.selector for c in schemas))
            if key not in verdicts:
                effective, _ = self.store.merge_layers(layers, config)
                verdicts[key] = self._errors(schemas, effective, None)
            errors += [e | {"device": device} for e in verdicts[key]]
        if errors:
            raise SchemaViolation(errors, what="nothing was stored for any device")

    def check_layer_change(self, layer: dict[str, Any], devices: list[str]) -> None:
        """Before a staged layer change starts: every target's config under the new layer, and what
        a device added afterwards would get."""
        errors = self.layer_change_errors(layer, devices) + self.new_device_errors(
            layer["name"], layer["content"], labels=layer["labels"], priority=layer["priority"])
        if errors:
            raise SchemaViolation(errors, what="the rollout was not started")

    def layer_change_errors(self, layer: dict[str, Any], devices: list[str]) -> list[dict[str, str]]:
        """Each of ``devices``' config under the changed layer ({name, content, labels, priority}),
        checked against its schemas."""
        if not self._active:
            return []
        layers, _ = self._layers_after(layer["name"], layer["content"], labels=layer["labels"],
                                       priority=layer["priority"], where=layer.get("where"))
        labels = self.store.labels_by_device(devices)
        items = []
        for device in devices:
            own = self.store.current_config_layer(device)
            effective, _ = self.store.effective(labels.get(device, {}), own, layers, device=device)
            items.append((device, labels.get(device, {}), effective))
        errors: list[dict[str, str]] = []
        for device, have, config in items:
            errors += self._errors(self.applicable(have), config, device)
        return errors

    def new_device_errors(self, name: str, content: dict[str, Any] | None, *, labels: dict[str, str] | None,
                          priority: int | None, where: str | None = None) -> list[dict[str, str]]:
        """What a device added after this layer change, with no config of its own, would get: the
        errors of that config (checked for a device with exactly the layer's labels, the least a
        device needs to get it; the fleet layer: no labels). A layer no current device exposes can
        still refuse every ``device add`` that follows; this finds it before it is stored."""
        if not self._active:
            return []
        layers, probe = self._layers_after(name, content, labels=labels, priority=priority, where=where)
        effective, used = self.store.effective(probe, {}, layers)  # a new device: no reported state yet
        if not used:
            return []  # no layer applies: such a device gets no config, so nothing to refuse
        who = "a new device" + (" with " + ",".join(f"{k}={v}" for k, v in sorted(probe.items())) if probe else "")
        return [e | {"device": f"{who} (no config of its own)"} for e in self._errors(self.applicable(probe),
                                                                                     effective, None)]

    def _layers_after(self, name: str, content: dict[str, Any] | None, *, labels: dict[str, str] | None,
                      priority: int | None, where: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """The layers in force once layer ``name`` is changed (``content`` None: removed), and its
        selector (a removed layer's last one)."""
        layers = self.store.layers()
        candidate, selector, _ = self.store.candidate_layer(name, content, selector=labels, priority=priority,
                                                            where=where)
        if candidate is None:
            layers.pop(name, None)
        else:
            layers[name] = candidate
        return layers, selector

    def layer_change_plan_errors(self, name: str, content: dict[str, Any] | None, *, labels: dict[str, str] | None,
                                 priority: int | None, where: str | None) -> list[dict[str, str]]:
        """Every device a layer change would give a new config, that config checked against its
        schemas, stored nowhere (before a change streamed in chunks stores its first): the store's
        plan, read in bulk, as the change itself will work it out."""
        if not self._active:
            return []
        return self.plan_errors(self.store.layer_change_plan(name, content, selector=labels, priority=priority,
                                                             where=where))

    def plan_errors(self, plan: list[tuple[str, int, dict[str, Any] | None, dict[str, Any]]]) -> list[dict[str, str]]:
        """The schema errors of each config a layer change's plan (``Store.layer_change_plan``) gives."""
        if not self._active:
            return []
        have = self.store.labels_by_device([device for device, *_ in plan])
        return self.errors_of([(device, have.get(device, {}), after) for device, _, _, after in plan])

    def errors_of(self, items: list[tuple[str, dict[str, str], dict[str, Any]]]) -> list[dict[str, str]]:
        """The schema errors of ``(device, labels, config)`` each, all of them."""
        errors: list[dict[str, str]] = []
        for device, labels, config in items:
            errors += self._errors(self.applicable(labels), config, device)
        return errors

    def check_each(self, items: list[tuple[str, dict[str, str], dict[str, Any]]]) -> None:
        """The store's hook for many new versions at once (a layer change): all pass or none is stored."""
        if not self._active:
            return
        errors = self.errors_of(items)
        if errors:
            raise SchemaViolation(errors, what="nothing was stored for any device")
        self.stored(device for device, _, _ in items)

    def stored(self, devices: Iterable[str]) -> None:
        """Versions that passed :meth:`check_many` were stored: those devices are valid now."""
        for device in devices:
            self.invalid.pop(device, None)

    def labels_changed(self, device: str) -> None:
        """New labels may bring new schemas: is the device's current config still valid?"""
        if not self._active:
            return
        config = self.store.current_config(device)
        if config is None:
            return
        errors = self._errors(self.applicable(self.store.labels_of(device)), config, None)
        if errors:
            self.invalid[device] = _first(errors)
        else:
            self.invalid.pop(device, None)

    # ---- changes ---------------------------------------------------------------------------------

    def put(self, selector: str, document: Any, *, actor: str, force: bool,
            if_version: int | None = None) -> SchemaChange:
        """Set the schema for ``selector``; refused if current configs break it, unless ``force``
        (then those devices are ``invalid`` until a valid version is stored); with ``if_version``,
        refused unless it is the schema's current version (an edit that began from another)."""
        current = self._active.get(selector)
        candidate = compile_schema(selector, (current.version if current else 0) + 1, document)
        violations = self._violations([candidate])
        if violations and not force:
            raise SchemaViolation(
                violations, what="the schema was not stored (henge schema set --force stores it anyway and marks "
                                 "those devices invalid)")
        version = self.store.put_schema(selector, document, actor=actor, forced=bool(violations), if_version=if_version,
                                        name=f"schema {display(selector)}")
        history = self.store.schema_history(selector)
        self._active[selector] = compile_schema(selector, version, history[-1]["document"])
        # Only these can have changed: the devices invalid before (the old version may have been why)
        # and those the new version refuses; every other config was just checked and passes.
        self.recheck(set(self.invalid) | {v["device"] for v in violations})
        return {"schema": display(selector), "version": version,
                "invalid_devices": sorted({v["device"] for v in violations})}

    def preview(self, selector: str, document: Any) -> SchemaPreview:
        """What ``put`` would say, stored nowhere: InvalidSchema for a document that is not a JSON
        Schema, else the current devices whose configs it would refuse, each violation one line."""
        current = self._active.get(selector)
        candidate = compile_schema(selector, (current.version if current else 0) + 1, document)
        violations = self._violations([candidate])
        devices = sorted({v["device"] for v in violations})
        return {"schema": display(selector), "version": candidate.version, "invalid_devices": devices[:200],
                "more": max(0, len(devices) - 200), "violations": [SchemaViolation.line(v) for v in violations[:200]]}

    def remove(self, selector: str, *, actor: str) -> SchemaChange:
        if selector not in self._active:
            raise ValidationFailed(f"no schema {display(selector)!r} is in force")
        version = self.store.put_schema(selector, None, actor=actor)
        del self._active[selector]
        self.recheck(set(self.invalid))  # removing a schema can only make devices valid
        return {"schema": display(selector), "version": version, "removed": True}

    def listing(self) -> list[SchemaInForce]:
        return [{"schema": display(c.selector), "labels": dict(c.labels), "version": c.version}
                for c in sorted(self._active.values(), key=lambda c: c.selector)]

    def get(self, selector: str, version: int | None = None) -> SchemaVersion:
        history = self.store.schema_history(selector)
        if not history:
            raise ValidationFailed(f"no schema {display(selector)!r}")
        if version is None:
            entry = history[-1]
        else:
            found = [h for h in history if h["version"] == version]
            if not found:
                raise ValidationFailed(f"schema {display(selector)!r} has no version {version}")
            entry = found[0]
        entry["schema"] = display(selector)
        return entry

    def _violations(self, schemas: list[Compiled]) -> list[dict[str, str]]:
        labels = self.store.labels_by_device()
        found: list[dict[str, str]] = []
        for device, config in self.store.current_configs():
            applying = [c for c in schemas if c.applies(labels.get(device, {}))]
            if applying:
                found += self._errors(applying, config, device)
        return found

    def recheck(self, devices: set[str]) -> None:
        """``invalid`` anew for these devices only."""
        if not devices:
            return
        labels = self.store.labels_by_device(sorted(devices))
        for device in devices:
            config = self.store.current_config(device) if device in labels else None
            errors = self._errors(self.applicable(labels[device]), config, None) if config is not None else []
            if errors:
                self.invalid[device] = _first(errors)
            else:
                self.invalid.pop(device, None)

    def recheck_all(self) -> None:
        invalid: dict[str, str] = {}
        if self._active:
            labels = self.store.labels_by_device()
            for device, config in self.store.current_configs():
                errors = self._errors(self.applicable(labels.get(device, {})), config, None)
                if errors:
                    invalid[device] = _first(errors)
        self.invalid = invalid
