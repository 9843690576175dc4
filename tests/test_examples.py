"""Every example the docs include runs, on tiny random-init models, in seconds.

Each file in ``examples/`` runs as a script in this process (transformers is imported once) from an
empty working folder; the examples check their own results (outputs equal after save/load, loss
going down, ranks pruned, ...) with ``assert``, so a run that raises is a broken example.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
NEEDS = {"peft_interop.py": "peft"}


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 12, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if path.name in NEEDS:
        pytest.importorskip(NEEDS[path.name])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"
    assert not any(tmp_path.iterdir()), f"{path.name} left files in the working folder"
