"""Tables and plots from ``bench/results/*.json``: the one place the docs' numbers come from.

The documentation build (``docs/hooks.py``) calls :func:`method_section`, :func:`chooser_table`,
:func:`sources_list` and :func:`plots`; the README's Q1 table is :func:`readme_q1_table`. Nothing
here holds a number: every figure is read from a run in ``bench/results/``, and every table says
which run (its command, and where the run was not written by a bench script, its source).

    python bench/report.py plots DIR          # the chooser's PNGs into DIR
    python bench/report.py method lora        # a method page's measured section (markdown)
    python bench/report.py readme --check     # is the README's Q1 table the one q1.json gives?
    python bench/report.py readme --write     # rewrite it from q1.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"


@dataclass(frozen=True)
class DocMethod:
    """A method page and the bench variants that measure it (names as the bench scripts use)."""

    title: str
    w1: tuple[str, ...] = ()
    q1: tuple[str, ...] = ()
    w5: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())  # other sections: "w2", "w4", "q2", "q3", "q4"


# page slug → what measures it. Labels only; every number comes from bench/results/.
DOC_METHODS: dict[str, DocMethod] = {
    "lora": DocMethod("LoRA", ("lora", "lora-two-gemm"), ("lora",), ("lora", "peft-lora")),
    "dora": DocMethod("DoRA (Liu)", ("dora", "dora-unfused", "dora-m-frozen", "dora-fixed-norm"),
                      ("dora",), ("dora", "peft-dora")),
    "vera": DocMethod("VeRA", ("vera",), ("vera",)),
    "mora": DocMethod("MoRA", ("mora",), ("mora",), extra=("q2",)),
    "dylora": DocMethod("DyLoRA", ("dylora", "dylora-frozen"), ("dylora",), extra=("q3",)),
    "adalora": DocMethod("AdaLoRA", ("adalora",), ("adalora",)),
    "dora-mao": DocMethod("DoRA-Mao", ("dora_dynamic",), ("dora_dynamic:prune_interval=5",)),
    "lora-fa": DocMethod("LoRA-FA", ("lora_fa",), ("lora_fa",)),
    "delta-lora": DocMethod("Delta-LoRA", ("delta_lora",), ("delta_lora:warmup_steps=10",)),
    "longlora": DocMethod("LongLoRA", (), (), extra=("w4", "q4")),
    "qlora": DocMethod("QLoRA", ("qlora",), ("qlora",), extra=("w2",)),
    "loraplus": DocMethod("LoRA+", (), ("loraplus",)),
}
# The variants of the chooser's plots, in its order, with their labels.
CHOOSER: dict[str, tuple[str, str | None, str]] = {
    # label: (Q1 variant, W1 variant, page)
    "LoRA": ("lora", "lora", "lora"),
    "DoRA (Liu)": ("dora", "dora", "dora"),
    "VeRA": ("vera", "vera", "vera"),
    "MoRA": ("mora", "mora", "mora"),
    "DyLoRA": ("dylora", "dylora", "dylora"),
    "AdaLoRA": ("adalora", "adalora", "adalora"),
    "DoRA-Mao": ("dora_dynamic:prune_interval=5", "dora_dynamic", "dora-mao"),
    "LoRA-FA": ("lora_fa", "lora_fa", "lora-fa"),
    "Delta-LoRA": ("delta_lora:warmup_steps=10", "delta_lora", "delta-lora"),
    "QLoRA": ("qlora", "qlora", "qlora"),
    "LoRA+": ("loraplus", None, "loraplus"),
    "full fine-tuning": ("full", "full", ""),
}
# README's Q1 table: its row labels and order (text; the numbers come from q1.json).
README_Q1 = {
    "lora": "LoRA r 8",
    "full": "full fine-tuning",
    "dora": "DoRA (Liu)",
    "mora": "MoRA (type 6, r 8)",
    "dylora": "DyLoRA (r 8, evaluated at 8)",
    "lora_fa": "LoRA-FA",
    "qlora": "QLoRA (NF4 base)",
    "dora_dynamic:prune_interval=5": "DoRA-Mao (12 → 8, pruning every 5 steps)",
    "loraplus": "LoRA+ (ratio 16)",
    "delta_lora:warmup_steps=10": "Delta-LoRA (warm-up 10)",
    "vera": "VeRA (r 256)",
    "adalora": "AdaLoRA (12 → 8, PEFT's defaults)",
}
LORAPLUS_RATIO = 16  # bench/q1.py's ALIASES["loraplus"]


# -- reading -------------------------------------------------------------------------------------
def runs(name: str, results: Path = RESULTS) -> list[dict[str, Any]]:
    """The runs of ``bench/results/<name>.json``, oldest first ([] if the file is absent)."""
    path = results / f"{name}.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["runs"])


def rows_of(name: str, key: str, value: str, results: Path = RESULTS) -> list[tuple[dict, dict]]:
    """Every (row, run) whose ``row[key] == value``, oldest run first."""
    return [(row, run) for run in runs(name, results) for row in run["rows"]
            if row.get(key) == value]


def latest(name: str, key: str, value: str, field_name: str,
           results: Path = RESULTS) -> tuple[dict, dict] | None:
    """The newest (row, run) that measured ``field_name`` for that variant."""
    found = [(r, run) for r, run in rows_of(name, key, value, results)
             if r.get(field_name) is not None]
    return found[-1] if found else None


def run_id(run: dict[str, Any]) -> str:
    """A short, stable name for a run in tables: its date, or the commit it was imported from."""
    if run.get("date"):
        return str(run["date"])[:10]
    git = run.get("git") or {}
    return f"README@{str(git.get('commit', ''))[:7]}"


# -- formatting ----------------------------------------------------------------------------------
def fmt_spread(v: list[float] | None, digits: int = 3) -> str:
    if not v:
        return "—"
    if len(v) >= 3:
        return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"
    return f"{v[0]:.{digits}f}"


def fmt_mib(v: float | None) -> str:
    return "—" if v is None else f"{v:+.1f} MiB"


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def fmt_lr(lr: float) -> str:
    mantissa, exp = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exp)}"


def md_table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def source_note(run: dict[str, Any], precise: bool = False) -> str:
    cmd = run.get("command") or "(not recorded)"
    src = run.get("source", "bench run")
    extra = "" if src == "bench run" else f"; {src}"
    rid = run_id(run)
    if precise and run.get("date"):  # date and time: several runs of one command in a day
        rid = str(run["date"])[:16].replace("T", " ")
    return f"`{rid}`: `{cmd}`{extra}"


class _Sources:
    """Collects the runs a section cites, and lists them once under it."""

    def __init__(self, precise: bool = False) -> None:
        self.ids: dict[str, str] = {}
        self.precise = precise

    def cite(self, run: dict[str, Any]) -> str:
        note = source_note(run, self.precise)
        if note not in self.ids:
            self.ids[note] = f"R{len(self.ids) + 1}"
        return self.ids[note]

    def render(self) -> str:
        if not self.ids:
            return ""
        return "Runs:\n\n" + "\n".join(f"- **{i}** {n}" for n, i in self.ids.items()) + "\n"


# -- method pages --------------------------------------------------------------------------------
def q1_rows(variants: Iterable[str], src: _Sources, results: Path = RESULTS) -> list[list[str]]:
    out = []
    for v in variants:
        for row, run in rows_of("q1", "variant", v, results):
            acc = row["acc"]
            out.append([
                f"`{v}`", fmt_count(row["trainable"]), " / ".join(f"{a:.3f}" for a in acc),
                f"{sum(acc) / len(acc):.3f}", fmt_lr(row["lr"]),
                f"{row['saved_mib']:.1f} MiB", src.cite(run),
            ])
    return out


def step_rows(name: str, variants: Iterable[str], src: _Sources,
              results: Path = RESULTS) -> list[list[str]]:
    """Rows of a step benchmark (W1, W5): ours, then PEFT's figures where the run has them."""
    out = []
    for v in variants:
        for row, run in rows_of(name, "variant", v, results):
            peer = row.get("step_over_peer")
            label = row.get("label")  # imported rows keep the README's label, caveats included
            cell = f"`{v}`" + (f"<br><small>{label}</small>" if label else "")
            peft_step = row.get("peft_step_over_floor")
            out.append([
                cell, fmt_spread(row.get("step_over_floor")), fmt_spread(peer),
                fmt_mib(row.get("saved_above_floor_mib")),
                "—" if peft_step is None else f"{peft_step:.3f}",
                fmt_mib(row.get("peft_saved_above_floor_mib")), src.cite(run),
            ])
    return out


