"""MkDocs hooks: the pages that come from the code and from ``bench/results/``.

At build time, and never from a copy:

* ``reference/api.md``: one entry per name in ``peftkit.__all__`` (read from the package being
  documented, so a name added to ``__all__`` gets its entry); a public name without a docstring
  stops the build.
* ``reference/cli.md``: every subcommand's ``--help``, from ``peftkit.cli.build_parser()``.
* ``reference/results.md`` and ``assets/plots/*.png``: the results files and the chooser's plots,
  drawn by ``bench/report.py``.
* In any page, ``<!-- peftkit:config NAME -->`` becomes the field table of config class ``NAME``,
  ``<!-- peftkit:measured SLUG -->`` the measured rows of a method and
  ``<!-- peftkit:chooser -->`` the chooser's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

PLACEHOLDER = re.compile(r"<!-- peftkit:(\w+)(?: ([\w.:=+-]+))? -->")


def _paths() -> None:
    """This checkout's ``src`` and ``bench`` first on ``sys.path`` (MkDocs restores ``sys.path``
    after loading a hook module, so this runs in each hook), and the ``peftkit`` documented must
    be this checkout's."""
    for p in (ROOT / "bench", ROOT / "src"):
        if str(p) in sys.path:
            sys.path.remove(str(p))
        sys.path.insert(0, str(p))
    import peftkit

    here = Path(peftkit.__file__).resolve()
    if ROOT / "src" not in here.parents:
        raise PluginError(f"peftkit was imported from {here}, not from {ROOT / 'src'}; build with "
                          "PYTHONPATH=src or install this checkout (pip install -e .)")


def _report() -> Any:
    _paths()
    return importlib.import_module("report")


# -- API reference -------------------------------------------------------------------------------
def _kind(obj: Any) -> str:
    from peftkit.config import AdapterConfig

    if inspect.isclass(obj) and issubclass(obj, AdapterConfig):
        return "Configs"
    if inspect.isclass(obj):
        return "Classes"
    if callable(obj):
        return "Functions"
    return "Data"


def public_names() -> list[str]:
    """``peftkit.__all__`` of the package on ``sys.path`` (this checkout's ``src``)."""
    _paths()
    import peftkit

    return list(peftkit.__all__)


def check_docstrings(names: list[str]) -> None:
    """Every public name must carry its own docstring (as griffe, and so mkdocstrings, sees it)."""
    import griffe

    package = griffe.load("peftkit", search_paths=[str(ROOT / "src")],
                          docstring_parser=griffe.Parser.google, resolve_aliases=True)
    missing = []
    for name in names:
        try:
            obj = package[name]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            missing.append(f"{name} (not found by griffe)")
            continue
        doc = obj.docstring.value.strip() if obj.docstring else ""
        if not doc:
            missing.append(name)
    if missing:
        raise PluginError(
            "public names in peftkit.__all__ without a docstring: " + ", ".join(missing)
            + ". Add one where the name is defined (a string right after an assignment documents "
            "a constant)."
        )


def api_page(names: list[str]) -> str:
    import peftkit

    groups: dict[str, list[str]] = {"Functions": [], "Configs": [], "Classes": [], "Data": []}
    for name in names:
        groups[_kind(getattr(peftkit, name))].append(name)
    out = [
        "# API reference\n",
        "Every name in `peftkit.__all__`, generated from the docstrings when the site is built "
        "(`docs/hooks.py`): a public name without a docstring fails the build. Import them from "
        "the package: `import peftkit; peftkit.adapt(...)`.\n",
    ]
    intro = {
        "Functions": "Wrapping, training hooks, merging, files, NF4.",
        "Configs": "Frozen, keyword-only dataclasses; field names follow PEFT's "
        "`adapter_config.json` where PEFT has the method. The method pages list each one's "
        "fields with their defaults.",
        "Classes": "The layer base, the trained-copy module, NF4, the hook protocol, the paged "
        "optimizer.",
        "Data": "Module-level objects.",
    }
    for group, members in groups.items():
        if not members:
            continue
        out.append(f"## {group}\n\n{intro[group]}\n")
        for name in sorted(members, key=str.lower):
            out.append(f"::: peftkit.{name}\n    options:\n      heading_level: 3\n")
    return "\n".join(out)


