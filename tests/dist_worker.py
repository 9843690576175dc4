"""Worker for tests/test_distributed.py, launched by torchrun (gloo backend, CPU, float64):

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        tests/dist_worker.py --engine {ddp,fsdp2} --method {lora,dylora,dora} --out DIR

Every rank builds the same tiny Llama (seeded, float64, dropout off), adapts it, wraps it in
DistributedDataParallel or FSDP2 (``fully_shard`` on each decoder layer, then the root; ``adapt``
comes first, the usual order) and runs ``STEPS`` AdamW steps, each on its slice of one global
batch of ``GLOBAL_BATCH`` sequences. Each step's loss is the token mean over the local slice;
equal slices make the all-reduced (averaged) gradient the gradient of the global token mean, so
the result must equal one process training on the whole batch.

Rank 0 also trains that single-process reference. Written to ``--out``:
``dist/`` (``peftkit.save_adapter`` of the distributed model, every rank calling it),
``ref/`` (the reference's adapter), ``ref_logits.safetensors`` (the reference's logits on
:func:`probe`), ``ranks.json`` (each rank's DyLoRA rank per step and what
``unwrap``/``get_state`` found through the wrapper, and how many safetensors files it wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import peftkit
import peftkit.files
from peftkit.core import get_state, unwrap

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 24  # 48 tokens per rank: DoRA takes its folded path on every target
VOCAB = 128
LR = 1e-2
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama from config, float64, no dropout anywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(cfg).to(torch.float64)


def config(method: str) -> peftkit.AdapterConfig:
    if method == "lora":
        return peftkit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    if method == "dylora":
        return peftkit.DyLoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, seed=3, target_modules=TARGETS
        )
    if method == "dora":
        return peftkit.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=TARGETS
        )
    raise ValueError(f"unknown method {method!r}; use lora, dylora or dora")


def adapted(method: str) -> nn.Module:
    """The model every process starts from: base seed 0, adapter init seed 1."""
    model = tiny_llama(0)
    torch.manual_seed(1)
    peftkit.adapt(model, config(method))
    # Note: B = 0 at init leaves A without gradient on step 1; a non-zero B makes every factor
    # move from the first step, a stronger comparison.
    with torch.no_grad():
        for _, layer in peftkit.adapters(model):
            layer.lora_B.normal_(0.0, 0.1)
    return model.train()


def global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=g)  # (steps, B, T)


def probe() -> torch.Tensor:
    """Inputs on which the saved adapter's logits are compared."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)  # (B, T)


def train(model: nn.Module, method: str, batches: torch.Tensor) -> list[int]:
    """``STEPS`` AdamW steps; returns the DyLoRA training rank used at each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=False)
    peftkit.attach(opt, model)
    drawn: list[int] = []
    for step in range(STEPS):
        if method == "dylora":
            drawn.append(next(a for _, a in peftkit.adapters(model)).train_rank)
        ids = batches[step]  # (b, T)
        loss = model(input_ids=ids, labels=ids).loss  # token mean over the local slice
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return drawn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--method", choices=["lora", "dylora", "dora"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert GLOBAL_BATCH % world == 0, "the global batch must split evenly"
    per = GLOBAL_BATCH // world
    batches = global_batch()

    found: dict[str, Any] = {}
    model = adapted(args.method)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped: nn.Module = DistributedDataParallel(model)
        found["unwrap_is_model"] = unwrap(wrapped) is model
        found["state_found"] = get_state(wrapped, required=False) is not None
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
        found["unwrap_is_model"] = unwrap(wrapped) is model
        found["state_found"] = get_state(wrapped, required=False) is not None
        found["sharded"] = any(
            hasattr(p, "full_tensor") for p in model.parameters() if p.requires_grad
        )
    drawn = train(wrapped, args.method, batches[:, rank * per : (rank + 1) * per])

    # Note: gathering FSDP2 shards is a collective, so every rank calls save_adapter; only rank 0
    # writes. Count the safetensors writes each rank makes.
    writes = []
    real_save = peftkit.files.save_file

    def counting_save(tensors: dict[str, torch.Tensor], path: str, **kw: Any) -> None:
        writes.append(path)
        real_save(tensors, path, **kw)

    peftkit.files.save_file = counting_save  # type: ignore[assignment]
    try:
        peftkit.save_adapter(wrapped, out / "dist")
    finally:
        peftkit.files.save_file = real_save  # type: ignore[assignment]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, {"rank": rank, "drawn": drawn, "writes": len(writes), **found})

    if rank == 0:
        ref = adapted(args.method)
        ref_drawn = train(ref, args.method, batches)
        peftkit.save_adapter(ref, out / "ref")
        ref.eval()
        with torch.no_grad():
            logits = ref(input_ids=probe()).logits  # (B, T, V)
        save_file({"logits": logits.contiguous()}, str(out / "ref_logits.safetensors"))
        doc = {"ranks": everyone, "ref_drawn": ref_drawn, "world": world}
        (out / "ranks.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    # Note: skip the interpreter's teardown: gloo's and FSDP2's threads can abort it ("terminate
    # called without an active exception") after the work is done and the group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
