"""The package's layers, as a rule a test keeps (beside the core's purity test).

Data flows down and answers return by value, so each layer may import only those below
it: ``protocol`` nothing of the package; ``handlers`` never ``runtime``; ``storage``
neither; ``telemetry``, which every layer may import, none of them; ``config`` nothing
that imports it back; the shared leaves (``listener_kind``,
``addresses``) nothing at all; and the composition root ``app`` only the entry points.
Imports are read from the source (``ast``), including those inside functions and
``TYPE_CHECKING`` blocks, so a rule cannot be dodged by importing late.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable, Mapping

import pytest

import relate_smtp

PACKAGE = pathlib.Path(relate_smtp.__file__).parent
ROOT = "relate_smtp"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = sources()


def _parents(name: str) -> Iterable[str]:
    """``a.b.c`` → ``a``, ``a.b``: importing a module runs its packages first."""
    parts = name.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])


def _target(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    """The package's modules that ``name`` imports, directly, at any depth of its code."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        named: list[str] = []
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            named = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for imported in named:
            if imported != ROOT and not imported.startswith(ROOT + "."):
                continue
            target = _target(imported)
            if target is not None:
                found.add(target)
                found.update(p for p in _parents(target) if p in MODULES)
    found.discard(name)
    found.discard(ROOT)  # relate_smtp/__init__.py: the version string only
    return found


GRAPH: Mapping[str, set[str]] = {name: imports_of(name) for name in MODULES}


def within(layer: str, name: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def modules_of(layer: str) -> list[str]:
    return [name for name in GRAPH if within(layer, name)]


def violations(layer: str, forbidden: Iterable[str]) -> list[str]:
    banned = tuple(forbidden)
    return sorted(
        f"{name} imports {target}"
        for name in modules_of(layer)
        for target in GRAPH[name]
        if any(within(other, target) for other in banned)
    )


def test_the_graph_is_read() -> None:
    assert len(GRAPH) > 40
    assert "relate_smtp.protocol._replies" in GRAPH["relate_smtp.protocol._connection"]
    assert "relate_smtp.runtime.session" in GRAPH["relate_smtp.runtime.server"]
    assert "relate_smtp.handlers" in GRAPH["relate_smtp.runtime.session"]


def test_protocol_imports_nothing_of_the_package() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name in modules_of("relate_smtp.protocol")
        for target in GRAPH[name]
        if not within("relate_smtp.protocol", target)
    )
    assert wrong == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("relate_smtp.handlers", ["relate_smtp.runtime", "relate_smtp.app", "relate_smtp.cli"]),
        (
            "relate_smtp.storage",
            [
                "relate_smtp.handlers",
                "relate_smtp.runtime",
                "relate_smtp.app",
                "relate_smtp.cli",
                "relate_smtp.admin",
            ],
        ),
        ("relate_smtp.runtime", ["relate_smtp.cli", "relate_smtp.admin"]),
        # Every layer may trace: telemetry imports none of them back.
        (
            "relate_smtp.telemetry",
            [
                "relate_smtp.handlers",
                "relate_smtp.storage",
                "relate_smtp.runtime",
                "relate_smtp.app",
                "relate_smtp.cli",
                "relate_smtp.admin",
                "relate_smtp.config",
            ],
        ),
    ],
)
def test_lower_layers_never_import_higher_ones(layer: str, forbidden: list[str]) -> None:
    assert violations(layer, forbidden) == []


def test_config_imports_nothing_that_imports_it_back() -> None:
    config = set(modules_of("relate_smtp.config"))
    assert config
    reached: set[str] = set()
    pending = [target for name in config for target in GRAPH[name] if target not in config]
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        pending.extend(target for target in GRAPH[name] if target not in config)
    cycles = sorted(
        f"{name} imports {target}" for name in reached for target in GRAPH[name] & config
    )
    assert cycles == []


@pytest.mark.parametrize(
    ("leaf", "allowed"),
    [
        ("relate_smtp.listener_kind", set()),
        # Network membership takes the configured network type, for annotations only.
        ("relate_smtp.addresses", {"relate_smtp.config"}),
    ],
)
def test_shared_leaves_import_nothing_of_the_package(leaf: str, allowed: set[str]) -> None:
    wrong = {
        target for target in GRAPH[leaf] if not any(within(other, target) for other in allowed)
    }
    assert wrong == set()


def test_only_entry_points_import_the_composition_root() -> None:
    entry_points = {
        "relate_smtp.cli",
        "relate_smtp.__main__",
        "relate_smtp.runtime.run",
        "relate_smtp.runtime.supervisor",
    }
    importers = {name for name, targets in GRAPH.items() if "relate_smtp.app" in targets}
    assert importers <= entry_points
