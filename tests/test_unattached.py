"""Hook-driven methods under the HF Trainer without PeftkitCallback (issue 17, item 5): the first
training step warns that the hooks are not attached; with the callback, nothing is said."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import ids, tiny_llama

import peftkit

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj"]
HOOKED: dict[str, Any] = {
    "adalora": lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=4,
                                             target_modules=TARGETS),
    "delta_lora": lambda: peftkit.DeltaLoraConfig(r=4, warmup_steps=0, target_modules=TARGETS),
    "dora_dynamic": lambda: peftkit.DoraDynamicConfig(target_r=2, init_r=4, total_step=4,
                                                      prune_interval=2, target_modules=TARGETS),
    "dylora": lambda: peftkit.DyLoraConfig(r=4, target_modules=TARGETS),
    "lora_fa+correction": lambda: peftkit.LoraFAConfig(r=4, gradient_correction=True,
                                                       target_modules=TARGETS),
}


def _train(method: str, out: Path, callbacks: list[Any]) -> list[str]:
    model = tiny_llama(0)
    peftkit.adapt(model, HOOKED[method]())
    x = ids(batch=4, seq=8, vocab=128)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=1, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in x],
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in seen if "peftkit.attach" in str(w.message)]


@pytest.mark.parametrize("method", list(HOOKED))
def test_training_without_the_callback_warns_and_with_it_does_not(
    method: str, tmp_path: Path
) -> None:
    from peftkit.integrations.hf import PeftkitCallback

    said = _train(method, tmp_path / "plain", [])
    assert said and "PeftkitCallback" in said[0]
    assert _train(method, tmp_path / "hooked", [PeftkitCallback()]) == []
