"""DoRA-Mao (dynamic rank distribution): rank-1 components gated, pruned by importance."""

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
config = peftkit.DoraDynamicConfig(target_r=4, init_r=8, total_step=40, prune_interval=2,
                                   lora_dropout=0.0, lora_alpha=16, target_modules="all-linear")
model = peftkit.adapt(tiny_llama(), config)
losses = train(model, steps=40)  # importance, pruning and the DEM regulariser run in the hook
print(f"DoRA-Mao: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

with tempfile.TemporaryDirectory() as out:
    peftkit.export_lora(model, out)  # the surviving components, as a plain PEFT LoRA
    ranks = peftkit.read_adapter_config(out)["rank_pattern"]
    print(f"surviving components: {sum(ranks.values())} of {8 * len(ranks)}")
    assert sum(ranks.values()) < 8 * len(ranks)  # pruning has run
# --8<-- [end:method]
