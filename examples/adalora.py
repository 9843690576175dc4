"""AdaLoRA: a global rank budget, pruned by importance once per optimizer step (no loop changes)."""

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


# --8<-- [start:method]
config = peftkit.AdaLoraConfig(init_r=12, target_r=4, total_step=20, tinit=4, tfinal=4,
                               deltaT=2, lora_alpha=16, target_modules="all-linear")
model = peftkit.adapt(tiny_llama(), config)
losses = train(model, steps=20)  # peftkit.attach runs the budget schedule; nothing to call
print(f"AdaLoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

with tempfile.TemporaryDirectory() as out:
    peftkit.save_adapter(model, out)  # the kept rows, and PEFT's rank_pattern
    pattern = peftkit.read_adapter_config(out)["rank_pattern"]
    kept = [sum(mask) for mask in pattern.values()]
    print(f"ranks kept per matrix: {kept}; total {sum(kept)} of {12 * len(kept)}")
    assert sum(kept) == 4 * len(kept)  # the final budget: target_r on average
# --8<-- [end:method]
