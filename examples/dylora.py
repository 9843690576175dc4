"""DyLoRA: one training, every rank b <= r usable afterwards (set_rank, export at rank b)."""

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
config = peftkit.DyLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", seed=0)
model = peftkit.adapt(tiny_llama(), config)
losses = train(model, steps=20)  # each optimizer step draws one rank b ~ U{1..8} (the hook)
print(f"DyLoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
model.eval()
with torch.no_grad():
    for b in (1, 2, 4, 8):
        loss = peftkit.set_rank(model, b)(input_ids=ids, labels=ids).loss
        print(f"  rank {b}: loss {loss.item():.3f}")
    with tempfile.TemporaryDirectory() as out:
        peftkit.export_lora(model, out, rank=4)  # a plain PEFT LoRA of rank 4
        assert peftkit.read_adapter_config(out)["r"] == 4
        plain = peftkit.load_adapter(tiny_llama(), out).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits,
                                   peftkit.set_rank(model, 4)(input_ids=ids).logits)
# --8<-- [end:method]
