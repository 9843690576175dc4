"""The documentation site: it builds strictly, every public name has its reference entry, every
method page has the same sections, the examples are included rather than copied, the numbers come
from ``bench/results/``, and the built pages render in a real browser.

The site is built once per session into a temporary folder (``mkdocs build --strict``, about
15 s). The browser test needs Debian's ``chromium`` and the ``playwright`` package (the ``docs``
extra); it skips, saying which is missing, where either is absent. It keeps a screenshot of the
chooser page in ``build/docs-artifacts/`` (ignored by git).
"""

from __future__ import annotations

import functools
import html
import http.server
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import peftkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ARTIFACTS = ROOT / "build" / "docs-artifacts"
METHOD_SECTIONS = [
    "The update",
    "When to choose it",
    "Configuration",
    "Example",
    "Compared with PEFT",
    "Measured",
]

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("material", reason="mkdocs-material is not installed (the docs extra)")
pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (the docs extra)")


def _report():  # bench/report.py, the one script the docs' numbers come from
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("report")
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_every_public_name_has_a_reference_entry_with_its_docstring(site: Path) -> None:
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    starts = {m.group(1): m.start() for m in re.finditer(r'id="(peftkit\.[A-Za-z_0-9]+)"', page)}
    for name in peftkit.__all__:
        key = f"peftkit.{name}"
        assert key in starts, f"{name} has no entry in the API reference"
        rest = page[starts[key]:]
        nxt = re.search(r'<div class="doc doc-object', rest[10:])
        entry = _text(rest[: nxt.start() + 10 if nxt else len(rest)])
        # The entry shows the docstring's first words (mkdocstrings renders ``x`` as code).
        doc = (peftkit.__dict__[name].__doc__ if name != "METHODS" else None) or ""
        words = [w for w in doc.split() if re.fullmatch(r"[A-Za-z][\w-]*[.,;:]?", w)][:4]
        if name == "METHODS":
            words = ["The", "method", "registry"]
        assert words, name
        squashed = re.sub(r"\s+", " ", entry)
        for w in words:
            assert w.strip(".,;:") in squashed, f"{name}: {w!r} of its docstring not shown"
        assert ":class:" not in entry and ":func:" not in entry, f"{name}: raw Sphinx role shown"


def test_a_public_name_without_a_docstring_fails_the_build() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        hooks = importlib.import_module("hooks")
    finally:
        sys.path.remove(str(DOCS))
    from mkdocs.exceptions import PluginError

    hooks.check_docstrings(["adapt", "LoraConfig", "METHODS"])  # documented: passes
    with pytest.raises(PluginError, match="no_such_name"):
        hooks.check_docstrings(["adapt", "no_such_name"])
    with pytest.raises(PluginError, match="__version__"):  # exists, but has no docstring
        hooks.check_docstrings(["adapt", "__version__"])


def test_cli_reference_lists_every_subcommand(site: Path) -> None:
    from peftkit.cli import build_parser

    page = _text((site / "reference" / "cli" / "index.html").read_text(encoding="utf-8"))
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    for name in sub.choices:
        assert f"peftkit {name}" in page
    assert "--steps" in page and "--resume" in page


def _headings(md: str) -> list[str]:
    body = re.sub(r"```.*?```", "", md, flags=re.S)  # no headings inside code
    return [h.strip() for h in re.findall(r"^## (.+)$", body, flags=re.M)]


def test_every_method_has_a_page_with_the_same_sections() -> None:
    report = _report()
    pages = {p.stem: p for p in (DOCS / "methods").glob("*.md")}
    assert set(pages) == set(report.DOC_METHODS), "docs/methods/ and bench/report.py disagree"
    for slug, path in pages.items():
        md = path.read_text(encoding="utf-8")
        assert _headings(md) == METHOD_SECTIONS, f"{path.name}: {_headings(md)}"
        assert f"<!-- peftkit:measured {slug} -->" in md, f"{path.name}: no measured rows"
        assert re.search(r'--8<-- "examples/\w+\.py"', md), f"{path.name}: no included example"
        assert "arxiv.org" in md, f"{path.name}: no paper link"


