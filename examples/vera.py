"""VeRA: one pair of frozen random projections shared by all layers, two small vectors trained."""

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
config = peftkit.VeraConfig(r=64, target_modules=["q_proj", "v_proj"])
model = peftkit.adapt(tiny_llama(), config)
names = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
print("trained:", names, "-", peftkit.trainable_parameters(model)[0], "parameters")
losses = train(model, lr=5e-2)  # VeRA wants a larger learning rate than LoRA
print(f"VeRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < losses[0]
# --8<-- [end:method]
