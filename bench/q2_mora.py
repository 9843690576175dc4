"""Q2 — MoRA's memorisation task in miniature (Jiang et al., 2024, https://arxiv.org/abs/2405.12130).

A tiny random-init Llama learns N random pairs ``key → value`` of hex strings (UUID-like), through
adapters only (every base weight frozen), MoRA against LoRA at equal trainable parameters (the same
r: MoRA's r̂ = round(√((in+out)·r)) is chosen so that r̂² ≈ a rank-r LoRA's count). Sequences are
``<bos> key <sep> value``; the loss is on the value tokens only. Memorisation is scored on the
training pairs themselves: exact match of the whole value (teacher-forced argmax at every value
position, which equals greedy decoding exactly when all of them are right) and character accuracy.

    python bench/q2_mora.py                      # default size, ~3 min on 2 quiet cores
    python bench/q2_mora.py --pairs 128 --steps 200 --lrs 3e-3

Each method runs at every learning rate of ``--lrs``; the table shows, per method, the curve of the
rate with the best final exact match (all final figures are listed below it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_results  # noqa: E402

import peftkit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEX = 16
BOS, SEP = HEX, HEX + 1
VOCAB = HEX + 2


def make_pairs(n: int, key_len: int, value_len: int, seed: int) -> Tensor:
    """``(n, 1 + key_len + 1 + value_len)`` token ids: distinct random keys, random values."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, HEX, (n, key_len), generator=g)
    while len(torch.unique(keys, dim=0)) < n:  # astronomically rare for key_len ≥ 6
        keys = torch.randint(0, HEX, (n, key_len), generator=g)
    values = torch.randint(0, HEX, (n, value_len), generator=g)
    bos = torch.full((n, 1), BOS)
    sep = torch.full((n, 1), SEP)
    return torch.cat([bos, keys, sep, values], dim=1)


def tiny_lm(hidden: int, layers: int, seed: int, seq: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def config_for(method: str, r: int) -> peftkit.AdapterConfig | None:
    if method == "lora":
        return peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    if method == "mora1":
        return peftkit.MoraConfig(r=r, mora_type=1, target_modules=TARGETS)
    if method == "mora6":
        return peftkit.MoraConfig(r=r, mora_type=6, target_modules=TARGETS)
    if method == "full":
        return None
    raise ValueError(f"unknown method {method!r}; choose lora, mora1, mora6 or full")


@torch.no_grad()
def score(model: nn.Module, data: Tensor, value_len: int) -> tuple[float, float]:
    """(exact match, character accuracy) on the value positions, teacher-forced."""
    model.eval()
    logits = model(input_ids=data).logits  # (n, T, V)
    pred = logits[:, -value_len - 1 : -1].argmax(-1)  # (n, value_len): predicts each value token
    hit = pred == data[:, -value_len:]
    model.train()
    return hit.all(1).float().mean().item(), hit.float().mean().item()


def run(method: str, lr: float, args: argparse.Namespace, data: Tensor) -> dict[str, object]:
    model = tiny_lm(args.hidden, args.layers, args.seed, data.shape[1])
    cfg = config_for(method, args.r)
    if cfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        peftkit.adapt(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    labels = data.clone()
    labels[:, : -args.value_len] = -100  # loss on the value only
    curve: list[tuple[int, float, float]] = [(0, *score(model, data, args.value_len))]
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data), (args.batch,), generator=g)
        loss = model(input_ids=data[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, *score(model, data, args.value_len)))
    return {
        "method": method,
        "lr": lr,
        "params": n_train,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["lora", "mora1", "mora6"])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--key-len", type=int, default=8)
    ap.add_argument("--value-len", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = make_pairs(args.pairs, args.key_len, args.value_len, args.seed)
    results = [run(m, lr, args, data) for m in args.methods for lr in args.lrs]

    def final(res: dict[str, object]) -> tuple[float, float]:
        curve = res["curve"]
        assert isinstance(curve, list)
        return curve[-1][1], sum(c[1] for c in curve) / len(curve)

    best = {m: max((r for r in results if r["method"] == m), key=final) for m in args.methods}
    print(
        f"Q2: {args.pairs} pairs of {args.key_len}→{args.value_len} hex chars; Llama "
        f"hidden {args.hidden} × {args.layers} layers, random init, frozen; adapters on all seven "
        f"projections, r = {args.r}; AdamW, batch {args.batch}, {args.steps} steps, seed "
        f"{args.seed}"
    )
    print()
    head = " | ".join(
        f"{m} (lr {best[m]['lr']:g}, {best[m]['params']:,} params)" for m in args.methods
    )
    print(f"| step | {head} |")
    print("|---" * (len(args.methods) + 1) + "|")
    steps = [c[0] for c in best[args.methods[0]]["curve"]]  # type: ignore[union-attr]
    for i, s in enumerate(steps):
        cells = []
        for m in args.methods:
            _, em, ch = best[m]["curve"][i]  # type: ignore[index]
            cells.append(f"{em:.3f} ({ch:.3f})")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print()
    print("cells: exact match of the whole value (character accuracy)")
    print()
    for r in results:
        em, mean_em = final(r)
        print(
            f"- {r['method']} lr {r['lr']:g}: final exact match {em:.3f}, mean over the curve "
            f"{mean_em:.3f}, {r['seconds']:.0f} s"
        )
    rows = [{"method": r["method"], "lr": r["lr"], "seed": args.seed, "params": r["params"],
             "final_exact_match": final(r)[0], "curve": r["curve"]} for r in results]
    write_results("q2", rows, notes=f"{args.pairs} pairs, {args.steps} steps, r {args.r}",
                  units={"curve": "(step, exact match, character accuracy) on the training pairs"})


if __name__ == "__main__":
    main()