STEP_HEAD = ["variant", "step / floor", "step / peer", "saved activations above the floor",
             "PEFT's step / floor", "PEFT's saved above the floor", "run"]


def method_section(slug: str, results: Path = RESULTS) -> str:
    """The "Measured" section of a method page: every recorded row of its variants, with runs."""
    m = DOC_METHODS[slug]
    src = _Sources()
    parts: list[str] = []
    w1 = step_rows("w1", m.w1, src, results)
    if w1:
        parts.append("**W1: one training step** of a random-init Llama (hidden 512, 4 layers, "
                     "batch 4 × 256, fp32, r 16 on all seven projections), as a ratio to the "
                     "frozen floor, median [quartiles] of per-round ratios; the peer is PEFT's "
                     "counterpart (QLoRA's: peftkit's dense LoRA).\n")
        parts.append(md_table(STEP_HEAD, w1) + "\n")
    elif m.w1:
        parts.append(f"**W1**: no recorded run has measured `{'`, `'.join(m.w1)}` yet "
                     f"(`python bench/w1.py {' '.join(m.w1)}` records one).\n")
    w5 = step_rows("w5", m.w5, src, results)
    if w5:
        parts.append("**W5: a real model**, SmolLM2-135M-Instruct, one training step at batch "
                     "8 × 128, fp32, r 16 on all seven projections.\n")
        parts.append(md_table(STEP_HEAD, w5) + "\n")
    q1 = q1_rows(m.q1, src, results)
    if q1:
        parts.append("**Q1: quality on the default task**, all-MiniLM-L6-v2 on VADER, 100 steps × "
                     "32, lr chosen from a grid by dev accuracy; held-out accuracy on 1,000 "
                     "sentences for seeds 0 and 1 (the seed spread is about ±0.03: compare means). "
                     "Saved activations: everything autograd keeps on a fixed 32 × 64 batch. Every "
                     "run is listed, including reruns.\n")
        parts.append(md_table(["variant", "trainable", "accuracy (seeds 0 / 1)", "mean", "lr",
                               "saved activations", "run"], q1) + "\n")
    for extra in m.extra:
        parts.append(EXTRA[extra](src, results))
    parts.append(src.render())
    return "\n".join(p for p in parts if p)


