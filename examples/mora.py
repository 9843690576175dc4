"""MoRA: one square matrix between parameter-free compression and decompression."""

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
models = {}
for mora_type in (6, 1):  # 6: RoPE rotation, full rank; 1: sharing, rank <= r-hat
    model = peftkit.adapt(tiny_llama(), peftkit.MoraConfig(r=8, mora_type=mora_type,
                                                           target_modules="all-linear"))
    losses = train(model, lr=5e-3)
    n = peftkit.trainable_parameters(model)[0]
    print(f"MoRA type {mora_type}: {n:,} parameters, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]
    models[mora_type] = model

with tempfile.TemporaryDirectory() as out:  # type 1's update has rank <= r-hat: an exact LoRA
    peftkit.export_lora(models[1], out)
    ids = torch.arange(16).unsqueeze(0)
    lora = peftkit.load_adapter(tiny_llama(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits,
                                   models[1].eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    print("type 1 exported as a plain LoRA:", peftkit.read_adapter_config(out)["r"])
# --8<-- [end:method]
