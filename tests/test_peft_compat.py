"""Files both ways with Hugging Face PEFT (the oracle): same logits to 1e-5 in fp32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output

import peftkit

peft = pytest.importorskip("peft")

CASES: dict[str, dict[str, Any]] = {
    "llama-lora": dict(
        kind="llama", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=16
    ),
    "llama-rslora-embed": dict(
        kind="llama", target_modules=["q_proj", "embed_tokens"], r=4, lora_alpha=8, use_rslora=True
    ),
    "llama-all-linear": dict(kind="llama", target_modules="all-linear", r=2, lora_alpha=4),
    "llama-patterns": dict(
        kind="llama",
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 32},
    ),
    "llama-layers": dict(kind="llama", target_modules=["o_proj"], r=4, layers_to_transform=[1]),
    "qwen2-lora-save": dict(
        kind="qwen2", target_modules=["k_proj", "gate_proj"], r=4, modules_to_save=["lm_head"]
    ),
    "gpt2-conv1d": dict(kind="gpt2", target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8),
    "bert-cls": dict(
        kind="bert", target_modules=["query", "value"], r=4, modules_to_save=["classifier"]
    ),
    "bert-embed": dict(kind="bert", target_modules=["word_embeddings", "key"], r=4),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_adapter_loads_in_peft(case: str, tmp_path: Any) -> None:
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    model = MODELS[kind](0)
    peftkit.adapt(model, peftkit.LoraConfig(**kw))
    _perturb(model, 1)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftkit(case: str, tmp_path: Any) -> None:
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    theirs = peft.get_peft_model(MODELS[kind](0), peft.LoraConfig(**kw))
    _perturb(theirs, 2)
    theirs.eval()
    x = ids(vocab=128)
    y = output(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.load_adapter(MODELS[kind](0), tmp_path)
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)


def test_export_lora_loads_in_peft(tmp_path: Any) -> None:
    model = MODELS["llama"](0)
    peftkit.adapt(
        model,
        peftkit.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "embed_tokens"],
            rank_pattern={"q_proj": 2},
        ),
    )
    _perturb(model, 3)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.export_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    ours = peftkit.load_adapter(MODELS["llama"](0), tmp_path)
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)
