"""Import the results measured before ``bench/results/`` existed, by machine, never by hand.

Two sources, both read as they are in git:

* ``bench/q1_results.md``, the log ``bench/q1.py`` appends one row to per variant run: every row
  becomes one run of ``bench/results/q1.json`` (exact numbers as logged; trainable counts were
  logged rounded, e.g. ``74.5 k``, and are kept so, with the rounding stated).
* The README at one commit (``--commit``, default the one the docs were built from), whose
  benchmark tables are the only record of the W1, W2, W4, W5, Q2, Q3 and Q4 runs (the scripts
  printed to a terminal). Each table becomes one run whose ``source`` names the commit and the
  section, and whose ``command`` is the one the README gives for it. Dates, machines and versions
  that the README does not state are ``null``.

Runs written by the bench scripts themselves (``common.write_results``) carry ``"source": "bench
run"``; ``bench/report.py`` shows the source of every row it prints.

    python bench/import_history.py            # rewrites the imported runs, keeps bench runs
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_COMMIT = "c4da66e639d7ca5e7175bbdd2928c445a9641058"
NUMBER = re.compile(r"[-+−]?\d[\d,]*\.?\d*")

# README row labels → the variant names the bench scripts use (labels, not numbers).
W1_VARIANTS = {
    "LoRA": "lora",
    "LoRA, two-GEMM path": "lora-two-gemm",
    "DoRA (Liu)": "dora",
    "LoRA-FA (A frozen)": "lora_fa",
    "VeRA (r 256, attention)": "vera",
    "AdaLoRA (init_r 16)": "adalora",
    "QLoRA (NF4 base, double quantization)": "qlora",
    "full fine-tuning": "full",
    "DoRA": "dora",
    "DoRA with m frozen": "dora-m-frozen",
    "DoRA with stale norms": "dora-fixed-norm",
    "LoRA two-GEMM": "lora-two-gemm",
    "PEFT LoRA": "peft-lora",
    "PEFT DoRA": "peft-dora",
}


def numbers(cell: str) -> list[float]:
    """Every number in a cell, in order (``**1.075** [1.052, 1.119]`` → [1.075, 1.052, 1.119])."""
    out = []
    for m in NUMBER.findall(cell.replace("−", "-")):
        out.append(float(m.replace(",", "")))
    return out


def first(cell: str) -> float | None:
    found = numbers(cell)
    return found[0] if found else None


def spread(cell: str) -> list[float] | None:
    """``median [q1, q3]`` as three numbers, or the median alone as one."""
    found = numbers(cell.split("(")[0]) if "[" in cell else numbers(cell)[:1]
    return found[:3] if found else None


def table_after(text: str, marker: str, nth: int = 0) -> tuple[list[str], list[list[str]], str]:
    """The ``nth`` markdown table after ``marker``: header cells, rows of cells, and the text
    between the marker and the table (where the README gives the command)."""
    start = text.index(marker)
    lines = text[start:].splitlines()
    tables: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and "---" in lines[i + 1]:
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            tables.append((i, j))
            i = j
        i += 1
    a, b = tables[nth]

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    return cells(lines[a]), [cells(x) for x in lines[a + 2 : b]], "\n".join(lines[:a])


def command_in(preamble: str) -> str | None:
    """The last backticked command in the text before a table."""
    found = re.findall(r"`((?:PYTHONPATH=src )?python [^`]+)`", preamble)
    return found[-1] if found else None


def imported_run(commit: str, date: str, section: str, command: str | None) -> dict[str, Any]:
    return {
        "source": f"imported from README.md at commit {commit[:12]}, section {section!r}; the "
        "bench printed its table to a terminal and only the README kept it",
        "command": command,
        "date": None,
        "commit_date": date,
        "machine": {"description": "the shared 2-core CPU machine the README describes"},
        "versions": None,
        "git": {"commit": commit, "dirty": None},
    }


def import_readme(commit: str) -> dict[str, list[dict[str, Any]]]:
    text = subprocess.run(
        ["git", "show", f"{commit}:README.md"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout
    date = subprocess.run(
        ["git", "show", "-s", "--format=%cI", commit], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.strip()
    out: dict[str, list[dict[str, Any]]] = {}

    def cells(head: list[str], r: list[str]) -> dict[str, str]:
        return dict(zip(head, r, strict=False))

    def step_rows(head: list[str], rows: list[list[str]]) -> list[dict[str, Any]]:
        result = []
        for r in rows:
            label = r[0]
            key = next((v for k, v in sorted(W1_VARIANTS.items(), key=lambda kv: -len(kv[0]))
                        if label == k or label.startswith(k + ",") or label.startswith(k + " (")),
                       None)
            row: dict[str, Any] = {"variant": key, "label": label, "cells": cells(head, r)}
            row["step_over_floor"] = spread(r[1])
            for h, c in zip(head[2:], r[2:], strict=False):
                if h.startswith("step / PEFT"):
                    row["step_over_peer"] = spread(c)
                elif h.startswith("saved activations above"):
                    row["saved_above_floor_mib"] = first(c)
                elif h == "PEFT's step / floor":
                    row["peft_step_over_floor"] = first(c)
                elif h == "PEFT's saved activations":
                    row["peft_saved_above_floor_mib"] = first(c)
            result.append(row)
        return result

    head, rows, pre = table_after(text, "**W1 — one training step**")
    run = imported_run(commit, date, "W1 — one training step", command_in(pre))
    run["rows"] = step_rows(head, rows)
    head, rows, pre = table_after(text, "Where DoRA's cost over LoRA goes")
    run2 = imported_run(commit, date, "W1 — where DoRA's cost over LoRA goes", command_in(pre))
    run2["rows"] = step_rows(head, rows)
    out["w1"] = [run, run2]

    head, rows, pre = table_after(text, "**W2 — NF4**")
    run = imported_run(commit, date, "W2 — NF4", command_in(pre))
    run["rows"] = [
        {"operation": r[0], "cells": cells(head, r), "bits_per_param": first(r[1])}
        if r[0] == "storage" else {"operation": r[0], "cells": cells(head, r), "ratio": first(r[1])}
        for r in rows
    ]
    out["w2"] = [run]

    head, rows, pre = table_after(text, "**W4 — S2-Attn, one attention layer**")
    run = imported_run(commit, date, "W4 — S2-Attn, one attention layer", command_in(pre))
    run["rows"] = [{"tokens": int(first(r[0]) or 0), "attention": "s2",
                    "cells": cells(head, r), "step_over_full": spread(r[1]),
                    "saved_over_full": first(r[2])} for r in rows]
    out["w4_s2"] = [run]

    head, rows, pre = table_after(text, "**W4 — a whole LongLoRA training step**")
    run = imported_run(commit, date, "W4 — a whole LongLoRA training step", command_in(pre))
    run["rows"] = [{"tokens": int(first(r[0]) or 0), "attention": "s2",
                    "cells": cells(head, r), "full_step_seconds": first(r[1]),
                    "step_over_full": spread(r[2]),
                    "saved_over_full": first(r[3])} for r in rows]
    out["w4_model"] = [run]

    head, rows, pre = table_after(text, "**W5 — a real model**")
    run = imported_run(commit, date, "W5 — a real model", command_in(pre))
    run["rows"] = step_rows(head, rows)
    out["w5"] = [run]

    head, rows, pre = table_after(text, "**Q3 — DyLoRA**")
    run = imported_run(commit, date, "Q3 — DyLoRA", "python bench/q3_dylora.py --seeds 0")
    keys = ("dylora", "lora_truncated_alpha_over_b", "lora_truncated_alpha_over_r",
            "lora_trained_at_b")
    run["rows"] = [{"rank": int(first(r[0]) or 0), "seeds": [0],
                    **{k: [first(c)] for k, c in zip(keys, r[1:], strict=True)}} for r in rows]
    out["q3"] = [run]

    head, rows, pre = table_after(text, "**Q4 — LongLoRA passkey retrieval")
    run = imported_run(commit, date, "Q4 — LongLoRA passkey retrieval in miniature",
                       command_in(pre))
    run["rows"] = [{"model": r[0], "needle": "uniform",
                    "exact_match": {h: first(c) for h, c in zip(head[1:], r[1:], strict=True)}}
                   for r in rows]
    out["q4"] = [run]

    # Q2 is a sentence, not a table: "seed 0: LoRA 0.875, MoRA type 1 0.965, type 6 0.980; ..."
    start = text.index("**Q2 — MoRA's memorisation task")
    para = text[start : text.index("\n\n", start)]
    run = imported_run(commit, date, "Q2 — MoRA's memorisation task in miniature",
                       command_in(para))
    q2_rows = []
    for seed, body in re.findall(r"seed (\d+): (LoRA [^;]+?)(?:;|\. )", para):
        found = re.findall(r"(LoRA|type 1|type 6) (\d\.\d+)", body)
        for name, value in found:
            method = {"LoRA": "lora", "type 1": "mora1", "type 6": "mora6"}[name]
            q2_rows.append({"method": method, "lr": 1e-3, "seed": int(seed),
                            "final_exact_match": float(value)})
    run["rows"] = q2_rows
    out["q2"] = [run]
    return out


def import_q1_log(path: Path) -> list[dict[str, Any]]:
    """One run per row of the log ``bench/q1.py`` appends to."""
    lines = path.read_text(encoding="utf-8").splitlines()
    head_i = next(i for i, x in enumerate(lines) if x.startswith("| method |"))
    runs = []
    for n, line in enumerate(lines[head_i + 2 :], start=head_i + 3):
        if not line.startswith("|"):
            continue
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        variant, trainable, a0, a1, _mean, lr_cell, step, saved, steps, threads, date = c
        chosen = float(re.search(r"\*\*([^*]+)\*\*", lr_cell).group(1))  # type: ignore[union-attr]
        dev = dict(re.findall(r"([\d.e+-]+): (\d\.\d+)", lr_cell.split("(", 1)[1]))
        count, unit = trainable.split()
        runs.append({
            "source": f"bench/q1_results.md line {n}, written by bench/q1.py (imported by "
            "bench/import_history.py; the log keeps no command line, so the command is the "
            "one-variant form that reproduces the row)",
            "command": f"python bench/q1.py {variant}",
            "date": date,
            "machine": {"description": "the shared 2-core CPU machine", "torch_threads":
                        int(threads)},
            "versions": None,
            "git": None,
            "units": {
                "acc": "held-out accuracy (1,000 sentences), seeds 0 and 1",
                "trainable": "trainable parameters, as logged: rounded to 0.1 k / 0.1 M",
                "step_seconds": "median step time (absolute; compare one machine only)",
                "saved_mib": "MiB autograd saves for backward on a fixed 32 x 64 batch",
            },
            "notes": None,
            "rows": [{
                "variant": variant,
                "trainable": round(float(count) * {"k": 1e3, "M": 1e6}[unit]),
                "trainable_rounded": True,
                "acc": [float(a0), float(a1)],
                "lr": chosen,
                "dev": {k: float(v) for k, v in dev.items()},
                "step_seconds": first(step),
                "saved_mib": first(saved),
                "steps": int(first(steps) or 0),
            }],
        })
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--commit", default=DEFAULT_COMMIT, help="the README to import tables from")
    args = ap.parse_args()
    imported = import_readme(args.commit)
    imported["q1"] = import_q1_log(HERE / "q1_results.md")
    RESULTS.mkdir(exist_ok=True)
    for name, runs in imported.items():
        path = RESULTS / f"{name}.json"
        kept = []
        if path.is_file():  # runs the bench scripts wrote stay, after the imported ones
            kept = [r for r in json.loads(path.read_text(encoding="utf-8"))["runs"]
                    if r.get("source") == "bench run"]
        doc = {"benchmark": name, "runs": runs + kept}
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(runs)} imported run(s), {len(kept)} bench run(s)")


if __name__ == "__main__":
    main()
