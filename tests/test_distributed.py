"""Distributed training on torch's own engines: DDP and FSDP2, 2 processes, gloo, CPU, float64.

Each case launches ``tests/dist_worker.py`` under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        tests/dist_worker.py --engine {ddp,fsdp2} --method {lora,dylora,dora} --out DIR

and checks that the adapter after 3 AdamW steps on 2 processes (each on half of the global batch)
equals one process trained on the whole batch, to ≤ 1e-10 (float64: only the all-reduce's summation
order differs; measured ~1e-16). DyLoRA's drawn ranks must agree on every rank and with the
reference. Under FSDP2, ``save_adapter`` gathers the shards (every rank calls it), rank 0 alone
writes one full file, and that file loaded into a fresh, non-distributed model reproduces the
single-process model's logits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.state import adapter_tensors

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

import dist_worker  # noqa: E402

TOL = 1e-10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(engine: str, method: str, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(HERE / "dist_worker.py"),
        "--engine",
        engine,
        "--method",
        method,
        "--out",
        str(out),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (
        f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    doc: dict[str, Any] = json.loads((out / "ranks.json").read_text(encoding="utf-8"))
    return doc


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "method"),
    [(e, m) for e in ("ddp", "fsdp2") for m in ("lora", "dylora", "dora")],
)
def test_distributed_equals_single_process(tmp_path: Path, engine: str, method: str) -> None:
    doc = launch(engine, method, tmp_path)
    ranks = doc["ranks"]
    assert doc["world"] == 2 and len(ranks) == 2

    # The state is found through the wrapper (DDP's .module; FSDP2 keeps the module itself).
    for r in ranks:
        assert r["unwrap_is_model"] and r["state_found"], r
    if engine == "fsdp2":
        assert all(r["sharded"] for r in ranks), "fully_shard left the adapter unsharded"

    # Rank 0 alone wrote, exactly one safetensors file.
    assert [r["writes"] for r in sorted(ranks, key=lambda r: r["rank"])] == [1, 0]
    assert not [p.name for p in (tmp_path / "dist").iterdir() if ".tmp-" in p.name]

    # DyLoRA: one rank sequence everywhere, the reference's, and not constant.
    if method == "dylora":
        drawn = [r["drawn"] for r in ranks]
        assert drawn[0] == drawn[1] == doc["ref_drawn"]
        assert len(drawn[0]) == dist_worker.STEPS and len(set(drawn[0])) > 1

    dist = load_file(str(tmp_path / "dist" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    init = {k: v.detach().clone() for k, v in adapter_tensors(dist_worker.adapted(method)).items()}
    # Full, unsharded tensors of the model's real shapes, in float64.
    for k, t in init.items():
        assert dist[k].shape == t.shape and dist[k].dtype == torch.float64, k
    assert max_diff(ref, init) > 1e-3, "training did not move the adapter; the test is vacuous"
    assert max_diff(dist, ref) <= TOL

    # The FSDP2-written (or DDP-written) file loads into a fresh, non-distributed model and
    # reproduces the single-process model's logits.
    fresh = peftkit.load_adapter(dist_worker.tiny_llama(0), tmp_path / "dist")
    with torch.no_grad():
        logits = fresh(input_ids=dist_worker.probe()).logits  # (B, T, V)
    ref_logits = load_file(str(tmp_path / "ref_logits.safetensors"))["logits"]
    assert float((logits - ref_logits).abs().max()) <= TOL