def _w2(src: _Sources, results: Path) -> str:
    rows = [[r["operation"].replace("`", ""), f"{r['ratio']:.2f} ×" if r.get("ratio") is not None
             else f"{r['bits_per_param']} bits/parameter", src.cite(run)]
            for run in runs("w2", results)[-1:] for r in run["rows"]]
    if not rows:
        return ""
    return ("**W2: NF4 storage**, a 4096 × 4096 fp32 matrix, block 64, double quantization, "
            "against bitsandbytes in the same process.\n\n"
            + md_table(["operation", "peftkit / bitsandbytes", "run"], rows) + "\n")


def _w4(src: _Sources, results: Path) -> str:
    out = []
    for name, title in (("w4_s2", "**W4: S2-Attn, one attention layer** (batch 1, 8 heads, head "
                         "dim 64, group N/4, forward + backward) against full causal SDPA."),
                        ("w4_model", "**W4: a whole LongLoRA training step** (the W1 Llama, batch "
                         "1, `LongLoraConfig(r=8)`), S2-Attn against the model's own SDPA.")):
        rows = [[str(r["tokens"]), fmt_spread(r["step_over_full"]), f"{r['saved_over_full']:.2f}",
                 src.cite(run)]
                for run in runs(name, results) for r in run["rows"] if r.get("attention") == "s2"]
        if rows:
            out.append(title + "\n\n" + md_table(
                ["tokens", "time / full attention", "saved activations / full", "run"], rows))
    return "\n\n".join(out) + "\n" if out else ""