def test_every_config_field_is_in_its_method_page(site: Path) -> None:
    import dataclasses

    for cls_name in ("LoraConfig", "VeraConfig", "MoraConfig", "DyLoraConfig", "AdaLoraConfig",
                     "DoraDynamicConfig", "LoraFAConfig", "DeltaLoraConfig", "LongLoraConfig"):
        cls = getattr(peftkit, cls_name)
        pages = [p for p in (DOCS / "methods").glob("*.md")
                 if f"<!-- peftkit:config {cls_name} -->" in p.read_text(encoding="utf-8")]
        assert pages, f"no method page shows {cls_name}'s fields"
        built = (site / "methods" / pages[0].stem / "index.html").read_text(encoding="utf-8")
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and f.name not in ("target_modules",):
                assert f"<code>{f.name}</code>" in built, f"{cls_name}.{f.name} missing"


def test_examples_are_included_not_copied() -> None:
    included = set()
    for md in DOCS.rglob("*.md"):
        included |= set(re.findall(r'--8<-- "(examples/[\w.]+)"', md.read_text(encoding="utf-8")))
    on_disk = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
    assert included == on_disk, f"not on a page: {on_disk - included}; gone: {included - on_disk}"
    for md in DOCS.rglob("*.md"):  # no page pastes an example's body
        text = md.read_text(encoding="utf-8")
        for ex in (ROOT / "examples").glob("*.py"):
            lines = [x for x in ex.read_text(encoding="utf-8").splitlines() if len(x) > 40]
            pasted = [x for x in lines if x in text and "import" not in x]
            assert len(pasted) < 3, f"{md.name} copies {ex.name}: {pasted[:2]}"


def test_every_python_block_is_an_included_example() -> None:
    for md in DOCS.rglob("*.md"):
        for block in re.findall(r"```python\n(.*?)```", md.read_text(encoding="utf-8"), flags=re.S):
            lines = [x.strip() for x in block.strip().splitlines()]
            assert lines and all(x.startswith('--8<-- "examples/') for x in lines), (
                f"{md.relative_to(DOCS)}: a python block that is not an included example: "
                f"{block[:80]!r}"
            )


def test_numbers_on_the_pages_come_from_bench_results(site: Path) -> None:
    report = _report()
    # the chooser's table is the one bench/report.py builds from the results files
    chooser = _text((site / "choosing" / "index.html").read_text(encoding="utf-8"))
    for row in report.chooser_rows():
        if row.acc:
            assert f"{sum(row.acc) / len(row.acc):.3f}" in chooser, row.label
    # each results file names the run's command and its source; imported runs say so
    for path in (ROOT / "bench" / "results").glob("*.json"):
        for run in json.loads(path.read_text(encoding="utf-8"))["runs"]:
            assert run["source"] and run["command"] and run["rows"], path.name
            assert run["source"] == "bench run" or "import" in run["source"], path.name
    # the README's Q1 table is what q1.json gives
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.readme_q1_table() in readme


def test_readme_links_the_docs_and_keeps_the_set_up() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mkdocs serve" in readme
    assert 'python -m pip install -e ".[dev]" && python -m pytest -q' in readme
    assert "peftkit fetch-data && peftkit train" in readme
    assert "peftkit.adapt(model" in readme


# -- in a browser ---------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_pages_render_in_chromium(served: str) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the docs extra)"
    )
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH: apt-get install -y chromium (.ci/run installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("request", lambda r: problems.append(f"outside request: {r.url}")
                    if not r.url.startswith((served, "data:", "blob:")) else None)
            for path, must_show in (
                ("quickstart/", "pip install"),
                ("methods/dora/", "lora_magnitude_vector"),
                ("choosing/", "trainable"),
            ):
                response = page.goto(served + path, wait_until="networkidle")
                assert response is not None and response.ok, path
                assert must_show in page.inner_text("article"), path
                images = page.eval_on_selector_all(
                    "article img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                    "e.naturalWidth])")
                for src, complete, width in images:
                    assert complete and width > 0, f"{path}: image {src} did not load"
                if path == "choosing/":
                    assert len(images) >= 3, images
                    page.screenshot(path=str(ARTIFACTS / "chooser.png"), full_page=True)
            # search: the index exists, and a query finds the DoRA page
            index = page.evaluate(
                "async url => (await (await fetch(url)).json()).docs.length",
                served + "search/search_index.json")
            assert index > 20
            page.goto(served, wait_until="networkidle")
            page.click("input.md-search__input")
            page.locator("input.md-search__input").press_sequentially("magnitude", delay=20)
            page.wait_for_selector(".md-search-result__item", timeout=30000)
            hrefs = page.eval_on_selector_all(
                ".md-search-result__item a", "els => els.map(e => e.href)")
            assert any("methods/dora/" in h for h in hrefs), hrefs
            assert problems == [], problems
        finally:
            browser.close()
