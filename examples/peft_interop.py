"""Files both ways: PEFT loads peftkit's adapter, peftkit loads PEFT's, with identical logits."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config)


def train(model, steps: int = 10, lr: float = 1e-2, optimizer=None) -> list[float]:
    opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    peftkit.attach(opt, model)  # hook-driven methods act once per optimizer step
    batch = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (the library never imports it)

ids = torch.arange(16).unsqueeze(0)
with tempfile.TemporaryDirectory() as out, torch.no_grad():
    ours = peftkit.adapt(tiny_llama(), peftkit.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peftkit.save_adapter(ours, f"{out}/ours")
    theirs = PeftModel.from_pretrained(tiny_llama(), f"{out}/ours").eval()
    assert torch.equal(theirs(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)

    peft_model = get_peft_model(tiny_llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj"], init_lora_weights=False))
    peft_model.save_pretrained(f"{out}/peft")
    loaded = peftkit.load_adapter(tiny_llama(), f"{out}/peft").eval()
    assert torch.equal(loaded(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)
print("PEFT -> peftkit and peftkit -> PEFT: identical logits")
