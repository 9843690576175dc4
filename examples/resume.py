"""Resume in your own loop: adapter + optimizer state (which carries the hooks' state) is enough.

DyLoRA draws a rank at every optimizer step from a generator held by its hook; a resumed run must
continue the same draws. Six steps in one go equal three steps, a save, a load, and three more.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config)


def start(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    return opt


def steps(model, opt, n: int) -> None:
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


config = peftkit.DyLoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
straight = peftkit.adapt(tiny_llama(), config)
steps(straight, start(straight), 6)

with tempfile.TemporaryDirectory() as ckpt:
    first = peftkit.adapt(tiny_llama(), config)
    opt = start(first)
    steps(first, opt, 3)
    peftkit.save_adapter(first, f"{ckpt}/adapter")
    torch.save(opt.state_dict(), f"{ckpt}/optimizer.pt")  # with its "peftkit_hooks" entry

    resumed = peftkit.load_adapter(tiny_llama(), f"{ckpt}/adapter", trainable=True)
    opt = start(resumed)  # attach before loading the optimizer state, so the hooks get theirs
    opt.load_state_dict(torch.load(f"{ckpt}/optimizer.pt"))
    steps(resumed, opt, 3)

for (name, a), (_, b) in zip(peftkit.adapters(straight), peftkit.adapters(resumed), strict=True):
    torch.testing.assert_close(a.lora_B, b.lora_B, msg=name)
print("6 steps in one run == 3 steps, save, load, 3 steps")
