"""DyLoRA against its equations (truncated LoRA at scale α/b), PEFT (exported LoRA at rank b) and
itself (seeded rank draws: plain loop with accumulation = HF Trainer; exact resume)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output, sole
from torch import nn

import peftkit
from peftkit.methods.dylora import DyLoraLayer, ranks

R, ALPHA = 4, 8.0


class Two(nn.Module):
    """An embedding and a linear layer: both kinds DyLoRA wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))  # (B, T, 8)


def two(**kw: Any) -> nn.Module:
    torch.manual_seed(0)
    model = Two()
    peftkit.adapt(
        model, peftkit.DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["embed", "fc"], **kw)
    )
    perturb(model)
    return model


def perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def truncated(model: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
    """The paper's forward at rank b, written out: W₀ plus (α/b)·B[:, :b] A[:b] per layer."""
    e, fc = sole(model.embed), sole(model.fc)
    emb = e.base.weight + (ALPHA / b) * (e.lora_B[:, :b] @ e.lora_A[:b]).T  # (V, d)
    w = fc.base.weight + (ALPHA / b) * fc.lora_B[:, :b] @ fc.lora_A[:b]  # (out, in)
    return emb[x] @ w.T + fc.base.bias


def test_forward_at_rank_b_is_truncated_lora() -> None:
    model = two().eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), truncated(model, x, R))  # default: full rank
        for b in range(1, R + 1):
            peftkit.set_rank(model, b)
            assert ranks(model) == {"embed": b, "fc": b}
            torch.testing.assert_close(model(x), truncated(model, x, b))


