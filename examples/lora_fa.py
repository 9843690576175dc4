"""LoRA-FA: A frozen, only B trains; keeps r values per token for backward instead of the input."""

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
config = peftkit.LoraFAConfig(r=8, lora_alpha=16, target_modules="all-linear",
                              gradient_correction=True)  # LoRA-FA v2's B-gradient projection
model = peftkit.adapt(tiny_llama(), config)
trained = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
print("trained:", trained)  # lora_B only
losses = train(model)
print(f"LoRA-FA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert trained == ["lora_B"] and losses[-1] < losses[0]
# --8<-- [end:method]