# -- CLI reference -------------------------------------------------------------------------------
def cli_page() -> str:
    from peftkit.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help at $COLUMNS
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out = [
            "# CLI reference\n",
            "Generated from `peftkit.cli.build_parser()` when the site is built: this is what "
            "`peftkit COMMAND --help` prints. Bad input ends with one line on stderr and exit "
            "status 2.\n",
            "```text\n" + parser.format_help().rstrip() + "\n```\n",
        ]
        helps = {a.dest: a.help for a in sub._choices_actions}
        for name, p in sub.choices.items():
            out.append(f"## `peftkit {name}`\n")
            if helps.get(name):
                out.append(f"{helps[name][0].upper()}{helps[name][1:]}.\n")
            out.append("```text\n" + p.format_help().rstrip() + "\n```\n")
        return "\n".join(out)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


# -- config tables -------------------------------------------------------------------------------
def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def config_table(name: str) -> str:
    import peftkit
    from peftkit.config import AdapterConfig

    cls = getattr(peftkit, name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise PluginError(f"peftkit:config {name}: not a config class in peftkit")
    shared = {f.name: _default(f) for f in dataclasses.fields(AdapterConfig)}
    # a shared field whose default this config changes (LongLoRA's target_modules) is its own
    own = [f for f in dataclasses.fields(cls)
           if f.name not in shared or _default(f) != shared[f.name]]
    base = [f for f in dataclasses.fields(cls) if f not in own]
    rows = ["| field | type | default |", "|---|---|---|"]
    for f in own:
        rows.append(f"| `{f.name}` | `{f.type}` | {_default(f)} |")
    rows.append(
        "| *shared* | " + ", ".join(f"`{f.name}`" for f in base)
        + " | see [Concepts](../concepts.md#what-to-adapt) |"
    )
    doc = inspect.getdoc(cls) or ""
    quoted = "> " + doc.replace("\n", "\n> ")
    return (f"`peftkit.{name}` ([API](../reference/api.md#peftkit.{name})), generated from the "
            "dataclass:\n\n" + "\n".join(rows) + "\n\nFrom its docstring:\n\n" + quoted + "\n")


def signature_table(name: str) -> str:
    """A function's parameters with their defaults, from its signature."""
    import peftkit

    fn = getattr(peftkit, name, None)
    if fn is None or not callable(fn):
        raise PluginError(f"peftkit:signature {name}: not a function in peftkit")
    rows = ["| parameter | type | default |", "|---|---|---|"]
    for p in inspect.signature(fn).parameters.values():
        default = "required" if p.default is p.empty else f"`{p.default!r}`"
        kind = " (keyword-only)" if p.kind is p.KEYWORD_ONLY else ""
        ann = "" if p.annotation is p.empty else f"`{p.annotation}`"
        rows.append(f"| `{p.name}`{kind} | {ann} | {default} |")
    return (f"`peftkit.{name}` ([API](../reference/api.md#peftkit.{name})), generated from its "
            "signature:\n\n" + "\n".join(rows) + "\n")


# -- hooks ---------------------------------------------------------------------------------------
def on_config(config: Any) -> Any:
    check_docstrings(public_names())
    return config


def on_files(files: Files, config: Any) -> Files:
    report = _report()
    generated = {
        "reference/api.md": api_page(public_names()),
        "reference/cli.md": cli_page(),
        "reference/results.md": (
            "# Benchmark results\n\nThe files in `bench/results/` that every number on these "
            "pages comes from, run by run (oldest first): the command, its date, the library "
            "versions where the run recorded them, and its source. Runs that a bench script wrote "
            "say `bench run`; older runs were imported by `bench/import_history.py` from the Q1 "
            "log and from the README's tables, and say so. `bench/report.py` turns them into "
            "the tables and plots.\n\n" + report.sources_list()
        ),
    }
    for uri, text in generated.items():
        files.append(File.generated(config, uri, content=text))
    for name, data in report.plots().items():
        files.append(File.generated(config, f"assets/plots/{name}", content=data))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    report = _report()

    def sub(m: re.Match[str]) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind == "config" and arg:
            return config_table(arg)
        if kind == "signature" and arg:
            return signature_table(arg)
        if kind == "measured" and arg:
            if arg not in report.DOC_METHODS:
                raise PluginError(f"{page.file.src_uri}: no method {arg!r} in bench/report.py")
            return report.method_section(arg)
        if kind == "chooser":
            return report.chooser_table(link_prefix="methods/")
        if kind == "mixed":
            return report.mixed_section()
        raise PluginError(f"{page.file.src_uri}: unknown placeholder {m.group(0)}")

    return PLACEHOLDER.sub(sub, markdown)


SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj):<code>~?([^<]+)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Docstrings use Sphinx roles (``:func:`attach```); show them as the code they name."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m.group(1)}</code>", html)