def _q2(src: _Sources, results: Path) -> str:
    rows = [[r["method"], str(r["seed"]), fmt_lr(r["lr"]), f"{r['final_exact_match']:.3f}",
             src.cite(run)] for run in runs("q2", results) for r in run["rows"]]
    if not rows:
        return ""
    return ("**Q2: memorisation in miniature** (frozen random 2-layer Llama, 256 pairs of 8 hex "
            "characters, equal trainable parameters): final exact match.\n\n"
            + md_table(["method", "seed", "lr", "exact match", "run"], rows) + "\n")


def _q3(src: _Sources, results: Path) -> str:
    rows = []
    for run in runs("q3", results):
        for r in run["rows"]:
            def mean(k: str, r: dict[str, Any] = r) -> str:
                return f"{sum(r[k]) / len(r[k]):.3f}"
            rows.append([str(r["rank"]), mean("dylora"), mean("lora_truncated_alpha_over_b"),
                         mean("lora_truncated_alpha_over_r"), mean("lora_trained_at_b"),
                         src.cite(run)])
    if not rows:
        return ""
    return ("**Q3: one DyLoRA training evaluated at every rank** b, against a LoRA trained at "
            "r 8 and truncated (at scale α/b and at its trained scale α/8) and LoRA trained at "
            "each rank; held-out accuracy on Q1's task (mean over the run's seeds).\n\n"
            + md_table(["rank b", "DyLoRA", "LoRA r 8 truncated, α/b",
                        "LoRA r 8 truncated, α/8", "LoRA trained at b", "run"], rows) + "\n")


def _q4(src: _Sources, results: Path) -> str:
    out = []
    for run in runs("q4", results):
        rows = [r for r in run["rows"] if r.get("needle") == "uniform"]
        if not rows:
            continue
        lengths = list(rows[0]["exact_match"])
        ident = src.cite(run)
        out.append(md_table(
            ["model (needle depth uniform)", *lengths, "run"],
            [[r["model"], *(f"{r['exact_match'][n]:.2f}" for n in lengths), ident]
             for r in rows]))
    if not out:
        return ""
    return ("**Q4: passkey retrieval in miniature**: a 2-layer Llama pre-trained at 256 tokens, "
            "extended to 1,024 with `LongLoraConfig(r=8, context_factor=4)`; exact match by "
            "context length, full attention at inference.\n\n" + "\n\n".join(out) + "\n")


def mixed_section(results: Path = RESULTS) -> str:
    """The multi-adapter guide's "Measured" section: every W3 run (mixed batches against the
    base and PEFT) and every serve run (tokens/s through one server)."""
    src = _Sources(precise=True)
    parts: list[str] = []
    w3 = []
    for run in runs("w3", results):
        got = {(r.get("phase"), r.get("variant")): r for r in run["rows"]}

        def cell(phase: str, variant: str, key: str = "ratio_to_base",
                 got: dict[Any, Any] = got) -> str:
            r = got.get((phase, variant))
            return "—" if r is None or r.get(key) is None else f"{r[key]:.3f}"

        if ("generate", "mixed") in got or ("prefill", "mixed") in got:
            w3.append([cell("prefill", "mixed"), cell("generate", "mixed"),
                       cell("prefill", "peft-mixed"), cell("generate", "peft-mixed"),
                       cell("generate", "r128"),
                       cell("generate", "many/mixed", "ratio_to_mixed"), src.cite(run)])
    if w3:
        parts.append("**W3: mixed-adapter batches**: the W1 Llama in eval mode, 8 LoRA adapters "
                     "of r 16 on all seven projections, 8 rows each through its own adapter; "
                     "prefill 8 × 256 tokens, generate 32 greedy tokens from 8 × 64; time / the "
                     "base model's, median of interleaved rounds. *r 128*: one adapter holding "
                     "the eight adapters' bytes, no route. *64/8*: 64 adapters loaded against 8, "
                     "8 used, paired per round.\n")
        parts.append(md_table(["mixed prefill", "mixed generate", "PEFT mixed prefill",
                               "PEFT mixed generate", "r 128 generate", "64/8 generate", "run"],
                              w3) + "\n")
    serve = []
    for run in runs("serve", results):
        got = {r.get("workload"): r for r in run["rows"]}

        def tps(w: str, got: dict[Any, Any] = got) -> str:
            r = got.get(w)
            return "—" if r is None else f"{r['tokens_per_s']:.1f}"

        ratio = paired = "—"
        if "mixed" in got and "base" in got:
            ratio = f"{got['mixed']['tokens_per_s'] / got['base']['tokens_per_s']:.2f}"
            rounds = got["mixed"].get("rounds_ratio_to_base")
            if rounds:
                paired = f"{statistics.median(rounds):.2f} ({min(rounds):.2f}–{max(rounds):.2f})"
        serve.append([tps("mixed"), tps("base"), ratio, paired, tps("floor"), tps("sequential"),
                      tps("transformers-cb"), src.cite(run)])
    if serve:
        parts.append("**Serving**: `peftkit serve` on SmolLM2-135M-Instruct (CPU, fp32, 1 thread), "
                     "8 adapters of r 16, 64 requests of 64 + 64 tokens, 16 at a time, streamed; "
                     "output tokens/s (median over rounds); *per round*: mixed / base within "
                     "each round (the two run back to back), median (range). *floor*: every "
                     "request to one adapter "
                     "of rank 128; *one at a time*: 8 mixed requests in a row; *transformers "
                     "serve*: with `--continuous-batching`, base model, same client.\n")
        parts.append(md_table(["mixed", "base", "mixed / base", "per round", "floor",
                               "one at a time",
                               "transformers serve", "run"], serve) + "\n")
    parts.append(src.render())
    return "\n".join(p for p in parts if p)


