"""LongLoRA: LoRA + trained embeddings and norms + S2-Attn in training, position interpolation."""

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
config = peftkit.LongLoraConfig(r=8, group_size_ratio=0.25, context_factor=2.0)
model = peftkit.adapt(tiny_llama(), config)  # q/k/v/o, embed_tokens and every *norm trained
full = [n.removesuffix(".copies.default.weight") for n, p in model.named_parameters()
        if p.requires_grad and n.endswith(".copies.default.weight")]  # one copy per adapter
print("trained in full:", full)  # model.embed_tokens, every *norm, model.norm
assert "model.embed_tokens" in full and "model.norm" in full

ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
for _ in range(5):  # training mode: S2-Attn, groups of 256 / 4 = 64 tokens
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
print(f"LongLoRA: last training loss {loss.item():.3f}")
model.eval()  # eval mode: the model's own full attention, positions interpolated x2
with torch.no_grad():
    print(f"eval loss at 256 tokens: {model(input_ids=ids, labels=ids).loss.item():.3f}")
# --8<-- [end:method]
