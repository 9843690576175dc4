"""Shared pieces of the benchmarks: the W1 model, saved-activation counting, interleaved timing.

Every figure is a ratio measured in one process (see ../shared/BENCHMARKS.md in the team docs):
models are interleaved A B C A B C … after a warm-up and the median ratio is reported with its
quartiles.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

W1_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def w1_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """W1: a random-init Llama, hidden 512, 4 layers, 8 heads, MLP 1408, vocab 4096."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    # Note: a training step keeps no KV cache (with one, attention saves a cache copy of v instead
    # of v_proj's output, which costs every method that saves that output a second copy).
    cfg.use_cache = False
    return LlamaForCausalLM(cfg).to(dtype).train()


def w1_batch(batch: int = 4, seq: int = 256, vocab: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def freeze_to_floor(model: nn.Module) -> nn.Module:
    """The frozen floor: every weight frozen but the input embedding."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


class Step:
    """One training step of a model: forward with labels, backward, AdamW step, zero_grad."""

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        lr: float = 1e-4,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model, self.ids = model, ids
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = optimizer or torch.optim.AdamW(params, lr=lr)

    def __call__(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def saved_activation_bytes(model: nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``run()`` (a forward
    returning a loss or output), each storage counted once; a backward follows so nothing leaks.
    Parameters and frozen buffers are storages too, but they exist anyway: only storages not
    owned by the model count."""
    owned = {t.untyped_storage().data_ptr() for t in model.parameters()}
    owned |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in owned and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def interleaved(
    steps: dict[str, Callable[[], Any]], rounds: int = 20, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per step for each entry, measured A B C A B C … after ``warmup`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            gc.collect()
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def select_variants(
    ap: Any, requested: list[str], variants: dict[str, tuple[Any, str | None]]
) -> list[str]:
    """The floor, then the requested variants (all if none), then any peer they compare with;
    an unknown name ends the run through ``ap.error``."""
    names = requested or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(variants)}")
    names = ["floor"] + [n for n in names if n != "floor"]
    for n in list(names):
        peer = variants[n][1]
        if peer is not None and peer not in names:
            names.append(peer)
    return names


def print_report(
    title: str,
    names: list[str],
    variants: dict[str, tuple[Any, str | None]],
    times: dict[str, list[float]],
    saved: dict[str, int],
    peer_header: str,
) -> list[dict[str, Any]]:
    """The markdown table: step / floor, step / peer, saved activations above the floor; returns
    the same figures as rows for :func:`write_results`."""
    floor = ratio_stats(times, "floor")
    floor_s = sorted(times["floor"])[len(times["floor"]) // 2]
    print(f"{title}; floor step {floor_s:.3f} s")
    print()
    print(f"| variant | step / floor (median [q1, q3]) | {peer_header} "
          "| saved activations above floor |")
    print("|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    for n in names:
        med, q1, q3 = floor[n]
        peer = variants[n][1]
        vs = "—"
        row: dict[str, Any] = {"variant": n, "step_over_floor": [med, q1, q3], "peer": None}
        if peer is not None and peer in times:
            pm, pq1, pq3 = ratio_stats(times, peer)[n]
            vs = f"{pm:.3f} [{pq1:.3f}, {pq3:.3f}]"
            row.update(peer=peer, step_over_peer=[pm, pq1, pq3])
        extra = (saved[n] - saved["floor"]) / 2**20
        row.update(saved_above_floor_mib=extra, step_seconds_median=statistics.median(times[n]))
        rows.append(row)
        print(f"| {n} | {med:.3f} [{q1:.3f}, {q3:.3f}] | {vs} | {extra:+.1f} MiB |")
    return rows


#: Units of the rows :func:`print_report` returns.
STEP_UNITS = {
    "step_over_floor": "median, q1, q3 of the per-round ratio of step time to the frozen floor",
    "step_over_peer": "median, q1, q3 of the per-round ratio of step time to the peer's",
    "saved_above_floor_mib": "MiB autograd saves for backward above the floor (deterministic)",
    "step_seconds_median": "absolute seconds (shared machine: compare ratios, not these)",
}


def ratio_stats(times: dict[str, list[float]], ref: str) -> dict[str, tuple[float, float, float]]:
    """Per entry: median, 25th and 75th percentile of the per-round ratio to ``ref``."""
    out = {}
    for name, ts in times.items():
        ratios = sorted(a / b for a, b in zip(ts, times[ref], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = (statistics.median(ratios), q[0], q[2])
    return out


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_record(source: str = "bench run") -> dict[str, Any]:
    """What every result carries: the command, the date, the machine and the library versions."""
    import datetime
    import os
    import platform
    import shlex
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "peftkit"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10,
        ).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "source": source,
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": versions,
        "git": {"commit": commit, "dirty": dirty},
    }


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    *,
    units: dict[str, str] | None = None,
    notes: str | None = None,
    results_dir: Path | None = None,
) -> Path:
    """Append one run to ``bench/results/<name>.json`` (a list of runs, oldest first).

    ``rows`` are plain dicts of numbers and strings, one per measured variant; ``units`` says what
    each numeric column means. The run records its command, date, machine and versions
    (:func:`run_record`), so every number in the docs can be traced to the run that produced it
    (``bench/report.py`` builds the docs' tables and plots from these files). The folder can be
    redirected with ``PEFTKIT_RESULTS_DIR`` (smoke runs)."""
    import json
    import os

    folder = Path(results_dir or os.environ.get("PEFTKIT_RESULTS_DIR") or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    doc: dict[str, Any] = {"benchmark": name, "runs": []}
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
    run = run_record()
    run.update({"units": units or {}, "notes": notes, "rows": rows})
    doc["runs"].append(run)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"results: appended a run of {len(rows)} row(s) to {path}", file=sys.stderr)
    return path
