"""Rules of the code's shape, checked on the source: the package's modules import one another
without cycles (deferred imports and ``TYPE_CHECKING`` blocks included), no module imports
another module's private (``_``-prefixed) names, and the CLI reaches the library through the
public API only (names without a leading underscore), in every module of the ``peftkit.cli``
package, which has one module per command."""

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


CLI = "peftkit.cli"
# The roots whose private names the CLI must not touch: peftkit outside its own package, and torch.
LIBRARIES = ("peftkit", "torch")


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def cli_private_uses(name: str, source: str, is_package: bool = False) -> list[str]:
    """Where a module of the CLI package reaches past the public API: an import of a ``_`` name
    or from a ``_`` module of peftkit outside ``peftkit.cli`` (or of torch), or ``X._name`` (also
    ``X.y._name``) on a name such an import binds. The CLI package's own imports are free
    (``test_no_import_cycles_and_no_private_imports`` still holds them to public names)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    tree = ast.parse(source)
    bound = set(LIBRARIES)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] not in LIBRARIES or origin.split(".")[:2] == CLI.split("."):
                continue
            if any(_private(p) for p in origin.split(".")):
                bad.append(f"{name}: from {origin} (private module)")
            for alias in node.names:
                if _private(alias.name):
                    bad.append(f"{name}: from {origin} import {alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] not in LIBRARIES or parts[:2] == CLI.split("."):
                    continue
                if any(_private(p) for p in parts):
                    bad.append(f"{name}: import {alias.name}")
                bound.add(alias.asname or parts[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                bad.append(f"{name}: {ast.unparse(node)}")
    return bad


def cli_modules() -> dict[str, Path]:
    return {n: p for n, p in modules().items() if n == CLI or n.startswith(f"{CLI}.")}


def test_cli_uses_public_names_only() -> None:
    found = cli_modules()
    # the package, its shared module and a module per command, serve and generate among them
    assert {CLI, f"{CLI}.common", f"{CLI}.serve", f"{CLI}.generate", f"{CLI}.train"} <= set(found)
    bad = [
        b
        for n, p in sorted(found.items())
        for b in cli_private_uses(n, p.read_text(encoding="utf-8"), p.name == "__init__.py")
    ]
    assert not bad


def test_cli_private_name_check_catches_what_it_should() -> None:
    source = """
import os
import torch.distributed as dist
from .. import train as T
from ..methods import dylora
from .common import status
from . import eval
from .._secret import thing
from ..state import _helper
import peftkit._x
def f():
    from ..serve.engine import Engine
    T._load(); dylora._flag; dist._private.x; torch.cuda._lazy_init(); Engine._queue
    os._exit(0); status(); eval.run; T.__name__; T.load_model
"""
    bad = cli_private_uses("peftkit.cli.demo", source)
    assert sorted(b.split(": ", 1)[1] for b in bad) == sorted(
        [
            "from peftkit._secret (private module)",
            "from peftkit.state import _helper",
            "import peftkit._x",
            "T._load",
            "dylora._flag",
            "dist._private",
            "torch.cuda._lazy_init",
            "Engine._queue",
        ]
    )


def test_one_cli_module_per_command() -> None:
    """Each subcommand is added and run by its own module of ``peftkit.cli``."""
    import argparse

    from peftkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    owners = {name: p.get_default("func").__module__ for name, p in sub.choices.items()}
    assert {"serve", "generate", "fetch-model", "train"} <= set(owners)
    assert len(set(owners.values())) == len(owners), owners
    for name, module in owners.items():
        assert module == f"{CLI}.{name.replace('-', '_')}", (name, module)
