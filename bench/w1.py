"""W1 — one training step of a small Llama, every method against PEFT and the frozen floor.

    python bench/w1.py                  # all variants, 20 rounds
    python bench/w1.py lora peft-lora   # a subset (the floor is always measured)
    python bench/w1.py --rounds 30
    python bench/w1.py lora lora-compiled dora dora-compiled floor-compiled   # torch.compile

Prints a markdown table: step time / floor (median and quartiles of per-round ratios), step time /
the peer (PEFT's counterpart where one exists; for ``qlora``, peftkit's dense LoRA), and saved
activations above the floor.
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
    freeze_to_floor,
    interleaved,
    print_report,
    saved_activation_bytes,
    select_variants,
    w1_batch,
    w1_model,
    write_results,
)

import peftkit  # noqa: E402


def _peft(config_factory: Callable[[], object]) -> Callable[[nn.Module], nn.Module]:
    def setup(model: nn.Module) -> nn.Module:
        import peft

        return peft.get_peft_model(model, config_factory())  # type: ignore[arg-type]

    return setup


def _ours(config_factory: Callable[[], peftkit.AdapterConfig]) -> Callable[[nn.Module], nn.Module]:
    return lambda model: peftkit.adapt(model, config_factory())


def _peft_frozen_a(dropout: float) -> Callable[[nn.Module], nn.Module]:
    """PEFT's LoRA-FA: a LoRA whose ``lora_A`` is frozen before the first forward, as
    ``peft.optimizers.create_lorafa_optimizer`` does (its optimizer is not what is timed here)."""

    def setup(model: nn.Module) -> nn.Module:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(  # type: ignore[arg-type]
            r=16, lora_alpha=32, target_modules=W1_TARGETS, lora_dropout=dropout))
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
        return model

    return setup


def _lora_two_gemm(model: nn.Module) -> nn.Module:
    """LoRA with the merged-weight GEMM switched off: base GEMM + the two rank-r GEMMs."""
    model = peftkit.adapt(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS))
    for _, layer in peftkit.adapters(model):
        layer.merged_matmul = False  # type: ignore[misc]
    return model


def _dora_unfused(model: nn.Module) -> nn.Module:
    """DoRA with the scale-folding path switched off: the base's own GEMM, then g on the output."""
    model = peftkit.adapt(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS,
                                                    use_dora=True))
    for _, layer in peftkit.adapters(model):
        layer.fold_scale = False  # type: ignore[misc]
    return model


def _dora_m_frozen(model: nn.Module) -> nn.Module:
    """Diagnostic: DoRA with the magnitudes frozen, so backward skips the ∂m pass over y."""
    model = _ours(_dora_config)(model)
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.requires_grad_(False)
    return model


def _dora_fixed_norm(model: nn.Module) -> nn.Module:
    """Diagnostic (not DoRA: the norms go stale): ‖W + sBA‖ computed once, not every forward."""
    model = _ours(_dora_config)(model)
    for _, layer in peftkit.adapters(model):
        norm = layer.weight_norm()
        layer.weight_norm = lambda n=norm: n
    return model


def _dora_config() -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS, use_dora=True)


def _qlora(model: nn.Module) -> nn.Module:
    """QLoRA: every linear but the output head held in NF4 (double quantization), then LoRA."""
    peftkit.quantize_(model)
    return peftkit.adapt(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS))


