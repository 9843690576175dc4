"""DoRA (Liu et al.): LoRA on the direction, a trained magnitude per output unit."""

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
config = peftkit.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear")
model = peftkit.adapt(tiny_llama(), config)
q = model.model.layers[0].self_attn.q_proj.adapters["default"]  # the layer's adapter by name
print(type(q).__name__, "m:", tuple(q.lora_magnitude_vector.shape))  # one per output unit
losses = train(model)
print(f"DoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < losses[0]

ids = torch.arange(16).unsqueeze(0)
model.eval()
with torch.no_grad():
    before = model(input_ids=ids).logits
    peftkit.merge(model)  # exact: W' = diag(m / ||W + sBA||) (W + sBA)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
# --8<-- [end:method]
