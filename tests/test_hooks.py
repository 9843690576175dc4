"""The training-hook mechanism: once per real optimizer step, never on a skipped one, idempotent
attach, state saved with the optimizer, and the HF Trainer callback."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from torch import nn

import peftkit
from peftkit.hooks import is_attached


class CountingHook:
    def __init__(self) -> None:
        self.before = 0
        self.after = 0

    def before_step(self) -> None:
        self.before += 1

    def after_step(self) -> None:
        self.after += 1

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "t": torch.tensor([self.after])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before, self.after = state["before"], state["after"]


def adapted_mlp() -> tuple[nn.Module, CountingHook]:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["fc1"]))
    hook = CountingHook()
    peftkit.register_hook(model, hook)
    return model, hook


def test_once_per_step_with_accumulation() -> None:
    model, hook = adapted_mlp()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peftkit.attach(opt, model)
    peftkit.attach(opt, model)  # idempotent
    assert is_attached(opt, model)
    for _step in range(3):
        for micro in range(4):
            output(model, ids(seed=micro)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert (hook.before, hook.after) == (3, 3)


def test_skipped_step_runs_no_hook() -> None:
    model, hook = adapted_mlp()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peftkit.attach(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    loss = output(model, ids()).sum()
    scaler.scale(loss).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("inf"))
    scaler.step(opt)  # overflow: optimizer.step() is skipped
    scaler.update()
    assert (hook.before, hook.after) == (0, 0)
    opt.zero_grad()
    scaler.scale(output(model, ids()).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert (hook.before, hook.after) == (1, 1)


def test_hook_state_travels_with_optimizer() -> None:
    model, hook = adapted_mlp()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peftkit.attach(opt, model)
    for _ in range(2):
        output(model, ids()).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    assert sd["peftkit_hooks"][0]["after"] == 2
    hook.before = hook.after = 0
    opt.load_state_dict(sd)
    assert (hook.before, hook.after) == (2, 2)


def test_detach_and_unload_stop_hooks() -> None:
    model, hook = adapted_mlp()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peftkit.attach(opt, model)
    peftkit.detach(opt, model)
    output(model, ids()).sum().backward()
    opt.step()
    assert hook.after == 0


def test_register_rejects_non_hooks() -> None:
    model, _ = adapted_mlp()
    with pytest.raises(TypeError, match="TrainingHook"):
        peftkit.register_hook(model, object())  # type: ignore[arg-type]


def test_trainer_callback_runs_once_per_optimizer_step(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from peftkit.integrations.hf import PeftkitCallback

    model = MODELS["llama"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    hook = CountingHook()
    peftkit.register_hook(model, hook)
    x = ids(batch=16, seq=8, vocab=128)
    data = [{"input_ids": row, "labels": row} for row in x]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[PeftkitCallback()]
    )
    trainer.train()
    assert (hook.before, hook.after) == (3, 3)


def test_hook_state_files_roundtrip(tmp_path: Any) -> None:
    from peftkit.hooks import load_hook_state, save_hook_state

    model, hook = adapted_mlp()
    hook.before, hook.after = 5, 7
    save_hook_state(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "peftkit_hooks.json",
        "peftkit_hooks.safetensors",
    ]
    hook.before = hook.after = 0
    assert load_hook_state(model, tmp_path)
    assert (hook.before, hook.after) == (5, 7)
    assert not load_hook_state(model, tmp_path / "none")


def test_trainer_resume_restores_hook_state(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from peftkit.integrations.hf import PeftkitCallback

    def run(max_steps: int, resume: str | None) -> CountingHook:
        model = MODELS["llama"](0)
        peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
        hook = CountingHook()
        peftkit.register_hook(model, hook)
        x = ids(batch=16, seq=8, vocab=128)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            max_steps=max_steps,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=[{"input_ids": r, "labels": r} for r in x],
            callbacks=[PeftkitCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return hook

    assert run(2, None).after == 2
    assert (tmp_path / "checkpoint-2" / "peftkit_hooks.json").is_file()
    resumed = run(4, str(tmp_path / "checkpoint-2"))
    assert (resumed.before, resumed.after) == (4, 4)