def _compiled(setup: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """``setup`` then ``torch.compile`` of the whole model (Inductor, default mode): the timed
    step runs the compiled forward and backward; the optimizer step stays eager."""
    return lambda model: torch.compile(setup(model))  # type: ignore[return-value]


def _full(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


W1_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (setup, the PEFT variant to compare with or None). Method issues add their rows here.
VARIANTS: dict[str, tuple[Callable[[nn.Module], nn.Module], str | None]] = {
    "floor": (freeze_to_floor, None),
    "lora": (_ours(lambda: peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS)),
             "peft-lora"),
    "peft-lora": (_peft(lambda: __import__("peft").LoraConfig(
        r=16, lora_alpha=32, target_modules=W1_TARGETS)), None),
    "dora": (_ours(lambda: peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=W1_TARGETS,
                                              use_dora=True)), "peft-dora"),
    "peft-dora": (_peft(lambda: __import__("peft").LoraConfig(
        r=16, lora_alpha=32, target_modules=W1_TARGETS, use_dora=True)), None),
    "lora_fa": (_ours(lambda: peftkit.LoraFAConfig(r=16, lora_alpha=32,
                                                   target_modules=W1_TARGETS)), "peft-lora_fa"),
    "peft-lora_fa": (_peft_frozen_a(0.0), None),
    "lora_fa-dropout": (_ours(lambda: peftkit.LoraFAConfig(
        r=16, lora_alpha=32, target_modules=W1_TARGETS, lora_dropout=0.1)),
        "peft-lora_fa-dropout"),
    "peft-lora_fa-dropout": (_peft_frozen_a(0.1), None),
    # warmup_steps=0: every measured step pays the update of W
    "delta_lora": (_ours(lambda: peftkit.DeltaLoraConfig(
        r=16, lora_alpha=32, target_modules=W1_TARGETS, warmup_steps=0)), None),
    # VeRA as BENCHMARKS.md measures PEFT: r = 256 on the attention projections only
    "vera": (_ours(lambda: peftkit.VeraConfig(r=256, target_modules=W1_ATTN)), "peft-vera"),
    "peft-vera": (_peft(lambda: __import__("peft").VeraConfig(r=256, target_modules=W1_ATTN)),
                  None),
    # MoRA r = 16: r̂ = round(√((in+out)·16)), so M has ≈ LoRA r16's parameters (type 6 default)
    "mora": (_ours(lambda: peftkit.MoraConfig(r=16, target_modules=W1_TARGETS)), None),
    # AdaLoRA init_r 16 as BENCHMARKS.md: the forward/backward only on both sides (Step neither
    # attaches peftkit's hook nor calls PEFT's update_and_allocate)
    "adalora": (_ours(lambda: peftkit.AdaLoraConfig(
        init_r=16, target_r=8, lora_alpha=32, total_step=1000, target_modules=W1_TARGETS)),
        "peft-adalora"),
    "peft-adalora": (_peft(lambda: __import__("peft").AdaLoraConfig(
        init_r=16, target_r=8, lora_alpha=32, total_step=1000, target_modules=W1_TARGETS)),
        None),
    # DyLoRA r_max 16: the rank is a mask, so every step costs full rank; frozen adds the
    # detach-mask of A and B (PEFT has no DyLoRA)
    "dylora": (_ours(lambda: peftkit.DyLoraConfig(r=16, lora_alpha=32,
                                                  target_modules=W1_TARGETS)), None),
    "dylora-frozen": (_ours(lambda: peftkit.DyLoraConfig(
        r=16, lora_alpha=32, frozen=True, target_modules=W1_TARGETS)), None),
    # DoRA-Mao r0 16 → 8, no dropout; steps fall in the warm-up: importance EMA + DEM every step
    "dora_dynamic": (_ours(lambda: peftkit.DoraDynamicConfig(
        init_r=16, target_r=8, lora_alpha=32, lora_dropout=0.0, total_step=1000,
        target_modules=W1_TARGETS)), None),
    "lora-two-gemm": (_lora_two_gemm, "lora"),
    "dora-unfused": (_dora_unfused, "dora"),
    # what DoRA's two necessary extras over LoRA cost: the ∂m pass and the per-step norms
    "dora-m-frozen": (_dora_m_frozen, "dora"),
    "dora-fixed-norm": (_dora_fixed_norm, "dora"),
    # QLoRA against the dense LoRA step (the figure: what the NF4 base costs per step)
    "qlora": (_qlora, "lora"),
    "full": (_full, None),
}
# torch.compile (issue 17): each against its eager self; floor-compiled is the compiled floor
VARIANTS.update({
    f"{name}-compiled": (_compiled(VARIANTS[name][0]), name)
    for name in ("floor", "lora", "dora", "peft-lora", "peft-dora")
})


# Variants whose timed step includes their training hook (peftkit.attach); the others time the
# forward/backward/update only.
ATTACHED = {"delta_lora"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = select_variants(ap, args.variants, VARIANTS)
    ids = w1_batch()
    steps, models = {}, {}
    for n in names:
        model = VARIANTS[n][0](w1_model())
        models[n] = model
        steps[n] = Step(model, ids)
        if n in ATTACHED:
            peftkit.attach(steps[n].opt, model)
    saved = {n: saved_activation_bytes(m, lambda m=m: m(input_ids=ids, labels=ids))
             for n, m in models.items()}
    times = interleaved(steps, rounds=args.rounds, warmup=args.warmup)
    title = (
        f"W1: Llama 512x4, batch 4x256, fp32, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds"
    )
    peer_header = "step / peer (PEFT's; qlora: dense LoRA)"
    rows = print_report(title, names, VARIANTS, times, saved, peer_header)
    write_results("w1", rows, units=STEP_UNITS, notes=title)


if __name__ == "__main__":
    main()
