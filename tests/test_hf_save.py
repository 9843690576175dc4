"""What HF saves must be true (issue 17, item 2): ``model.save_pretrained`` and the Trainer write
the adapter in PEFT's layout, ``from_pretrained`` loads it right, checkpoints hold no frozen base,
and a Trainer run resumed from one is bit-exact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ids, tiny_llama
from safetensors.torch import load_file

import peftkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _saved_base(tmp_path: Path) -> Path:
    """A tiny Llama written to disk, so that ``base_model_name_or_path`` names a real folder."""
    path = tmp_path / "base"
    tiny_llama(0).save_pretrained(path)
    return path


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_pretrained_writes_the_adapter_that_from_pretrained_loads(
    use_dora: bool, tmp_path: Path
) -> None:
    base = _saved_base(tmp_path)
    model = _load(base)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            use_dora=use_dora))
    _perturb(model)
    x = ids(vocab=128)
    with torch.no_grad():
        y = model(x).logits
    out = tmp_path / "out"
    model.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES  # no config.json, no full model
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        str(base)
    )
    if use_dora:
        # Note: transformers 5.25's from_pretrained(adapter folder) drops DoRA's magnitude (PEFT's
        # own DoRA files too: logits off by 7e-3); PEFT's loader reads it.
        peft = pytest.importorskip("peft")
        loaded = peft.PeftModel.from_pretrained(_load(base), out).eval()
    else:
        # transformers reads adapter_config.json, loads the named base, then the adapter (PEFT)
        loaded = _load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, y, atol=1e-5, rtol=1e-5)
    again = peftkit.load_adapter(_load(base), out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, y)
    # once unloaded, the model is a plain model again and saves as one
    peftkit.unload(model)
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()


def test_save_pretrained_refuses_push_to_hub(tmp_path: Path) -> None:
    model = tiny_llama(0)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="save_adapter"):
        model.save_pretrained(tmp_path, push_to_hub=True)


def _trainer(model: torch.nn.Module, out: Path, max_steps: int, **kw: Any) -> Any:
    from peftkit.integrations.hf import PeftkitCallback

    x = ids(batch=16, seq=8, vocab=128)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r, "labels": r} for r in x],
        callbacks=[PeftkitCallback()],
    )


def _adapted(base: Path, method: str) -> torch.nn.Module:
    model = _load(base).train()
    targets = ["q_proj", "v_proj"]
    if method == "adalora":  # a hook-driven method: its state must resume too
        config: peftkit.AdapterConfig = peftkit.AdaLoraConfig(
            init_r=4, target_r=2, total_step=4, tinit=1, tfinal=1, deltaT=1,
            target_modules=targets)  # fmt: skip
    else:
        config = peftkit.LoraConfig(r=4, target_modules=targets, modules_to_save=["lm_head"])
    peftkit.adapt(model, config)
    return model


@pytest.mark.parametrize("method", ["lora+head", "adalora"])
def test_trainer_saves_the_adapter_and_resumes_bit_exact(method: str, tmp_path: Path) -> None:
    base = _saved_base(tmp_path)
    straight = _adapted(base, method)
    run = tmp_path / "run"
    trainer = _trainer(straight, run, 4, save_strategy="steps", save_steps=2)
    trainer.train()
    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert ADAPTER_FILES <= {p.name for p in final.iterdir()}
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    x = ids(vocab=128)
    straight.eval()
    with torch.no_grad():
        y = straight(x).logits
        got = peftkit.load_adapter(_load(base), final)(x).logits
        # AdaLoRA's file holds the pruned factors (PEFT's form): equal up to round-off
        torch.testing.assert_close(got, y, atol=1e-6 if method == "adalora" else 0, rtol=0)

    ckpt = run / "checkpoint-2"
    assert ADAPTER_FILES <= {p.name for p in ckpt.iterdir()}
    resume = load_file(str(ckpt / "model.safetensors"))
    base_keys = set(_load(base).state_dict())
    assert resume and not any(k in base_keys or ".base." in k for k in resume)  # no frozen base

    resumed = _adapted(base, method)
    # the same output_dir: PeftkitCallback reads the hook state from checkpoint-N there
    _trainer(resumed, run, 4, save_strategy="no").train(resume_from_checkpoint=str(ckpt))
    got, want = resumed.state_dict(), straight.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
