"""The house rules, checked on the source: who may import whom (followed transitively), no import
circles, and no amqtt internals anywhere.

An import that runs the wrong way is a bug (see the module docstrings): models know nothing of
ours, the session table is pure, the server core knows the port and the session table but not the
service or the store, external mode does not load the embedded server, nothing imports the CLI,
and the CLI and HTTP API reach the store only through the service.
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


def _in(module: str, *packages: str) -> bool:
    """``module`` is one of ``packages`` or inside one (``henge_mqtt.client`` is not in ``henge_mqtt.cli``)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def _reach(module: str, *, through: tuple[str, ...] = ()) -> set[str]:
    """Every module of ours ``module`` imports, transitively (TYPE_CHECKING and in-function imports
    included); ``through`` names packages whose insides are not followed (a public API: reaching it
    is allowed, what it reaches is its own business)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in _ours(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                if not _in(dep, *through) or dep == module:
                    todo.append(dep)
    seen.discard(module)
    return seen


def _cycles() -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in _ours(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    return found


def test_no_import_circles() -> None:
    """No two modules import each other, directly or around a loop, not even for type hints: the
    broker hands a connection a narrow interface (``connection.Owner``), the rollout runner asks
    its host for what it needs (``rollouts.Host``), the composer wires parts that never import it."""
    assert _cycles() == []


def test_the_rules_of_the_house_hold_transitively() -> None:
    pure = {  # modules that know nothing of ours (or only the named leaves), however deep one looks
        "henge_mqtt.ids": set(),
        "henge_mqtt.roles": set(),
        "henge_mqtt.ops": {"henge_mqtt.roles"},
        "henge_mqtt.models": {"henge_mqtt.ids", "henge_mqtt.roles"},
        "henge_mqtt.results": set(),  # the answers' shapes: typing only
        "henge_mqtt.sessions": set(),
        "henge_mqtt.topics": set(),
        "henge_mqtt.errors": set(),
        "henge_mqtt.codec": set(),  # MQTT bytes only: shared by the embedded server and the external client
        "henge_mqtt.layering": {"henge_mqtt.where"},  # merge patches, explain, which layers apply: pure
        "henge_mqtt.dynsec": {"henge_mqtt.topics"},  # Mosquitto's dynamic security documents: pure
        "henge_mqtt.where": set(),  # the --where language: pure
        "henge_mqtt.rollout_plan": set(),  # the rollout planner: pure
        "henge_mqtt.logs": set(),
        "henge_mqtt.ports": {"henge_mqtt.sessions"},
        "henge_mqtt.settings": {"henge_mqtt.errors"},
    }
    for module, allowed in pure.items():
        assert _reach(module) <= allowed, f"{module} reaches {sorted(_reach(module) - allowed)}"
    # The store knows models (and the pure layering and where), nothing above it.
    for module in MODULES:
        if module.startswith("henge_mqtt.store"):
            bad = {d for d in _reach(module) if not d.startswith(
                ("henge_mqtt.store", "henge_mqtt.errors", "henge_mqtt.models", "henge_mqtt.ids", "henge_mqtt.roles",
                 "henge_mqtt.layering", "henge_mqtt.results", "henge_mqtt.where"))}
            assert not bad, f"{module} (the store) reaches {sorted(bad)}"
        # The server core knows the port, the session table, codec and errors; never the service or store.
        if module.startswith("henge_mqtt.server"):
            bad = {d for d in _reach(module) if not d.startswith(
                ("henge_mqtt.server", "henge_mqtt.ports", "henge_mqtt.sessions", "henge_mqtt.errors",
                 "henge_mqtt.codec", "henge_mqtt.logs"))}
            assert not bad, f"{module} (server core) reaches {sorted(bad)}"
        # Nothing imports the CLI.
        if not _in(module, "henge_mqtt.cli", "henge_mqtt.__main__"):
            assert not any(_in(d, "henge_mqtt.cli") for d in _ours(module)), f"{module} imports the CLI"
        # The service reaches the embedded server only through the port (and the package's front door).
        if module.startswith("henge_mqtt.service"):
            reach = {d for d in _ours(module) if d.startswith("henge_mqtt.server") and d != "henge_mqtt.server"}
            assert not reach, f"{module} reaches into the server's modules {sorted(reach)}; use the port"
    # External mode never loads the embedded server.
    assert not any(d.startswith("henge_mqtt.server") for d in _reach("henge_mqtt.external"))
    # The CLI and the HTTP API are clients of the service's public API: whatever they reach, not
    # counting what the service reaches on its own, is never the store or the server core.
    public = ("henge_mqtt.service", "henge_mqtt.http")
    for module in MODULES:
        if _in(module, "henge_mqtt.cli", "henge_mqtt.http"):
            bad = {d for d in _reach(module, through=public) if _in(d, "henge_mqtt.store", "henge_mqtt.server")}
            assert not bad, f"{module} (a client) reaches {sorted(bad)} other than through the service"
        if module.startswith("henge_mqtt.http"):
            bad = {d for d in _ours(module) if d.startswith("henge_mqtt.service") and d not in (
                "henge_mqtt.service.api", "henge_mqtt.service.auth", "henge_mqtt.service.schemas",
                "henge_mqtt.service.context", "henge_mqtt.service.handlers", "henge_mqtt.service.configs")}
            assert not bad, f"{module} (HTTP API) imports the service's parts {sorted(bad)}"


def test_the_transitive_check_sees_an_import_two_steps_away() -> None:
    """The check itself: the CLI reaches the store two steps away (through the service), which the
    rule allows only because the service is a public API; without that allowance it is seen."""
    assert any(d.startswith("henge_mqtt.store") for d in _reach("henge_mqtt.cli.offline"))
    assert not any(d.startswith("henge_mqtt.store") for d in _ours("henge_mqtt.cli.offline"))


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


def test_the_library_surface_is_what_library_md_lists() -> None:
    """HengeService's public names are the ones docs/library.md documents (the rest private or on
    parts); every error of the tree and the models come from the top package; the package is typed."""
    import re

    import henge_mqtt
    from henge_mqtt import errors
    from henge_mqtt.service import HengeService

    doc = (PACKAGE.parent / "docs" / "library.md").read_text()
    documented = set(re.findall(r"`(?:await )?\.(\w+)", doc))
    public = {n for n in dir(HengeService) if not n.startswith("_")}
    for module in ("henge_mqtt.service.composer", "henge_mqtt.service.api"):  # and what an instance holds
        public |= set(re.findall(r"^ {8,}self\.([a-z]\w*)(?:: [^=\n]+)? = ", MODULES[module].read_text(), re.M))
    assert public == documented, f"undocumented: {sorted(public - documented)}; gone: {sorted(documented - public)}"
    tree = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.HengeError)}
    assert tree <= set(henge_mqtt.__all__), f"not importable from henge_mqtt: {sorted(tree - set(henge_mqtt.__all__))}"
    for name in henge_mqtt.__all__:
        assert getattr(henge_mqtt, name) is not None
        assert f"`{name}`" in doc or name in tree, f"henge_mqtt.{name} is not in docs/library.md"
    assert (PACKAGE / "py.typed").exists()


def test_every_operation_has_one_handler_and_its_routes_exist() -> None:
    """The op table drives the admin dispatch and the HTTP API: each admin op has its handler and its
    argument model; each route of the table is served with the op's role, and every route the API
    serves under /api/v1 is in the table."""
    from henge_mqtt import models
    from henge_mqtt.http.app import create_app
    from henge_mqtt.ops import ADMIN_OPS, OPS, ROUTES
    from henge_mqtt.service.handlers import HANDLERS

    assert set(HANDLERS) == set(ADMIN_OPS)
    for op in OPS.values():
        assert isinstance(getattr(models, op.args), type), op.name
    app = create_app(None, None, body_limit=1024)  # type: ignore[arg-type]  # routes only, never served
    served = {}
    for path, item in app.openapi()["paths"].items():
        for method, spec in item.items():
            served[(method.upper(), path.removeprefix("/api/v1"))] = (spec["x-henge-op"], spec["x-henge-role"])
    assert served == {key: (op.name, op.role) for key, op in ROUTES.items()}


def test_every_import_of_ours_resolves() -> None:
    """Imports inside functions (the CLI's lazy ones) run only when their command does: each must
    name a module of ours, or a name in one, or the suite would learn of a move only from a user."""
    for module, path in MODULES.items():
        for name in _imports(path):
            if name == "henge_mqtt" or not name.startswith("henge_mqtt."):
                continue
            assert name in MODULES or name.rpartition(".")[0] in MODULES, f"{module} imports {name}: no such module"


def test_every_operation_names_a_result_type_that_exists() -> None:
    """Each op of the table says what it returns: a TypedDict of henge_mqtt.results or a model."""
    import re
    import typing

    from henge_mqtt import models, results
    from henge_mqtt.ops import OPS

    for op in OPS.values():
        name = re.fullmatch(r"(?:list\[)?(\w+)\]?", op.returns)
        assert name is not None, f"{op.name}: returns {op.returns!r}"
        found = getattr(results, name[1], None) or getattr(models, name[1], None)
        assert isinstance(found, type), f"{op.name} returns {op.returns}: no such type"
        if typing.is_typeddict(found):
            assert typing.get_type_hints(found), f"{op.name}: {found.__name__} has no fields"


def test_the_cli_calls_only_operations_of_the_table() -> None:
    """Every admin call the CLI makes names an op the table declares (a typo would otherwise be an
    `unknown_op` only a user finds)."""
    import re

    from henge_mqtt.ops import ADMIN_OPS

    called: set[str] = set()
    for module, path in MODULES.items():
        if _in(module, "henge_mqtt.cli"):
            text = path.read_text()
            called |= set(re.findall(r"call(?:_op|_then_wait)\([^\"]*?\"([a-z_.]+)\"", text, re.S))
            called |= set(re.findall(r"client\.call\(\"([a-z_.]+)\"", text))
    assert len(called) > 30, sorted(called)
    assert called <= ADMIN_OPS, sorted(called - ADMIN_OPS)
