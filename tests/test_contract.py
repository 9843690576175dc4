"""The contract battery: every method in the registry × every model kind passes the same checks.

A method joins by adding a row to ``ROWS``: how to build its config for given targets, which
layer kinds it supports, and any exemption with its reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from torch import nn

import peftkit
from peftkit.core import Adapter, ModulesToSave


@dataclasses.dataclass
class Row:
    make: Callable[..., peftkit.AdapterConfig]
    embeddings: bool = True  # can it wrap nn.Embedding?
    bad: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)
    init_atol: float = 0.0  # output at init equals the base's within this
    exempt: dict[str, str] = dataclasses.field(default_factory=dict)  # check -> reason


def cfg(cls: Callable[..., peftkit.AdapterConfig], **defaults: Any) -> Callable[..., Any]:
    """A config factory whose keyword arguments override ``defaults``."""
    return lambda **kw: cls(**{**defaults, **kw})


ROWS: dict[str, Row] = {
    "lora": Row(
        make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8),
        bad=[({"r": 0}, "r"), ({"r": -2}, "r"), ({"lora_alpha": float("nan")}, "lora_alpha"),
             ({"lora_dropout": 1.5}, "lora_dropout"), ({"init_lora_weights": "pissa"},
                                                        "init_lora_weights")],
    ),
    "rslora": Row(make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8, use_rslora=True)),
}

# (targets, embedding targets, modules_to_save) per model kind.
TARGETS: dict[str, tuple[list[str], list[str], list[str] | None]] = {
    "mlp": (["fc1", "fc2"], ["embed"], ["head"]),
    "llama": (["q_proj", "v_proj", "up_proj"], ["embed_tokens"], None),
    "gpt2": (["c_attn", "c_proj"], ["wte"], None),
    "bert": (["query", "value"], ["word_embeddings"], ["classifier"]),
}

CASES = [(m, k) for m in ROWS for k in TARGETS]


def build(method: str, kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base model, adapted model with non-trivial adapter weights, input)."""
    row = ROWS[method]
    linear, emb, save = TARGETS[kind]
    targets = linear + (emb if row.embeddings else [])
    base = MODELS[kind](seed)
    model = MODELS[kind](seed)
    peftkit.adapt(model, row.make(target_modules=targets, modules_to_save=save))
    vocab = 32 if kind == "mlp" else 128
    return base, model, ids(vocab=vocab)


def perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


@pytest.mark.parametrize("method,kind", CASES)
def test_init_equals_base(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    torch.testing.assert_close(output(model, x), output(base, x), atol=ROWS[method].init_atol,
                               rtol=0)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_unmerge(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    perturb(model)
    y = output(model, x)
    assert (y - output(base, x)).abs().max() > 1e-4, "perturbed adapter should change outputs"
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peftkit.merge(model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        peftkit.merge(model)
    peftkit.unmerge(model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)
    for name, a in peftkit.adapters(model):
        w = a.base.weight
        torch.testing.assert_close(w, before[f"{name}.weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_and_unload(method: str, kind: str) -> None:
    _, model, x = build(method, kind)
    perturb(model)
    model.eval()
    y = output(model, x)
    out = peftkit.merge_and_unload(model, probe=x)
    assert out is model
    assert not any(isinstance(m, (Adapter, ModulesToSave)) for m in model.modules())
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_disable_adapters_is_base(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    perturb(model)
    with peftkit.disable_adapters(model):
        assert torch.equal(output(model, x), output(base, x))
    assert not torch.equal(output(model, x), output(base, x))


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_roundtrip(method: str, kind: str, tmp_path: Any) -> None:
    _, model, x = build(method, kind)
    perturb(model)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    fresh = MODELS[kind](0)
    assert peftkit.load_adapter(fresh, tmp_path) is fresh
    assert torch.equal(output(fresh, x), y)
    assert peftkit.trainable_parameters(fresh)[0] == 0
    again = MODELS[kind](0)
    peftkit.load_adapter(again, tmp_path, trainable=True)
    assert peftkit.trainable_parameters(again)[0] == peftkit.trainable_parameters(model)[0]


@pytest.mark.parametrize("method,kind", CASES)
def test_only_intended_parameters_train(method: str, kind: str) -> None:
    _, model, _ = build(method, kind)
    intended = set()
    for m in model.modules():
        if isinstance(m, Adapter):
            intended.update(id(getattr(m, n)) for n in m.trainable_names()
                            if isinstance(getattr(m, n, None), nn.Parameter))
        if isinstance(m, ModulesToSave):
            intended.update(id(p) for p in m.trained.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == intended
    n, total = peftkit.trainable_parameters(model)
    assert 0 < n < total


@pytest.mark.parametrize("method,kind", CASES)
def test_training_lowers_loss(method: str, kind: str) -> None:
    _, model, x = build(method, kind)
    model.train()
    torch.manual_seed(0)
    target = torch.randn_like(output(model, x))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    losses = []
    for _ in range(8):
        loss = nn.functional.mse_loss(output(model, x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", list(ROWS))
def test_bad_config_values_name_the_field(method: str) -> None:
    row = ROWS[method]
    for kwargs, field in row.bad:
        with pytest.raises(ValueError, match=field):
            row.make(target_modules=["fc1"], **kwargs)
    with pytest.raises(ValueError, match="target_modules"):
        row.make()
