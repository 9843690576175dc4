"""DoRA-Mao (dynamic rank distribution) against the spec's equations (importance, EMA, cubic
schedule, DEM), PEFT (the exported surviving ranks) and itself (plain loop = HF Trainer; exact
resume; masks survive save/load)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from torch import nn

import peftkit
from peftkit.core import get_state
from peftkit.methods.dora_dynamic import DoraDynamicHook, DoraDynamicLayer, ranks


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def layers(model: nn.Module) -> list[DoraDynamicLayer]:
    return [a for _, a in peftkit.adapters(model) if isinstance(a, DoraDynamicLayer)]


def hook_of(model: nn.Module) -> DoraDynamicHook:
    hook = get_state(model).hooks[0]
    assert isinstance(hook, DoraDynamicHook)
    return hook


def perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_config_defaults_are_the_official_code() -> None:
    c = peftkit.DoraDynamicConfig(target_modules=["q"], total_step=100)
    assert (c.target_r, c.init_r, c.lora_alpha, c.lora_dropout) == (8, 12, 8, 0.1)
    assert (c.start_ratio, c.end_ratio, c.prune_interval, c.beta) == (0.15, 0.5, 100, 0.9)
    assert c.regularization_loss_alpha == 0.1
    assert peftkit.DoraDynamicConfig(target_modules=["q"], total_step=1, target_r=3).init_r == 5
    assert c.to_dict()["peftkit_method"] == "dora_dynamic"


def test_closed_form_importance_equals_brute_force() -> None:
    model = peftkit.adapt(
        MODELS["mlp"](0),
        peftkit.DoraDynamicConfig(target_r=4, target_modules=["fc1"], total_step=10),
    )
    perturb(model)
    layer = layers(model)[0]
    layer.lora_mask[1] = 0
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    c = layer.lora_scaler.detach() * layer.lora_mask
    parts = torch.einsum("oi,i,in->ion", b, c, a)  # (r0, out, in): c_i B[:, i] A[i, :]
    brute = parts.flatten(1).norm(dim=1) / (parts.sum(0).norm() + 1e-8)
    torch.testing.assert_close(layer.importance(), brute, atol=1e-6, rtol=1e-5)
    assert layer.importance()[1] == 0


def hand_model() -> nn.Module:
    """A = I, B = diag(b), c = 1: component i has norm b_i and ‖ΔW‖ = ‖b‖ (orthogonal)."""
    torch.manual_seed(0)
    model = peftkit.adapt(
        Pair(),
        peftkit.DoraDynamicConfig(
            target_r=2,
            init_r=4,
            target_modules=["fc1", "fc2"],
            total_step=10,
            start_ratio=0.1,
            end_ratio=0.5,
            prune_interval=2,
            lora_dropout=0.0,
        ),
    )
    with torch.no_grad():
        for layer, diag in zip(layers(model), ([1.0, 2, 3, 4], [5.0, 6, 7, 8]), strict=True):
            layer.lora_A.copy_(torch.eye(4))
            layer.lora_B.copy_(torch.diag(torch.tensor(diag)))
            layer.lora_scaler.fill_(1.0)
    return model


def test_importance_and_pruning_by_hand() -> None:
    model = hand_model()
    hook = hook_of(model)
    # T = 10, start 0.1, end 0.5: p = t − 1, P = 4; events at p = 0, 2 (k → 1) and 4 (k = 4)
    assert [hook.position(t) for t in range(1, 7)] == [0, 1, 2, 3, 4, 5] and hook.window == 4
    b1, b2 = [1.0, 2, 3, 4], [5.0, 6, 7, 8]
    ema = [[0.0] * 4, [0.0] * 4]
    live = [[1.0] * 4, [1.0] * 4]
    for t in range(1, 6):
        hook.after_step()
        for m, diag in enumerate((b1, b2)):
            norm = math.sqrt(sum((c * d) ** 2 for c, d in zip(live[m], diag, strict=True)))
            for i in range(4):
                ema[m][i] = 0.9 * ema[m][i] + 0.1 * live[m][i] * diag[i] / norm
        if t == 1:  # ŝ = 0.1 · b_i / ‖b‖
            expected = [0.1 * i / math.sqrt(30) for i in (1, 2, 3, 4)]
            torch.testing.assert_close(hook.scores[0], torch.tensor(expected))
        if t in (1, 3, 5):  # prune the k lowest ŝ over both modules (k = 1, 1, 4)
            k = 4 if t == 5 else 1
            tau = sorted(ema[0] + ema[1])[k - 1]
            live = [[float(s > tau) for s in e] for e in ema]
        for m, layer in enumerate(layers(model)):
            torch.testing.assert_close(hook.scores[m], torch.tensor(ema[m]))
            assert layer.lora_mask.tolist() == live[m], (t, m)
    assert live == [[0, 0, 1, 1], [0, 0, 1, 1]]  # fc1's 2nd (≈ .37) ranks below fc2's 1st (.38)
    assert hook.final and ranks(model) == {"fc1": 2, "fc2": 2}
    with torch.no_grad():
        layers(model)[0].lora_scaler.fill_(3.0)  # an optimizer moving pruned gates
    hook.after_step()  # final phase: pruned gates are zeroed, scores stay
    assert layers(model)[0].lora_scaler.tolist() == [0, 0, 3, 3]
    torch.testing.assert_close(hook.scores[0], torch.tensor(ema[0]))


def reference_kept(t: int, T: int, n: int, r0: int, rt: int, interval: int) -> int | None:
    """The spec's schedule: components kept after step t's event, or None when t has none."""
    p, window = int(t - 0.15 * T), int(T * (1 - 0.15 - 0.5))
    if p < 0 or p > window or (p % interval != 0 and p != window):
        return None
    k = int(n * ((r0 - rt) / r0) * (p / window) ** 3)
    return n - max(k, 1)


def test_schedule_keeps_n_minus_k_and_reaches_the_budget() -> None:
    T, r0, rt = 40, 6, 2
    model = peftkit.adapt(
        MODELS["mlp"](0),
        peftkit.DoraDynamicConfig(
            target_r=rt, init_r=r0, target_modules=["fc1", "fc2"], total_step=T, prune_interval=3
        ),
    )
    perturb(model)
    hook = hook_of(model)
    kept = 12
    events = 0
    for t in range(1, T + 1):
        hook.after_step()
        expected = reference_kept(t, T, 12, r0, rt, 3)
        if expected is not None:
            kept, events = expected, events + 1
        assert sum(ranks(model).values()) == kept, t
    assert events == 6 and kept == 2 * rt and hook.final


def test_dem_gradient_is_added_without_touching_the_loss() -> None:
    model = peftkit.adapt(
        MODELS["mlp"](0),
        peftkit.DoraDynamicConfig(
            target_r=2,
            init_r=3,
            target_modules=["fc1", "fc2", "embed"],
            total_step=10,
            regularization_loss_alpha=0.3,
            lora_dropout=0.0,
        ),
    )
    perturb(model)
    ls = layers(model)
    # R = Σ_modules Σ_i [Var(A[i, :]) + Var(B[:, i])] / (2 r0 M), unbiased variance
    reg = sum(a.lora_A.var(dim=1).sum() + a.lora_B.var(dim=0).sum() for a in ls) / (2 * 3 * 3)
    x = ids()
    task = output(model, x).square().mean()
    expected = torch.autograd.grad(
        task + 0.3 * reg, [p for a in ls for p in (a.lora_A, a.lora_B)], retain_graph=True
    )
    task.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    peftkit.attach(opt, model)
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for layer in ls for p in (layer.lora_A, layer.lora_B)]
    for p, g in zip(params, expected, strict=True):
        moved = before[names[id(p)]] - p.detach()  # SGD moved it by lr · ∇(task + η R)
        torch.testing.assert_close(moved / 0.5, g, atol=1e-6, rtol=1e-5)
    hook = hook_of(model)
    hook.final = True
    opt.zero_grad()
    hook.before_step()  # pruning over: DEM is off
    assert all(a.lora_A.grad is None for a in ls)


def test_pruned_components_have_no_effect_and_masks_survive_save(tmp_path: Any) -> None:
    model = hand_model().eval()
    for _ in range(5):
        hook_of(model).after_step()
    x = torch.randn(3, 4)
    y = model(x)
    with torch.no_grad():
        for layer in layers(model):
            layer.lora_A[:2].add_(1.0)
            layer.lora_B[:, :2].add_(1.0)
            layer.lora_scaler[:2].add_(1.0)
    assert torch.equal(model(x), y)
    peftkit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = peftkit.load_adapter(Pair(), tmp_path)  # the same base weights as hand_model's
    assert ranks(fresh) == {"fc1": 2, "fc2": 2}
    assert torch.equal(fresh(x), y)


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> torch.optim.Optimizer:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    peftkit.attach(opt, model)
    x = ids(vocab=128)
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_export_after_pruning_loads_in_peft(tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    model = MODELS["llama"](0)
    peftkit.adapt(
        model,
        peftkit.DoraDynamicConfig(
            target_r=2,
            init_r=4,
            target_modules=["q_proj", "v_proj", "up_proj"],
            total_step=12,
            prune_interval=1,
            lora_alpha=16,
            lora_dropout=0.0,
        ),
    )
    train(model, 12)
    assert hook_of(model).final and sum(ranks(model).values()) == 6 * 2
    with torch.no_grad():  # make the ranks differ per module, one of them empty
        layers(model)[0].lora_mask[layers(model)[0].lora_mask.nonzero()[0]] = 0
        layers(model)[-1].lora_mask.zero_()
    found = ranks(model)
    assert len(set(found.values())) == 3, found
    model.eval()
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.export_lora(model, tmp_path)
    cfg = peftkit.read_adapter_config(tmp_path)
    assert cfg["rank_pattern"] == {n: max(k, 1) for n, k in found.items() if max(k, 1) != cfg["r"]}
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="without rank="):
        peftkit.export_lora(model, tmp_path, rank=2)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.state.adapter_tensors(model).items()}


def test_resume_continues_exactly(tmp_path: Any) -> None:
    config = peftkit.DoraDynamicConfig(
        target_r=2,
        init_r=4,
        target_modules=["fc1", "fc2"],
        total_step=10,
        prune_interval=1,
        lora_dropout=0.0,
    )
    xs = [ids(seed=s) for s in range(10)]
    target = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        model.train()
        for t in steps:
            nn.functional.mse_loss(model(xs[t]), target).backward()
            opt.step()
            opt.zero_grad()

    def fresh(model: nn.Module) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        peftkit.attach(opt, model)
        return opt

    whole = peftkit.adapt(MODELS["mlp"](0), config)
    run(whole, fresh(whole), range(10))
    first = peftkit.adapt(MODELS["mlp"](0), config)
    opt = fresh(first)
    run(first, opt, range(4))  # mid-window: scores, masks and step must all come back
    peftkit.save_adapter(first, tmp_path / "adapter")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    second = peftkit.load_adapter(MODELS["mlp"](0), tmp_path / "adapter", trainable=True)
    opt = fresh(second)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    run(second, opt, range(4, 10))
    a, b = adapter_state(whole), adapter_state(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ranks(whole) == ranks(second) and sum(ranks(whole).values()) == 4


@pytest.mark.slow  # the Trainer import dominates
def test_trainer_and_plain_loop_give_the_same_masks(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from peftkit.integrations.hf import PeftkitCallback

    config = peftkit.DoraDynamicConfig(
        target_r=2,
        init_r=4,
        target_modules=["q_proj", "v_proj"],
        total_step=6,
        prune_interval=1,
        lora_dropout=0.0,
    )
    steps, accum = 6, 2
    x = ids(batch=1, vocab=128, seed=4).repeat(2, 1)  # two copies of one row
    ours = peftkit.adapt(MODELS["llama"](0), config).train()
    opt = torch.optim.AdamW(
        [p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    peftkit.attach(opt, ours)
    for _ in range(steps):
        for _ in range(accum):
            (ours(input_ids=x, labels=x).loss / accum).backward()
        opt.step()
        opt.zero_grad()

    theirs = peftkit.adapt(MODELS["llama"](0), config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    # every example is the same row, so the Trainer's shuffling cannot matter
    data = [{"input_ids": row, "labels": row} for row in x.repeat(steps * accum, 1)]
    transformers.Trainer(
        model=theirs, args=args, train_dataset=data, callbacks=[PeftkitCallback()]
    ).train()
    assert hook_of(theirs).final and hook_of(theirs).step == steps
    assert ranks(theirs) == ranks(ours)
    for a, b in zip(layers(ours), layers(theirs), strict=True):
        assert torch.equal(a.lora_mask, b.lora_mask)
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-5, rtol=1e-4)
    for s, t in zip(hook_of(ours).scores, hook_of(theirs).scores, strict=True):
        torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-4)
