"""fp32 adapters on fp16/bf16 models (issue 17, item 1): every method trains with finite, moving
parameters, the forward stays in the activation dtype, and the files load in PEFT and back."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ids, tiny_llama
from safetensors.torch import load_file
from test_contract import METHODS, ROWS

import peftkit
from peftkit.core import ModulesToSave

TARGETS = ["q_proj", "v_proj", "up_proj"]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _train(model: torch.nn.Module, lr: float, steps: int = 3) -> list[torch.Tensor]:
    """``steps`` AdamW steps on the LM loss; returns the trainable parameters before training."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr)
    peftkit.attach(opt, model)
    x = ids(vocab=128)
    for _ in range(steps):
        out = model(x, labels=x)
        assert out.logits.dtype == next(model.get_output_embeddings().parameters()).dtype
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return before


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_model_trains_fp32_adapter(method: str, dtype: str) -> None:
    model = tiny_llama(0).to(HALF[dtype])
    peftkit.adapt(model, ROWS[method].make(target_modules=TARGETS))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    # Note: fp16 at lr 1e-2 is where fp16 adapters became NaN after one AdamW step (eps = 1e-8
    # is 0 in fp16); bf16 at lr 1e-4 is where bf16 adapters mostly did not move.
    before = _train(model, lr=1e-2 if dtype == "fp16" else 1e-4)
    for p, b in zip(trained, before, strict=True):
        assert torch.isfinite(p).all()
        assert (p != b).any()
    own = {id(p) for _, a in peftkit.adapters(model) for p in a.parameters(recurse=False)}
    base = [p for p in model.parameters() if id(p) not in own and not p.requires_grad]
    assert base and all(p.dtype == HALF[dtype] for p in base)  # the base keeps its dtype


def test_bf16_lora_moves_every_entry_unless_asked_to_keep_the_dtype() -> None:
    for keep in (False, True):
        model = tiny_llama(0).to(torch.bfloat16)
        cfg = peftkit.LoraConfig(r=4, target_modules=TARGETS, autocast_adapter_dtype=not keep)
        peftkit.adapt(model, cfg)
        layers = [a for _, a in peftkit.adapters(model)]
        want = torch.bfloat16 if keep else torch.float32
        assert all(a.lora_A.dtype == want and a.lora_B.dtype == want for a in layers)
        a0 = [a.lora_A.detach().clone() for a in layers]
        _train(model, lr=1e-4)
        if not keep:  # every entry of every A has moved after 3 steps
            assert all(bool((a.lora_A != b).all()) for a, b in zip(layers, a0, strict=True))


@pytest.mark.parametrize("use_dora", [False, True])
def test_nf4_bf16_base_gets_fp32_adapters(use_dora: bool) -> None:
    model = peftkit.quantize_(tiny_llama(0).to(torch.bfloat16))
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=TARGETS, use_dora=use_dora))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    before = _train(model, lr=1e-4)
    for p, b in zip(trained, before, strict=True):
        assert torch.isfinite(p).all() and (p != b).any()


def test_modules_to_save_copy_is_fp32_and_keeps_the_model_dtype() -> None:
    model = tiny_llama(0).to(torch.float16)
    cfg = peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peftkit.adapt(model, cfg)
    (m,) = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    assert m.trained.weight.dtype == torch.float32 and m.original.weight.dtype == torch.float16
    before = _train(model, lr=1e-2)
    assert torch.isfinite(m.trained.weight).all() and (m.trained.weight != before[-1]).any()


PEFT_CASES: dict[str, dict[str, Any]] = {
    "lora": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "dora": dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
    "lora+head": dict(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_bf16_files_load_in_peft_and_back(case: str, tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama(0).to(torch.bfloat16)
    peftkit.adapt(model, peftkit.LoraConfig(**PEFT_CASES[case]))
    _train(model, lr=1e-2)
    model.eval()
    x = ids(vocab=128)
    with torch.no_grad():
        y = model(x).logits
    peftkit.save_adapter(model, tmp_path)
    files = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {t.dtype for k, t in files.items() if "lora" in k} == {torch.float32}  # as PEFT
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0).to(torch.bfloat16), tmp_path).eval()
    with torch.no_grad():
        y_peft = theirs(x).logits
    assert y_peft.dtype == torch.bfloat16
    # Note: both compute the branch in fp32 and add it to the bf16 base output; the tolerance is
    # bf16 rounding of logits of magnitude ~1, not a difference in the maths.
    torch.testing.assert_close(y_peft.float(), y.float(), atol=3e-2, rtol=0)
    again = peftkit.load_adapter(tiny_llama(0).to(torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.float32 for _, a in peftkit.adapters(again) for p in
               a.parameters(recurse=False))
    with torch.no_grad():
        assert torch.equal(again(x).logits, y)


@pytest.mark.parametrize("dtype", list(HALF))
def test_fused_lora_path_takes_fp32_factors_on_a_half_base(dtype: str) -> None:
    from peftkit.methods.lora import LoraLayer

    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24)).to(HALF[dtype])
        peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["0"],
                                                init_lora_weights=False))
        ((_, layer),) = peftkit.adapters(model)
        assert isinstance(layer, LoraLayer) and layer.lora_A.dtype == torch.float32
        layer.merged_matmul = fused  # type: ignore[misc]
        x = torch.randn(2, 8, 16, dtype=HALF[dtype], requires_grad=True)
        assert layer._merged_ok(x) == fused
        y = model(x)
        assert y.dtype == HALF[dtype]
        y.float().square().sum().backward()
        assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
        return [y.detach().float(), x.grad.float(), layer.lora_A.grad, layer.lora_B.grad]

    for got, want in zip(run(True), run(False), strict=True):
        # one 16-bit GEMM with W + sBA against two: equal to 16-bit rounding, relative to size
        torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.02)


def test_autocast_adapter_dtype_is_a_run_choice_not_written_to_the_file() -> None:
    """Like PEFT's ``get_peft_model(..., autocast_adapter_dtype=...)``, the choice is how this
    run holds the adapter: ``adapter_config.json`` never carries it, so a config read back has
    the default (a fuzzed round trip once expected it kept)."""
    config = peftkit.LoraConfig(target_modules=["q_proj"], autocast_adapter_dtype=False)
    d = config.to_dict()
    assert "autocast_adapter_dtype" not in d
    back = peftkit.LoraConfig.from_dict(d)
    assert back.autocast_adapter_dtype is True and back.target_modules == config.target_modules
