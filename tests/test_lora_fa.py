"""LoRA-FA: A frozen at LoRA's init, only B trains; the branch saves only the rank-r projection
(dropout included); gradients equal LoRA's with A frozen; PEFT loads the files; the optional
gradient correction matches the paper's projection and PEFT's LoraFAOptimizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output, sole
from torch import nn

import peftkit
from peftkit.methods.lora_fa import _FrozenABranch, _keep_mask, corrected_grad


class One(nn.Module):
    def __init__(self, d_in: int = 96, d_out: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_a_frozen_at_loras_init_only_b_trains() -> None:
    torch.manual_seed(0)
    fa = peftkit.adapt(One(), peftkit.LoraFAConfig(r=4, target_modules=["proj"]))
    torch.manual_seed(0)
    lora = peftkit.adapt(One(), peftkit.LoraConfig(r=4, target_modules=["proj"]))
    assert torch.equal(sole(fa.proj).lora_A, sole(lora.proj).lora_A)  # same kaiming-uniform draw
    assert not sole(fa.proj).lora_A.requires_grad and sole(fa.proj).lora_B.requires_grad
    assert sole(fa.proj).trainable_names() == ("lora_B",)
    trained = [n for n, p in fa.named_parameters() if p.requires_grad]
    assert trained == ["proj.adapters.default.lora_B"]
    assert peftkit.trainable_parameters(fa)[0] == 64 * 4


@pytest.mark.parametrize(
    "kind,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_proj"])]
)
def test_gradients_equal_lora_with_a_frozen(kind: str, targets: list[str]) -> None:
    """The custom backward against autograd through plain LoRA whose A is frozen."""
    torch.manual_seed(0)
    fa = peftkit.adapt(MODELS[kind](0), peftkit.LoraFAConfig(r=4, target_modules=targets))
    torch.manual_seed(0)
    ref = peftkit.adapt(MODELS[kind](0), peftkit.LoraConfig(r=4, target_modules=targets))
    torch.manual_seed(1)
    for (_, a), (_, b) in zip(peftkit.adapters(fa), peftkit.adapters(ref), strict=True):
        b.lora_A.requires_grad_(False)
        with torch.no_grad():
            a.lora_B.normal_()
            b.lora_B.copy_(a.lora_B)
    x = ids(vocab=128)
    for m in (fa, ref):  # eval: GPT-2's own dropout off; the branch has none
        output(m, x).pow(2).mean().backward()
    for (name, a), (_, b) in zip(peftkit.adapters(fa), peftkit.adapters(ref), strict=True):
        assert a.lora_A.grad is None
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-7, msg=name)


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saves_only_the_rank_r_projection(dropout: float) -> None:
    x = torch.randn(8, 32, 96, requires_grad=True)  # (B, T, in)
    r = 4
    fa = peftkit.adapt(
        One(), peftkit.LoraFAConfig(r=r, target_modules=["proj"], lora_dropout=dropout)
    ).train()
    lora = peftkit.adapt(
        One(), peftkit.LoraConfig(r=r, target_modules=["proj"], lora_dropout=dropout)
    ).train()
    z_bytes = 8 * 32 * r * 4
    assert _saved_activation_bytes(fa, x) == z_bytes  # z alone; the base saves no input
    assert _saved_activation_bytes(lora, x) >= x.numel() * 4  # LoRA keeps x (and a mask)


def test_dropout_mask_regenerated_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 7, dtype=torch.float64)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: _FrozenABranch.apply(x, a, b, 1.5, 0.3, 1234, None), (x, b)
    )
    mask = _keep_mask(x, 0.3, 1234)
    assert set(mask.unique().tolist()) <= {0.0, 1 / 0.7}
    want = ((x * mask) @ a.T) @ b.T * 1.5  # (3, 5, 6)
    torch.testing.assert_close(_FrozenABranch.apply(x, a, b, 1.5, 0.3, 1234, None), want)


def test_dropout_only_in_training_and_seeded() -> None:
    model = peftkit.adapt(
        One(), peftkit.LoraFAConfig(r=4, target_modules=["proj"], lora_dropout=0.5)
    )
    with torch.no_grad():
        sole(model.proj).lora_B.normal_()
    x = torch.randn(4, 96, requires_grad=True)
    model.eval()
    y0 = model(x)
    sole(model.proj).lora_dropout = 0.0
    assert torch.equal(model(x), y0)
    sole(model.proj).lora_dropout = 0.5
    model.train()
    torch.manual_seed(3)
    y1 = model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), y1) and not torch.equal(y1, y0)


def test_peft_loads_the_file_and_export_is_plain_lora(tmp_path: Any) -> None:
    import peft

    model = peftkit.adapt(
        MODELS["llama"](0), peftkit.LoraFAConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for _, a in peftkit.adapters(model):
            a.lora_B.normal_()
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path / "fa")
    d = peftkit.read_adapter_config(tmp_path / "fa")
    assert (d["peft_type"], d["peftkit_method"]) == ("LORA", "lora_fa")
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path / "fa"))
    torch.testing.assert_close(output(theirs, x), y, atol=1e-6, rtol=1e-5)
    peftkit.export_lora(model, tmp_path / "plain")
    d = peftkit.read_adapter_config(tmp_path / "plain")
    assert d["peft_type"] == "LORA" and "peftkit_method" not in d
    plain = peftkit.load_adapter(MODELS["llama"](0), tmp_path / "plain")
    torch.testing.assert_close(output(plain, x), y, atol=1e-6, rtol=1e-5)


def test_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="embedding.*embed"):
        peftkit.adapt(MODELS["mlp"](0), peftkit.LoraFAConfig(r=4, target_modules=["fc1", "embed"]))


def test_unfrozen_a_trains_as_lora() -> None:
    model = peftkit.adapt(One(), peftkit.LoraFAConfig(r=4, target_modules=["proj"]))
    sole(model.proj).lora_A.requires_grad_(True)
    with torch.no_grad():
        sole(model.proj).lora_B.normal_()
    model(torch.randn(4, 96)).sum().backward()
    assert sole(model.proj).lora_A.grad is not None and sole(model.proj).lora_A.grad.abs().sum() > 0


def test_correction_is_the_projected_full_gradient() -> None:
    """s · g̃_B A = G Aᵀ(AAᵀ)⁻¹A, with G = ∂L/∂W the full-weight gradient (LoRA-FA v2)."""
    torch.manual_seed(0)
    model = peftkit.adapt(One(), peftkit.LoraFAConfig(r=4, lora_alpha=16, target_modules=["proj"]))
    layer = sole(model.proj)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, t = torch.randn(32, 96), torch.randn(32, 64)
    (model(x) - t).pow(2).mean().backward()
    w = (layer.base.weight + layer.delta_weight()).detach().requires_grad_()
    (nn.functional.linear(x, w, layer.base.bias) - t).pow(2).mean().backward()
    a, s = layer.lora_A.double(), layer.scaling
    g_tilde = corrected_grad(layer.lora_B.grad, layer.lora_A, s)
    projected = w.grad.double() @ a.T @ torch.linalg.inv(a @ a.T) @ a  # (out, in)
    torch.testing.assert_close(s * g_tilde.double() @ a, projected, rtol=1e-4, atol=1e-7)


def test_correction_matches_peft_lorafa_optimizer(tmp_path: Any, monkeypatch: Any) -> None:
    import peft
    import peft.optimizers.lorafa as peft_lorafa

    # PEFT projects under bf16 autocast when bf16 is available; compare against its fp32 path.
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    cfg = peftkit.LoraFAConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "fc2"], gradient_correction=True
    )
    ours = peftkit.adapt(MODELS["mlp"](0), cfg)
    with torch.no_grad():
        for _, a in peftkit.adapters(ours):
            a.lora_B.normal_(std=0.1)
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["mlp"](0), str(tmp_path), is_trainable=True)
    lr = 1e-2
    peft_opt = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=lr)
    for g in peft_opt.param_groups:
        g["eps"] = 1e-12  # PEFT adds eps outside the bias correction, torch inside: make it moot
    uncorrected = peftkit.load_adapter(MODELS["mlp"](0), tmp_path, trainable=True)
    peftkit.core.model_state(uncorrected).adapters["default"].hooks.clear()
    runs = []
    for model in (ours, uncorrected):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-12)
        peftkit.attach(opt, model)
        runs.append((model, opt))
    runs.append((theirs, peft_opt))
    torch.manual_seed(0)
    target = torch.randn(2, 4)
    for step in range(5):
        x = ids(seed=step)
        for model, opt in runs:
            (output(model, x) - target).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for name in ("fc1", "fc2"):
        peer = theirs.base_model.model.get_submodule(name).lora_B["default"].weight
        torch.testing.assert_close(sole(getattr(ours, name)).lora_B, peer, rtol=1e-4, atol=1e-6)
        # the correction matters: without it the trajectory is visibly different
        assert (sole(getattr(uncorrected, name)).lora_B - peer).abs().max() > 1e-3