def test_training_forward_uses_the_drawn_rank() -> None:
    model = two().train()
    hook = peftkit.core.get_state(model).hooks[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    peftkit.attach(opt, model)
    x = ids()
    for _ in range(4):
        with torch.no_grad():
            torch.testing.assert_close(model(x), truncated(model, x, hook.rank))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    peftkit.set_rank(model, 2)  # training ignores the evaluation rank
    with torch.no_grad():
        torch.testing.assert_close(model(x), truncated(model, x, hook.rank))


def grads(frozen: bool, b: int) -> tuple[DyLoraLayer, torch.Tensor]:
    model = two(frozen=frozen).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    peftkit.attach(opt, model)
    for layer in (sole(model.embed), sole(model.fc)):
        layer.set_train_rank(b)
    h = model.embed(ids()).detach().requires_grad_(True)
    model.fc(h).square().sum().backward()
    assert h.grad is not None
    return sole(model.fc), h.grad


@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_reaches_only_the_trained_components(frozen: bool) -> None:
    b = 3
    layer, grad_x = grads(frozen, b)
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    row = layer.lora_A.grad.abs().sum(dim=1)  # (r,)
    col = layer.lora_B.grad.abs().sum(dim=0)  # (r,)
    live = [b - 1] if frozen else list(range(b))
    for i in range(R):
        assert (row[i] > 0) == (i in live), (i, row)
        assert (col[i] > 0) == (i in live), (i, col)
    # frozen mode detaches weights, not activations: the gradient to the input is unchanged
    _, grad_x_all = grads(not frozen, b)
    torch.testing.assert_close(grad_x, grad_x_all)


def draws(seed: int, n: int, r_min: int = 1, r: int = R) -> list[int]:
    """The specified sequence: b = randint(r_min, r + 1) from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(r_min, r + 1, (1,), generator=g)) for _ in range(n)]


def record_ranks(model: nn.Module) -> list[int]:
    seen: list[int] = []
    layer = next(a for _, a in peftkit.adapters(model))
    layer.register_forward_pre_hook(lambda m, _: seen.append(m.train_rank) if m.training else None)
    return seen


def test_rank_draws_follow_the_seed_and_cover_the_range() -> None:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.DyLoraConfig(r=6, r_min=2, target_modules=["fc1"], seed=7))
    hook = peftkit.core.get_state(model).hooks[0]
    got = [hook.rank]
    for _ in range(2999):
        hook.after_step()
        got.append(hook.rank)
    assert got[:50] == draws(7, 50, r_min=2, r=6)
    counts = torch.bincount(torch.tensor(got), minlength=7)
    assert counts[:2].sum() == 0
    assert ((counts[2:] - 600).abs() < 100).all(), counts  # ±4 σ around 3000/5


def plain_loop(model: nn.Module, x: torch.Tensor, steps: int, accum: int) -> list[int]:
    seen = record_ranks(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    for _ in range(steps):
        for _ in range(accum):
            (model(input_ids=x, labels=x).loss / accum).backward()
        opt.step()
        opt.zero_grad()
    return seen


@pytest.mark.slow  # the Trainer import dominates
def test_one_rank_per_optimizer_step_plain_loop_and_trainer(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from peftkit.integrations.hf import PeftkitCallback

    config = peftkit.DyLoraConfig(r=R, target_modules=["q_proj", "v_proj"], seed=3)
    steps, accum = 4, 2
    x = ids(batch=2, vocab=128)
    ours = plain_loop(peftkit.adapt(MODELS["llama"](0), config), x, steps, accum)
    expected = draws(3, steps)
    assert ours == [b for b in expected for _ in range(accum)]

    model = peftkit.adapt(MODELS["llama"](0), config)
    seen = record_ranks(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = [{"input_ids": row, "labels": row} for row in x.repeat(steps * accum, 1)]
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[PeftkitCallback()]
    )
    trainer.train()
    assert seen == ours


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.state.adapter_tensors(model).items()}


def test_resume_continues_exactly(tmp_path: Any) -> None:
    config = peftkit.DyLoraConfig(r=R, target_modules=["fc1", "fc2"], frozen=True, seed=5)
    xs = [ids(seed=s) for s in range(8)]
    target = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        model.train()
        for t in steps:
            nn.functional.mse_loss(model(xs[t]), target).backward()
            opt.step()
            opt.zero_grad()

    def fresh(model: nn.Module) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        peftkit.attach(opt, model)
        return opt

    whole = peftkit.adapt(MODELS["mlp"](0), config)
    run(whole, fresh(whole), range(8))

    first = peftkit.adapt(MODELS["mlp"](0), config)
    opt = fresh(first)
    run(first, opt, range(4))
    peftkit.save_adapter(first, tmp_path / "adapter")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")

    second = peftkit.load_adapter(MODELS["mlp"](0), tmp_path / "adapter", trainable=True)
    opt = fresh(second)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    run(second, opt, range(4, 8))
    a, b = adapter_state(whole), adapter_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[next(iter(a))], adapter_state(first)[next(iter(a))])


@pytest.mark.parametrize("rank", [1, 3, None])
def test_export_at_rank_loads_in_peft(rank: int | None, tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    model = MODELS["llama"](0)
    peftkit.adapt(
        model,
        peftkit.DyLoraConfig(
            r=R, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"]
        ),
    )
    perturb(model, 1)
    x = ids(vocab=128)
    peftkit.set_rank(model, 2)  # rank=None exports this one
    b = 2 if rank is None else rank
    peftkit.export_lora(model, tmp_path, rank=rank)
    peftkit.set_rank(model, b)
    y = output(model, x)
    cfg = peftkit.read_adapter_config(tmp_path)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (b, b, {})
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)


def test_saved_adapter_is_the_full_rank_lora_for_peft(tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    model = MODELS["llama"](0)
    peftkit.adapt(model, peftkit.DyLoraConfig(r=R, lora_alpha=16, target_modules=["q_proj"]))
    perturb(model, 2)
    x = ids(vocab=128)
    y = output(model, x)  # full rank, scale α/r
    peftkit.save_adapter(model, tmp_path)
    cfg = peftkit.read_adapter_config(tmp_path)
    assert (cfg["peft_type"], cfg["peftkit_method"], cfg["r"]) == ("LORA", "dylora", R)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the DyLoRA-only keys it ignores
        theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    ours = peftkit.load_adapter(MODELS["llama"](0), tmp_path)
    assert ranks(ours) == {f"model.layers.{i}.self_attn.q_proj": R for i in (0, 1)}
    peftkit.set_rank(ours, 1)
    peftkit.set_rank(model, 1)
    assert torch.equal(output(ours, x), output(model, x))


def test_merge_at_rank_and_rank_errors() -> None:
    model = two().eval()
    x = ids()
    peftkit.set_rank(model, 2)
    y = model(x)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        peftkit.set_rank(model, 3)
    peftkit.unmerge(model)
    for bad in (0, R + 1, 2.0):
        with pytest.raises(ValueError, match=rf"rank {bad!r} is outside 1..{R}"):
            peftkit.set_rank(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        peftkit.export_lora(model, "unused", rank=5)
    lora = peftkit.adapt(MODELS["mlp"](0), peftkit.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="no DyLoRA layers"):
        peftkit.set_rank(lora, 1)


def test_unattached_training_is_full_rank_and_warns() -> None:
    model = two().train()
    x = ids()
    with pytest.warns(UserWarning, match="peftkit.attach"):
        y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y, truncated(model, x, R))
