"""The house rules, checked on the source: who may import whom, and no amqtt internals anywhere.

An import that runs the wrong way is a bug (see the module docstrings): models know nothing of
ours, the session table is pure, the server core knows the port and the session table but not the
service or the store, external mode does not load the embedded server, the CLI never opens the store.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "henge_mqtt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to absolute names (also imports inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _ours(module: str) -> set[str]:
    return {m for m in _imports(MODULES[module]) if m.startswith("henge_mqtt.") and m in MODULES}


def test_no_henge_module_uses_amqtt() -> None:
    """The server core is ours: no subclass of amqtt's Broker/ProtocolHandler/Session, no private name."""
    for module, path in MODULES.items():
        text = path.read_text()
        tree = ast.parse(text)
        imported = {m for m in _imports(path) if m == "amqtt" or m.startswith("amqtt.")}
        assert not imported, f"{module} imports {sorted(imported)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                assert "amqtt" not in owner, f"{module} touches {owner}.{node.attr}"


def test_layers_import_only_downwards() -> None:
    rules = {
        "henge_mqtt.models": {"henge_mqtt.ids"},
        "henge_mqtt.ids": set(),
        "henge_mqtt.sessions": set(),
        "henge_mqtt.topics": set(),
        "henge_mqtt.errors": set(),
        "henge_mqtt.settings": {"henge_mqtt.errors"},
        "henge_mqtt.store": {"henge_mqtt.errors", "henge_mqtt.models", "henge_mqtt.pg"},
        "henge_mqtt.pg": {"henge_mqtt.errors"},  # the store's PostgreSQL connection, nothing more
        "henge_mqtt.ports": {"henge_mqtt.sessions"},
        "henge_mqtt.codec": set(),  # MQTT bytes only: shared by the embedded server and the external client
    }
    for module, allowed in rules.items():
        assert _ours(module) <= allowed, f"{module} imports {sorted(_ours(module) - allowed)}"
    for module in MODULES:
        deps = _ours(module)
        if module.startswith("henge_mqtt.server"):
            allowed = ("henge_mqtt.server", "henge_mqtt.ports", "henge_mqtt.sessions", "henge_mqtt.errors",
                       "henge_mqtt.codec")
            bad = {d for d in deps if not d.startswith(allowed)}
            assert not bad, f"{module} (server core) imports {sorted(bad)}"
    assert not any(d.startswith("henge_mqtt.server") for d in _ours("henge_mqtt.external"))
    cli = _ours("henge_mqtt.cli")
    assert "henge_mqtt.store" not in cli, "the CLI talks to the service, never to the store"
    for module in MODULES:
        if module.startswith("henge_mqtt.http"):  # a thin client of the library API, like the CLI
            allowed = ("henge_mqtt.http", "henge_mqtt.service.api", "henge_mqtt.service.auth",
                       "henge_mqtt.service.schemas", "henge_mqtt.models", "henge_mqtt.ids", "henge_mqtt.errors",
                       "henge_mqtt")
            bad = {d for d in _ours(module) if not d.startswith(allowed) or d.startswith("henge_mqtt.store")
                   or d.startswith("henge_mqtt.server")}
            assert not bad, f"{module} (HTTP API) imports {sorted(bad)}"
        assert "henge_mqtt.http" not in _ours(module) or module in ("henge_mqtt.cli", "henge_mqtt.http") \
            or module.startswith("henge_mqtt.http."), f"{module} imports the HTTP API"
        if module.startswith("henge_mqtt.service"):
            reach = {d for d in _ours(module) if d.startswith("henge_mqtt.server") and d != "henge_mqtt.server"}
            assert not reach, f"{module} reaches into the server's modules {sorted(reach)}; use the port"


def test_every_package_is_installed() -> None:
    """A non-editable `pip install .` ships every subpackage (the Quickstart's first line)."""
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(PACKAGE.parent), include=include))
    needed = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert needed <= shipped, f"not installed by pip: {sorted(needed - shipped)}"
    for path in PACKAGE.rglob("*.py"):
        assert (path.parent / "__init__.py").exists(), f"{path.parent} has no __init__.py"
    # The console's files ship too (package data): a gateway has no CDN to fetch them from.
    data = config["tool"]["setuptools"]["package-data"]["henge_mqtt.http"]
    static = PACKAGE / "http" / "static"
    for asset in static.rglob("*"):
        if asset.is_file():
            folder = asset.parent.relative_to(PACKAGE / "http").as_posix()
            assert f"{folder}/*" in data, f"{asset} is not shipped by pip (package-data)"
