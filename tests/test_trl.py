"""TRL end to end (issue 17, item 3): DPO with the policy-with-adapters-off as its reference (no
second model), on LoRA and QLoRA; SFT with the callback, and PEFT loading what it saved."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, tiny_llama

import peftkit

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

WORDS = ["good", "bad", "movie", "film", "was", "is", "very", "quite", "the", "a", "plot", "fun"]


def _tokenizer() -> Any:
    """A word-level tokenizer built in memory (no download): 3 specials + WORDS, < 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _preferences(n: int = 4) -> Any:
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(WORDS), (n, 6), generator=g).tolist()
    rows = [[WORDS[i] for i in r] for r in pick]
    return datasets.Dataset.from_dict(
        {
            "prompt": [" ".join(r[:3]) for r in rows],
            "chosen": [" ".join(r[3:5]) + " good" for r in rows],
            "rejected": [" ".join(r[4:6]) + " bad" for r in rows],
        }
    )


def _args(cls: Any, out: Path, **kw: Any) -> Any:
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
        **kw,
    )


def _storages(*modules: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(),
                                                                       *m.buffers())}


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_dpo_reference_is_the_policy_with_adapters_off(qlora: bool, tmp_path: Path) -> None:
    from peftkit.integrations.trl import reference

    policy = tiny_llama(0)
    if qlora:
        peftkit.quantize_(policy)
    peftkit.adapt(policy, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ref = reference(policy)
    assert list(ref.parameters()) == [] and list(ref.buffers()) == []
    losses: list[torch.Tensor] = []

    class Recording(trl.DPOTrainer):  # type: ignore[misc]
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(*args, **kwargs)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    before = _storages(policy)
    trainer = Recording(
        model=policy,
        ref_model=ref,
        args=_args(trl.DPOConfig, tmp_path),  # TRL defaults: gradient checkpointing
        train_dataset=_preferences(),
        processing_class=_tokenizer(),
    )
    assert trainer.ref_model is ref
    trainer.train()
    # At step 1 the policy equals its base: the margin is exactly 0, the loss exactly ln 2.
    assert losses and torch.equal(losses[0], -F.logsigmoid(torch.zeros((), dtype=losses[0].dtype)))
    assert losses[0].item() == pytest.approx(math.log(2), abs=1e-7)
    # the reference reads the policy's own weights (NF4 ones under QLoRA): no second copy
    assert _storages(policy, ref) == before
    # and the policy did train
    assert any((a.lora_B != 0).any() for _, a in peftkit.adapters(policy))


def test_reference_matches_the_base_model_and_needs_an_adapter() -> None:
    from peftkit.integrations.trl import reference

    base, policy = tiny_llama(0), tiny_llama(0)
    peftkit.adapt(policy, peftkit.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                             init_lora_weights=False))
    x = ids(vocab=128)
    ref = reference(policy)
    with torch.no_grad():
        assert torch.equal(ref(x).logits, base(x).logits)
        assert not torch.equal(policy(x).logits, base(x).logits)  # and the policy is untouched
        assert torch.equal(ref.base_model(x).last_hidden_state, base.model(x).last_hidden_state)
    assert ref.get_output_embeddings() is policy.lm_head.base
    with pytest.raises(ValueError, match="adapt"):
        reference(tiny_llama(0))


def test_sft_trainer_end_to_end_and_peft_loads_the_result(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from peftkit.integrations.hf import PeftkitCallback

    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(8)]
    # TRL's defaults otherwise: gradient checkpointing on (bf16 autocast is left off on CPU)
    trainer = trl.SFTTrainer(
        model=model,
        args=_args(trl.SFTConfig, tmp_path / "run", max_length=16),
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=_tokenizer(),
        callbacks=[PeftkitCallback()],
    )
    trainer.args.max_steps = 2
    trainer.train()
    assert any((a.lora_B != 0).any() for _, a in peftkit.adapters(model))
    out = tmp_path / "out"
    trainer.save_model(str(out))
    model.eval()
    x = ids(vocab=len(WORDS) + 3)
    with torch.no_grad():
        y = model(x).logits
        theirs = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base_dir), out
        ).eval()
        torch.testing.assert_close(theirs(x).logits, y, atol=1e-5, rtol=1e-5)
