"""``peftkit inspect``: method, targets, ranks, parameters and bytes of an adapter folder, read
from ``adapter_config.json`` and the safetensors header alone (no model, no tensor data); with
``--plot``, a heatmap of rank per module (or DyLoRA's metric-by-rank curve).

``summarize_adapter`` is also what ``peftkit export`` reports its ranks with."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..state import PREFIX, WEIGHTS_NAME, read_adapter_config
from .common import RANK_CURVE, CliError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="method, targets, ranks, parameters, bytes of an adapter")
    p.add_argument("adapter", help="an adapter folder (peftkit's or PEFT's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw a heatmap of rank per module")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = summarize_adapter(args.adapter)
    if args.plot is not None:
        plot_ranks(summary, args.plot)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"adapter    {summary['path']}")
    print(f"method     {summary['method']} (peft_type {summary['peft_type']})")
    if summary["base_model"]:
        print(f"base model {summary['base_model']}")
    print(f"targets    {_short_targets(summary['targets'])} -> {len(summary['modules'])} modules")
    print(f"ranks      {summary['rank_summary']}")
    for name, n in summary["modules_to_save"].items():
        print(f"in full    {name} ({n:,} parameters)")
    print(
        f"parameters {summary['trainable_parameters']:,} trainable"
        + (f" (+ {summary['frozen_parameters']:,} frozen)" if summary["frozen_parameters"] else "")
    )
    files = ", ".join(f"{k} {v:,}" for k, v in summary["files"].items())
    print(f"on disk    {summary['bytes']:,} bytes ({files})")
    width = max((len(m) for m in summary["modules"]), default=6)
    print()
    print(f"{'module':<{width}}  {'rank':>5}  {'params':>10}")
    for name, m in summary["modules"].items():
        rank = "?" if m["rank"] is None else str(m["rank"])
        print(f"{name:<{width}}  {rank:>5}  {m['parameters']:>10,}")
    if args.plot is not None:
        print(f"\nwrote      {args.plot}")
    return 0


def _short_targets(targets: str) -> str:
    """Full module paths (as export_lora and PEFT's all-linear write them) shown by their tails."""
    names = [t.strip() for t in targets.split(",")]
    if len(names) <= 4 or not all("." in n for n in names):
        return targets
    tails = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(tails)} (listed as {len(names)} full paths)"


# -- inspect without a model ----------------------------------------------------------------------
_FROZEN_PARTS = (".base_layer.",)
_FROZEN_SHARED = ("vera_A", "vera_B")
_ADAPTER_PARTS = ("lora_", "vera_", "base_layer", "modules_to_save")


def _owner(path: str, targets: Any, saved: Sequence[str]) -> tuple[str, str]:
    """``(module path, kind)`` for a tensor key (``base_model.model.`` stripped); kind is
    ``"adapter"`` or ``"saved"``. The deepest prefix that the config's targets select wins."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix, tail = ".".join(parts[:i]), parts[i - 1]
        # PEFT matches modules_to_save on a name's tail, which may span several parts.
        if any(prefix == s or prefix.endswith(f".{s}") for s in saved):
            return prefix, "saved"
        if isinstance(targets, str):
            if targets != "all-linear" and re.fullmatch(targets, prefix):
                return prefix, "adapter"
        elif tail in targets:
            return prefix, "adapter"
    for i, part in enumerate(parts):
        if i and part.startswith(_ADAPTER_PARTS):
            return ".".join(parts[:i]), "adapter"
    return ".".join(parts[:-1]), "adapter"


def _rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank of one module from its tensor shapes: A is (r, in) in every LoRA-shaped layout;
    VeRA's λ_d has one entry per rank; otherwise the smallest side of a 2-D factor."""
    for suffix in ("lora_A.weight", "lora_embedding_A", "lora_A"):
        if suffix in shapes and shapes[suffix]:
            return int(shapes[suffix][0])
    for suffix in ("vera_lambda_d", "lambda_d"):
        if suffix in shapes:
            n = 1
            for s in shapes[suffix]:
                n *= s
            return n
    sides = [min(s) for s in shapes.values() if len(s) == 2]
    return min(sides) if sides else None