EXTRA = {"w2": _w2, "w4": _w4, "q2": _q2, "q3": _q3, "q4": _q4}


# -- chooser -------------------------------------------------------------------------------------
@dataclass
class ChooserRow:
    label: str
    page: str
    trainable: int | None = None
    acc: list[float] | None = None
    q1_saved: float | None = None
    q1_run: dict[str, Any] | None = None
    step: list[float] | None = None  # from the W1 base run (see chooser_rows)
    w1_saved: float | None = None
    w1_run: dict[str, Any] | None = None
    newer_step: float | None = None  # a later W1 run's median, where one measured the variant
    newer_run: dict[str, Any] | None = None


def w1_base_run(results: Path = RESULTS) -> dict[str, Any] | None:
    """The W1 run that measured the most of the chooser's methods (the newest such run): time
    ratios compare across methods only within one process, so the chooser takes them from one."""
    wanted = {w for _, w, _ in CHOOSER.values() if w}
    best, best_n = None, 0
    for run in runs("w1", results):
        n = len(wanted & {r.get("variant") for r in run["rows"]
                          if r.get("step_over_floor") is not None})
        if n >= best_n and n > 0:
            best, best_n = run, n
    return best


def chooser_rows(results: Path = RESULTS) -> list[ChooserRow]:
    """Per method: its newest Q1 row; W1 figures from the base run, plus a later run's median
    step ratio where a later run measured the method again."""
    base = w1_base_run(results)
    base_index = next((i for i, r in enumerate(runs("w1", results))
                       if base is not None and source_note(r) == source_note(base)), -1)
    out = []
    for label, (q1v, w1v, page) in CHOOSER.items():
        c = ChooserRow(label, page)
        found = latest("q1", "variant", q1v, "acc", results)
        if found:
            row, c.q1_run = found
            c.trainable, c.acc, c.q1_saved = row["trainable"], row["acc"], row["saved_mib"]
        if w1v is not None and base is not None:
            row = next((r for r in base["rows"] if r.get("variant") == w1v), None)
            if row is not None:
                c.step, c.w1_saved, c.w1_run = (row.get("step_over_floor"),
                                                row.get("saved_above_floor_mib"), base)
            for later in runs("w1", results)[base_index + 1:]:
                for r in later["rows"]:
                    if r.get("variant") == w1v and r.get("step_over_floor"):
                        c.newer_step, c.newer_run = r["step_over_floor"][0], later
        out.append(c)
    return out


