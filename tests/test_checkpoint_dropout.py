"""Dropout under gradient checkpointing (issue 17, item 4): with either checkpointing mode, every
method with dropout gets the gradients of the run without checkpointing — the recomputed forward
draws the same masks as the first one (LoRA-FA's first pass under reentrant checkpointing runs
under no_grad and used to draw another mask)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ids, tiny_llama
from test_contract import METHODS, ROWS, perturb

import peftkit

TARGETS = ["q_proj", "v_proj", "up_proj"]
# every method with a dropout option, by the name of its field (Delta-LoRA has none: it refuses
# dropout, since its update of W assumes the undropped branch)
DROPOUT = {
    m: "vera_dropout" if m == "vera" else "lora_dropout" for m in METHODS if m != "delta_lora"
}


def _grads(method: str, mode: str | None) -> dict[str, torch.Tensor]:
    model = tiny_llama(0)
    torch.manual_seed(1)
    config = ROWS[method].make(target_modules=TARGETS)
    config = dataclasses.replace(config, **{DROPOUT[method]: 0.3})
    peftkit.adapt(model, config)
    perturb(model)  # away from init (B = 0, λ_b = 0, ...), where some gradients are zero
    model.train()
    if mode is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"}
        )
        model.enable_input_require_grads()  # reentrant checkpointing needs an input with grad
    x = ids(vocab=128)
    torch.manual_seed(2)
    model(x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore::UserWarning")  # hook-driven methods, run here without hooks
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", list(DROPOUT))
def test_checkpointed_gradients_equal_plain_ones_with_dropout(method: str, mode: str) -> None:
    want = _grads(method, None)
    got = _grads(method, mode)
    assert want and got.keys() == want.keys()
    for name, g in want.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)
