"""Rules of the code's shape, checked on the source: the package's modules import one another
without cycles (deferred imports and ``TYPE_CHECKING`` blocks included), no module imports
another module's private (``_``-prefixed) names, and the CLI reaches the library through the
public API only (names without a leading underscore)."""

from __future__ import annotations

import ast
from pathlib import Path

import peftkit

ROOT = Path(peftkit.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """``(module imported, name imported)`` for every relative import in ``path``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, alias.name))
    return found


def test_no_import_cycles_and_no_private_imports() -> None:
    known = modules()
    graph = {
        n: {m for m, _ in imports(n, p, known) if m in known and m != n} for n, p in known.items()
    }
    private = [
        f"{n} imports {m}.{a}"
        for n, p in known.items()
        for m, a in imports(n, p, known)
        if a.startswith("_") and a != "__version__"
    ]
    assert not private
    # a depth-first search for a back edge
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, path: list[str]) -> bool:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle.extend(path[path.index(m) :] + [m])
                return True
            if m not in state and visit(m, path + [m]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if n not in state and visit(n, [n]):
            break
    assert not cycle, " -> ".join(cycle)


def test_cli_uses_public_names_only() -> None:
    source = (ROOT / "cli.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    bad = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and isinstance(node.value, ast.Name)
        and node.value.id in {"T", "peftkit", "torch", "C"}
    ]
    assert not bad