def chooser_table(results: Path = RESULTS, link_prefix: str = "methods/") -> str:
    src = _Sources()
    rows = []
    for c in chooser_rows(results):
        name = f"[{c.label}]({link_prefix}{c.page}.md)" if c.page else c.label
        acc = (f"{sum(c.acc) / len(c.acc):.3f} ({' / '.join(f'{a:.3f}' for a in c.acc)})"
               if c.acc else "—")
        step = fmt_spread(c.step)
        if c.w1_run is not None and c.step:
            step += f" ({src.cite(c.w1_run)})"
        if c.newer_step is not None and c.newer_run is not None:
            step += f"; a later run: {c.newer_step:.3f} ({src.cite(c.newer_run)})"
        q1 = f" ({src.cite(c.q1_run)})" if c.q1_run else ""
        rows.append([
            name, fmt_count(c.trainable) if c.trainable is not None else "—", acc + q1,
            f"{c.q1_saved:.1f} MiB" if c.q1_saved is not None else "—",
            step, fmt_mib(c.w1_saved),
        ])
    table = md_table(["method", "trainable (Q1)", "Q1 accuracy, mean (seeds 0 / 1)",
                      "Q1 saved activations", "W1 step / floor", "W1 saved above floor"], rows)
    return table + "\n\n" + src.render()