def summarize_adapter(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Method, targets, per-module ranks, parameters and bytes of an adapter folder, read from
    ``adapter_config.json`` and the safetensors header alone (no model, no tensor data)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(directory)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CliError(f"{weights}: missing; {folder} has a config but no safetensors weights")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CliError(f"{weights}: unreadable safetensors file ({e})") from None
    targets = config.get("target_modules") or ()
    if isinstance(targets, list):
        targets = tuple(targets)
    saved = tuple(config.get("modules_to_save") or ())
    modules: dict[str, dict[str, Any]] = {}
    in_full: dict[str, int] = {}
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    trainable = frozen = 0
    for key, shape in sorted(shapes.items()):
        numel = 1
        for s in shape:
            numel *= s
        if not key.startswith(PREFIX):  # shared state, e.g. VeRA's base_model.vera_A
            if key.rsplit(".", 1)[-1] in _FROZEN_SHARED:
                frozen += numel
            else:
                trainable += numel
            continue
        path = key[len(PREFIX) :]
        if any(p in f".{path}." for p in _FROZEN_PARTS):
            frozen += numel
            continue
        trainable += numel
        owner, kind = _owner(path, targets, saved)
        if kind == "saved":
            in_full[owner] = in_full.get(owner, 0) + numel
            continue
        grouped.setdefault(owner, {})[path[len(owner) + 1 :]] = shape
        modules.setdefault(owner, {"rank": None, "parameters": 0})["parameters"] += numel
    for owner, tensors in grouped.items():
        modules[owner]["rank"] = _rank(tensors)
    ranks = sorted({m["rank"] for m in modules.values() if m["rank"] is not None})
    if len(ranks) == 1:
        rank_summary = f"{ranks[0]} on every module"
    elif ranks:
        rank_summary = f"{ranks[0]}..{ranks[-1]} (per module below)"
    else:
        rank_summary = "unknown"
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    method = config.get("peftkit_method") or (
        "dora" if config.get("use_dora") else str(config.get("peft_type", "?")).lower()
    )
    return {
        "path": str(folder),
        "method": method,
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "targets": targets if isinstance(targets, str) else ", ".join(targets),
        "rank_summary": rank_summary,
        "modules": modules,
        "modules_to_save": in_full,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "bytes": sum(files.values()),
        "files": files,
    }


def plot_ranks(summary: dict[str, Any], path: str) -> None:
    """A heatmap of rank per module (rows: layer indices, columns: module names within a layer);
    for a DyLoRA folder with ``peftkit eval --ranks`` results, the metric-by-rank curve instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    cells: dict[tuple[str, str], int] = {}
    for name, m in summary["modules"].items():
        hit = re.search(r"\.(\d+)\.", f".{name}.")
        layer = hit.group(1) if hit else "-"
        column = name[hit.end() - 1 :] if hit else name
        cells[(layer, column)] = m["rank"] if m["rank"] is not None else 0
    curve_file = Path(summary["path"]) / RANK_CURVE
    if curve_file.is_file():  # DyLoRA with `peftkit eval --ranks` results: the curve says more
        curve = json.loads(curve_file.read_text(encoding="utf-8"))
        xs = sorted(int(k) for k in curve["ranks"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, [curve["ranks"][str(x)] for x in xs], marker="o")
        ax.set_xlabel("rank used at inference (set_rank)")
        ax.set_ylabel(curve["metric"])
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.set_title(
            f"{summary['method']}: {curve['metric']} by rank ({Path(summary['path']).name})"
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    if not cells:
        raise CliError(f"{summary['path']}: no adapted modules to plot")
    rows = sorted(
        {r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0)
    )
    cols = sorted({c for _, c in cells})
    grid = [[cells.get((r, c), 0) for c in cols] for r in rows]  # (layers, module names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.35 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylabel("layer")
    ax.set_title(f"{summary['method']} ranks: {Path(summary['path']).name}")
    if len(rows) * len(cols) <= 400:
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, str(value), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
