"""LoRA's training path on a frozen nn.Linear: one GEMM with W + s·BA (``_MergedLinearLora``)
gives the two-GEMM path's outputs and gradients, saves less, and is used only where it is safe."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import sole
from torch import nn

import peftkit
from peftkit.methods.lora import LoraLayer, _MergedLinearLora


def _layer(dropout: float = 0.0, bias: bool = True) -> tuple[nn.Module, LoraLayer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40, bias=bias)).double()
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["0"], lora_dropout=dropout))
    layer = sole(model[0])
    assert isinstance(layer, LoraLayer)
    with torch.no_grad():
        layer.lora_B.normal_()
    return model, layer


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert x.grad is not None
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, a, bb: _MergedLinearLora.apply(x, w, b, a, bb, 1.7), (x, b, a, bb)
    )


@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_two_gemm_path(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, layer = _layer(bias=bias)
    x = torch.randn(4, 16, 24, dtype=torch.float64)  # 64 tokens >= 24·40/64 = 15
    calls = {"n": 0}
    real = _MergedLinearLora.apply

    def counted(*args: Any) -> Any:
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(_MergedLinearLora, "apply", counted)
    y1, g1 = _run(model, x)
    assert calls["n"] == 1
    layer.merged_matmul = False  # type: ignore[misc]  # this instance only
    y2, g2 = _run(model, x)
    assert calls["n"] == 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    assert g1.keys() == g2.keys() == {"x", "0.adapters.default.lora_A", "0.adapters.default.lora_B"}
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-12)


def _uses_merged(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> bool:
    hit = {"n": 0}
    real = _MergedLinearLora.apply

    def counted(*args: Any) -> Any:
        hit["n"] += 1
        return real(*args)

    monkeypatch.setattr(_MergedLinearLora, "apply", counted)
    model(x)
    monkeypatch.setattr(_MergedLinearLora, "apply", real)
    return hit["n"] > 0


def test_used_only_where_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    many, few = torch.randn(64, 24, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    model, layer = _layer()
    assert _uses_merged(model, many, monkeypatch)
    assert not _uses_merged(model, few, monkeypatch)  # forming W' would cost more
    with torch.no_grad():
        assert not _uses_merged(model, many, monkeypatch)
    handle = layer.base.register_forward_pre_hook(lambda m, a: None)
    assert not _uses_merged(model, many, monkeypatch)  # a hook on the base must still run
    handle.remove()
    handle = layer.base.register_full_backward_hook(lambda *a: None)
    assert not _uses_merged(model, many, monkeypatch)  # so must a backward hook
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert not _uses_merged(model, many, monkeypatch)  # and a global one
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _uses_merged(model, many, monkeypatch)  # CPU autocast picks its own dtypes
    layer.base.weight.requires_grad_(True)
    assert not _uses_merged(model, many, monkeypatch)  # W trains: it needs its own gradient
    layer.base.weight.requires_grad_(False)
    with peftkit.disable_adapters(model):
        assert not _uses_merged(model, many, monkeypatch)
    dropped, _ = _layer(dropout=0.1)
    assert not _uses_merged(dropped.train(), many, monkeypatch)  # the branch sees D(x), not x


def test_saves_no_rank_r_activation() -> None:
    def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    model, layer = _layer()
    x = torch.randn(256, 24, dtype=torch.float64, requires_grad=True)
    merged = saved_bytes(model, x)
    layer.merged_matmul = False  # type: ignore[misc]
    two = saved_bytes(model, x)
    assert two - merged == 256 * layer.r * 8  # LoRA's (T, r) activation, float64
