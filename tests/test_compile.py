"""``torch.compile(fullgraph=True)`` of every method's layer (issue 17, item 6): no graph break in
training (forward and backward) or eval, on a dense and an NF4 base, and the compiled layer
computes what the eager one does.

The ``aot_eager`` backend runs Dynamo (where graph breaks happen) and AOTAutograd (which traces
the backward) without generating kernels, so the whole matrix stays fast on two cores; one test
runs Inductor itself on LoRA and DoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_contract import METHODS, ROWS
from torch import nn

import peftkit

pytestmark = pytest.mark.slow


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _dropout_field(config: peftkit.AdapterConfig) -> str | None:
    names = {f.name for f in dataclasses.fields(config)}
    for name in ("lora_dropout", "vera_dropout"):
        if name in names:
            return name
    return None


def _layer(method: str, nf4: bool, dropout: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = One()
    if nf4:
        peftkit.quantize_(model)
    config = ROWS[method].make(target_modules=["proj"])
    field = _dropout_field(config)
    if dropout and field is not None:
        config = dataclasses.replace(config, **{field: dropout})
    peftkit.adapt(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from init, where B = 0 hides most of the branch
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    peftkit.attach(opt, model)  # hook-driven methods: as in training (DyLoRA draws its rank)
    return model.proj, opt


def _run(layer: nn.Module, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return layer(x), []
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), [p.grad for p in layer.parameters() if p.requires_grad]


CASES = [(m, nf4) for m in METHODS for nf4 in (False, True) if not nf4 or ROWS[m].nf4]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method,nf4", CASES)
def test_layer_compiles_fullgraph_and_matches_eager(method: str, nf4: bool, mode: str) -> None:
    torch._dynamo.reset()
    layer, _ = _layer(method, nf4, dropout=0.0)
    layer.train(mode == "train")
    x = torch.randn(2, 5, 16, requires_grad=mode == "train")
    y, grads = _run(layer, x, mode == "train")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c, grads_c = _run(compiled, x, mode == "train")  # type: ignore[arg-type]
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    assert len(grads_c) == len(grads) and all(g is not None for g in grads_c)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,nf4", [c for c in CASES if c[0] != "delta_lora"])
def test_layer_with_dropout_compiles_fullgraph(method: str, nf4: bool) -> None:
    torch._dynamo.reset()
    layer, _ = _layer(method, nf4, dropout=0.25)
    layer.train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, grads = _run(compiled, x, train=True)  # type: ignore[arg-type]
    assert torch.isfinite(y).all() and grads and all(torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_inductor_matches_eager(method: str) -> None:
    torch._dynamo.reset()
    layer, _ = _layer(method, nf4=False, dropout=0.0)
    layer.train()
    x = torch.randn(4, 8, 16, requires_grad=True)
    y, grads = _run(layer, x, train=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_c, grads_c = _run(compiled, x, train=True)  # type: ignore[arg-type]
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)
