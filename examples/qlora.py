"""QLoRA: quantize the base to NF4 (double quantization), then any method on top."""

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
model = peftkit.quantize_(tiny_llama())  # every nn.Linear but the output head -> NF4Linear
print(type(model.model.layers[0].self_attn.q_proj).__name__)
peftkit.adapt(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
losses = train(model)
print(f"QLoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < losses[0]

try:
    peftkit.merge(model)  # merging into a 4-bit weight would round the update away
except (TypeError, ValueError) as e:
    print("merge refused:", str(e)[:80], "...")
ids = torch.arange(16).unsqueeze(0)
dense = peftkit.merge_and_unload(model.eval(), probe=ids)  # a dense model, checked on the probe
print(type(dense.model.layers[0].self_attn.q_proj).__name__)
# --8<-- [end:method]