def sources_list(results: Path = RESULTS) -> str:
    """Every results file and its runs: command, date, machine, versions, source."""
    lines = []
    for path in sorted(results.glob("*.json")):
        name = path.stem
        lines.append(f"### `{path.name}`\n")
        for run in runs(name, results):
            versions = run.get("versions") or {}
            vs = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "not recorded"
            lines.append(f"- `{run_id(run)}` · `{run.get('command') or '(not recorded)'}` · "
                         f"{len(run['rows'])} row(s) · versions: {vs} · source: "
                         f"{run.get('source', 'bench run')}")
        lines.append("")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def plots(results: Path = RESULTS) -> dict[str, bytes]:
    """The chooser's figures as PNG bytes, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = chooser_rows(results)
    out: dict[str, bytes] = {}

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    # 1. accuracy against trainable parameters
    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [(c, sum(c.acc) / len(c.acc)) for c in rows if c.acc and c.trainable is not None]
    for c, mean in pts:
        ax.errorbar(c.trainable, mean, yerr=[[mean - min(c.acc)], [max(c.acc) - mean]],  # type: ignore[arg-type,type-var]
                    fmt="o", capsize=3, color="tab:gray" if c.page == "" else "tab:blue")
    # Labels: points with nearly equal parameter counts form a column; their labels are spread
    # vertically to the right of it, with a leader line to each point.
    if pts:
        lo = min(min(c.acc) for c, _ in pts)  # type: ignore[type-var]
        hi = max(max(c.acc) for c, _ in pts)  # type: ignore[type-var]
        gap = (hi - lo) * 0.055
        clusters: list[list[tuple[ChooserRow, float]]] = []
        for c, mean in sorted(pts, key=lambda p: p[0].trainable or 0):
            if clusters and math.log10(c.trainable or 1) - math.log10(
                    clusters[-1][-1][0].trainable or 1) < 0.25:
                clusters[-1].append((c, mean))
            else:
                clusters.append([(c, mean)])
        for cluster in clusters:
            x = max(c.trainable or 1 for c, _ in cluster) * 2.2
            placed: list[float] = []
            for c, mean in sorted(cluster, key=lambda p: -p[1]):
                y = mean if not placed else min(mean, placed[-1] - gap)
                placed.append(y)
                ax.annotate(c.label, (c.trainable, mean), xytext=(x, y), fontsize=8,
                            va="center", arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 6)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out accuracy (mean of 2 seeds; bars: the seeds)")
    ax.set_title("Q1: all-MiniLM-L6-v2 on VADER, 100 steps")
    ax.grid(True, alpha=0.3)
    out["accuracy_vs_params.png"] = png(fig)

    # 2. step time (W1, ratio to the frozen floor), all from one run; later runs as markers
    have = [c for c in rows if c.step]
    missing = [c.label for c in rows if not c.step]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(have) + 1.8))
    ys = list(range(len(have)))[::-1]
    newer_drawn = False
    for y, c in zip(ys, have, strict=True):
        step = c.step or []
        med = step[0]
        lo, hi = (step[1], step[2]) if len(step) >= 3 else (med, med)
        ax.barh(y, med - 1.0, left=1.0, color="tab:blue", alpha=0.7)
        ax.errorbar(med, y, xerr=[[med - lo], [hi - med]], fmt="none", color="black", capsize=3)
        ax.text(max(hi, med) + 0.005, y, f"{med:.3f}", va="center", fontsize=8)
        if c.newer_step is not None:
            ax.plot([c.newer_step], [y], marker="D", color="tab:orange", linestyle="none",
                    label=None if newer_drawn else "a later run (its own floor)")
            newer_drawn = True
    ax.set_yticks(ys, [c.label for c in have])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("W1 step time / frozen floor (median, bars: quartiles); 1.0 = the floor")
    when = run_id(rows[0].w1_run) if rows and rows[0].w1_run else ""
    ax.set_title(f"W1: one training step, random-init Llama 512 × 4, CPU (one run, {when})",
                 fontsize=10)
    if newer_drawn:
        ax.legend(loc="lower right", fontsize=8)
    if missing:
        fig.text(0.01, 0.01, "not measured in that run: " + ", ".join(missing), fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    out["step_time.png"] = png(fig)

    # 3. saved activations (Q1, every method, deterministic)
    have = [c for c in rows if c.q1_saved is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(have) + 1.4))
    ys = list(range(len(have)))[::-1]
    ax.barh(ys, [c.q1_saved for c in have], color="tab:green", alpha=0.7)  # type: ignore[misc]
    for y, c in zip(ys, have, strict=True):
        ax.text(c.q1_saved + 3, y, f"{c.q1_saved:.1f}", va="center", fontsize=8)  # type: ignore[operator]
    ax.set_yticks(ys, [c.label for c in have])
    ax.set_xlabel("MiB autograd saves for backward, MiniLM on a fixed 32 × 64 batch")
    ax.set_title("Saved activations (Q1's probe; deterministic)")
    top = max((c.q1_saved or 0.0) for c in have) if have else 1.0
    ax.set_xlim(0, top * 1.12 if math.isfinite(top) else 1.0)
    ax.grid(True, axis="x", alpha=0.3)
    out["saved_activations.png"] = png(fig)
    return out


# -- README --------------------------------------------------------------------------------------
def readme_q1_table(results: Path = RESULTS) -> str:
    """README's Q1 table, from the newest q1.json run of each variant."""
    rows = []
    for variant, label in README_Q1.items():
        found = latest("q1", "variant", variant, "acc", results)
        if not found:
            continue
        r = found[0]
        acc = r["acc"]
        lr = fmt_lr(r["lr"])
        if variant == "loraplus":
            lr += f" (B: {fmt_lr(r['lr'] * LORAPLUS_RATIO)})"
        rows.append([label, fmt_count(r["trainable"]), *(f"{a:.3f}" for a in acc),
                     f"{sum(acc) / len(acc):.3f}", lr])
    return md_table(["method", "trainable", "seed 0", "seed 1", "mean", "lr"], rows)


def _readme_q1_span(text: str) -> tuple[int, int]:
    start = text.index("| method | trainable | seed 0 | seed 1 | mean | lr |")
    m = re.compile(r"\n(?!\|)").search(text, start)
    return start, (m.start() if m else len(text))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plots")
    p.add_argument("out", type=Path)
    p = sub.add_parser("method")
    p.add_argument("slug", choices=sorted(DOC_METHODS))
    sub.add_parser("chooser")
    p = sub.add_parser("readme")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "plots":
        args.out.mkdir(parents=True, exist_ok=True)
        for name, data in plots().items():
            (args.out / name).write_bytes(data)
            print(args.out / name)
    elif args.cmd == "method":
        print(method_section(args.slug))
    elif args.cmd == "chooser":
        print(chooser_table())
    else:
        text = README.read_text(encoding="utf-8")
        a, b = _readme_q1_span(text)
        table = readme_q1_table()
        if args.write:
            README.write_text(text[:a] + table + text[b:], encoding="utf-8")
        elif text[a:b] != table:
            sys.exit("README's Q1 table differs from bench/results/q1.json; run "
                     "`python bench/report.py readme --write`")
        print("README's Q1 table is the one bench/results/q1.json gives")


if __name__ == "__main__":
    main()
