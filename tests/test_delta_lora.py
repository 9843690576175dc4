"""Delta-LoRA: W follows λ·s·Δ(BA) after every optimizer step past the warm-up (Algorithm 1 as the
oracle), never on a skipped step; the telescoped closed form W_T = W_0 + λs(B_T A_T − B_K A_K)
makes the trained model exactly base + a rank-2r LoRA (PEFT loads the export), and unload /
disable_adapters / save-load / resume all rest on it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output, sole
from torch import nn

import peftkit
from peftkit.core import get_state

LAM, K = 2.0, 3
TARGETS = ["fc1", "fc2"]


def delta_model(warmup: int = K, targets: list[str] = TARGETS, kind: str = "mlp") -> nn.Module:
    return peftkit.adapt(
        MODELS[kind](0),
        peftkit.DeltaLoraConfig(
            r=4, lora_alpha=8, target_modules=targets, delta_lambda=LAM, warmup_steps=warmup
        ),
    )


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    return opt


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0, micro: int = 2
) -> None:
    target = torch.linspace(-1, 1, 8).reshape(2, 4)
    for t in range(start, start + steps):
        for m in range(micro):  # gradient accumulation: one W update per optimizer step
            (output(model, ids(seed=10 * t + m)) - target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: a.base.weight.detach().clone() for n, a in peftkit.adapters(model)}


def test_follows_algorithm_1_step_by_step() -> None:
    """Against the paper's loop written out on a plain LoRA model."""
    ours = delta_model()
    opt = optimizer(ours)
    ref = peftkit.adapt(
        MODELS["mlp"](0), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    w0 = base_weights(ours)
    target = torch.linspace(-1, 1, 8).reshape(2, 4)
    for t in range(7):
        for model, o in ((ours, opt), (ref, ref_opt)):
            for m in range(2):
                (output(model, ids(seed=10 * t + m)) - target).pow(2).mean().backward()
            prev = {
                n: (a.lora_A.detach().clone(), a.lora_B.detach().clone())
                for n, a in peftkit.adapters(model)
            }
            o.step()
            o.zero_grad()
            if model is ref and t + 1 > K:  # the K warm-up steps leave W alone
                with torch.no_grad():
                    for n, a in peftkit.adapters(ref):
                        pa, pb = prev[n]
                        a.base.weight += LAM * a.scaling * (a.lora_B @ a.lora_A - pb @ pa)
        if t + 1 <= K:
            assert all(torch.equal(w, w0[n]) for n, w in base_weights(ours).items())
    for (n, a), (_, b) in zip(peftkit.adapters(ours), peftkit.adapters(ref), strict=True):
        torch.testing.assert_close(a.base.weight, b.base.weight, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a.base.weight, w0[n])
    torch.testing.assert_close(output(ours, ids()), output(ref, ids()), rtol=1e-6, atol=1e-6)


def test_closed_form_and_anchor_buffers() -> None:
    model = delta_model()
    opt = optimizer(model)
    w0 = base_weights(model)
    train(model, opt, K)
    anchor = {
        n: (a.lora_A.detach().clone(), a.lora_B.detach().clone())
        for n, a in peftkit.adapters(model)
    }
    train(model, opt, 6, start=K)
    for n, a in peftkit.adapters(model):
        a_k, b_k = anchor[n]
        assert torch.equal(a.lora_A_K, a_k) and torch.equal(a.lora_B_K, b_k)
        want = w0[n] + LAM * a.scaling * (a.lora_B @ a.lora_A - b_k @ a_k)
        torch.testing.assert_close(a.base.weight, want, rtol=1e-6, atol=1e-7)
        a2, b2 = a.lora_factors()
        assert a2.shape == (8, a.in_features) and b2.shape == (a.out_features, 8)
        torch.testing.assert_close(
            b2 @ a2, a.base.weight - w0[n] + a.delta_weight(), rtol=1e-5, atol=1e-6
        )
    assert opt.state_dict()["peftkit_hooks"] == [{"steps": K + 6}]


def test_skipped_step_leaves_w_alone() -> None:
    model = delta_model(warmup=0)
    opt = optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    w0, hook = base_weights(model), get_state(model).hooks[0]  # type: ignore[union-attr]
    scaler.scale(output(model, ids()).sum()).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("inf"))
    scaler.step(opt)  # overflow: optimizer.step() never runs, nor do the hooks
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(w, w0[n]) for n, w in base_weights(model).items())
    assert hook.steps == 0 and not sole(model.fc1).delta_active
    scaler.scale(output(model, ids()).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert hook.steps == 1 and bool(sole(model.fc1).delta_active)
    assert not torch.equal(model.fc1.base.weight, w0["fc1"])


def trained(kind: str = "mlp", targets: list[str] = TARGETS, steps: int = 6) -> nn.Module:
    model = delta_model(warmup=2, targets=targets, kind=kind)
    opt = optimizer(model)
    if kind == "mlp":
        train(model, opt, steps)
        return model
    for t in range(steps):
        output(model, ids(vocab=128, seed=t)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def test_export_is_the_rank_2r_lora_peft_loads(tmp_path: Any) -> None:
    import peft

    model = trained()
    x = ids()
    y = output(model, x)
    peftkit.export_lora(model, tmp_path)
    d = peftkit.read_adapter_config(tmp_path)
    assert (d["peft_type"], d["r"], d.get("peftkit_method")) == ("LORA", 8, None)
    theirs = peft.PeftModel.from_pretrained(MODELS["mlp"](0), str(tmp_path))
    torch.testing.assert_close(output(theirs, x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank-8"):
        peftkit.export_lora(model, tmp_path / "r4", rank=4)


def test_unload_and_disable_give_back_the_base() -> None:
    base, model = MODELS["mlp"](0), trained()
    x = ids()
    assert (output(model, x) - output(base, x)).abs().max() > 1e-3
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(output(model, x), output(base, x), rtol=1e-5, atol=1e-6)
    peftkit.merge(model)
    with peftkit.disable_adapters(model):  # unmerged for the duration, then merged again
        torch.testing.assert_close(output(model, x), output(base, x), rtol=1e-5, atol=1e-6)
    peftkit.unload(model)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_save_load_rebuilds_the_trained_model(tmp_path: Any) -> None:
    import peft

    model = trained()
    x = ids()
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(MODELS["mlp"](0), tmp_path)
    torch.testing.assert_close(output(fresh, x), y, rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(peftkit.adapters(model), peftkit.adapters(fresh), strict=True):
        for name in ("lora_A", "lora_B", "lora_A_K", "lora_B_K", "delta_active"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    # PEFT cannot mistake the file for base + s·BA: the stored factors are [current, anchor]
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(MODELS["mlp"](0), str(tmp_path))


def test_resume_across_the_warm_up_boundary(tmp_path: Any) -> None:
    model = delta_model()
    opt = optimizer(model)
    train(model, opt, 2)
    peftkit.save_adapter(model, tmp_path)
    state = copy.deepcopy(opt.state_dict())
    train(model, opt, 4, start=2)  # crosses K = 3
    resumed = peftkit.load_adapter(MODELS["mlp"](0), tmp_path, trainable=True)
    opt2 = optimizer(resumed)
    opt2.load_state_dict(state)
    assert get_state(resumed).hooks[0].steps == 2  # type: ignore[union-attr]
    train(resumed, opt2, 4, start=2)
    for (_, a), (_, b) in zip(peftkit.adapters(model), peftkit.adapters(resumed), strict=True):
        torch.testing.assert_close(b.base.weight, a.base.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.lora_B_K, a.lora_B_K, rtol=0, atol=0)


def test_loaded_trained_adapter_keeps_following_with_a_fresh_optimizer(tmp_path: Any) -> None:
    peftkit.save_adapter(trained(), tmp_path)
    model = peftkit.load_adapter(MODELS["mlp"](0), tmp_path, trainable=True)
    train(model, optimizer(model), 2)  # the fresh counter is inside the warm-up; W must follow
    w0 = base_weights(delta_model())  # a fresh adapter sits on W_0
    for n, a in peftkit.adapters(model):
        want = w0[n] + LAM * a.scaling * (a.lora_B @ a.lora_A - a.lora_B_K @ a.lora_A_K)
        torch.testing.assert_close(a.base.weight, want, rtol=1e-5, atol=1e-6)


def test_tied_embedding_moves_alone_and_unload_reties() -> None:
    model = trained(kind="gpt2", targets=["c_attn", "wte"], steps=3)
    base = MODELS["gpt2"](0)
    wte = model.transformer.wte
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)  # the head is not an adapter
    assert not torch.allclose(wte.base.weight, base.transformer.wte.weight)
    x = ids(vocab=128)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(output(model, x), output(base, x), rtol=1e-5, atol=1e-5)
    peftkit.unload(model)
    assert model.transformer.wte.weight is model.lm_head.weight
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_refusals_name_the_cause() -> None:
    from peftkit.quant.linear import quantize_

    with pytest.raises(ValueError, match="lora_dropout=0.1.*lora_dropout=0"):
        peftkit.DeltaLoraConfig(target_modules=["fc1"], lora_dropout=0.1)
    model = quantize_(MODELS["mlp"](0), target_modules=["fc1"])
    with pytest.raises(ValueError, match="Delta-LoRA.*fc1.*NF4"):
        peftkit.adapt(model, peftkit.DeltaLoraConfig(target_modules=["fc1"]))
    assert not any(isinstance(m, peftkit.Adapter) for m in model.modules())


def test_factors_before_and_after_the_warm_up() -> None:
    model = delta_model()
    a, b = sole(model.fc1).lora_factors()
    assert a.shape[0] == 4  # still plain LoRA: rank r
    train(model, optimizer(model), K + 1)
    assert sole(model.fc1).lora_factors()[0].shape[0] == 8
