"""Many adapters on one model: train two tasks in one batch, then serve both (and the base) in one
mixed batch, in forward and in generate. Runs in seconds on a CPU with a tiny random Llama."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)

# Two named adapters: any method, any rank, same or other targets.
peftkit.adapt(model, peftkit.LoraConfig(r=8, target_modules="all-linear"), name="math")
peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="code")
print(peftkit.adapter_names(model), peftkit.active_adapters(model))  # ['math', 'code'] ['math']

# Train both tasks in one batch: each adapter's gradients come from its own rows only.
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
batch = torch.randint(0, 128, (4, 16))
tasks = ["math", "code", "math", "code"]
for _ in range(3):
    with peftkit.route(model, tasks):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()

# Serve: one forward, one generate, a different adapter per row (None = the base model).
model.eval()
prompts = torch.randint(0, 128, (3, 5))
with torch.no_grad(), peftkit.route(model, ["math", None, "code"]):
    logits = model(prompts).logits
    tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), pad_token_id=0,
                            max_new_tokens=8, do_sample=False, num_beams=2)
print(logits.shape, tokens.shape)  # (3, 5, 128) (3, 13)

# Files: PEFT's multi-adapter layout ("default" at the root, the others in subfolders).
with tempfile.TemporaryDirectory() as folder:
    peftkit.save_adapter(model, folder)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(config)  # the same base weights as `model`
    peftkit.load_adapter(fresh, folder)  # every adapter in the folder, by its name
    print(peftkit.adapter_names(fresh))  # ['code', 'math']
