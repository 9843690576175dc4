"""The 30-second tour on a tiny random-init Llama: adapt, train, save, load, merge, export."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights every call
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config)


model = tiny_llama()
peftkit.adapt(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
trainable, total = peftkit.trainable_parameters(model)
print(f"trainable {trainable:,} of {total:,} parameters")

opt = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2)
peftkit.attach(opt, model)  # runs hook-driven methods once per optimizer step; harmless for LoRA
batch = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
losses = []
for _ in range(20):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < losses[0]

model.eval()
with torch.no_grad():
    adapted = model(input_ids=batch).logits
    with peftkit.disable_adapters(model):  # exactly the base model inside
        base = model(input_ids=batch).logits
    assert torch.equal(base, tiny_llama()(input_ids=batch).logits)

with tempfile.TemporaryDirectory() as out:
    peftkit.save_adapter(model, f"{out}/adapter")  # PEFT's PeftModel.from_pretrained loads it
    fresh = peftkit.load_adapter(tiny_llama(), f"{out}/adapter").eval()  # strict
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=batch).logits, adapted)
    peftkit.export_lora(model, f"{out}/plain-lora")  # a plain PEFT LoRA where one exists exactly

peftkit.merge(model)  # explicit; a second merge is refused
peftkit.unmerge(model)
merged = peftkit.merge_and_unload(model, probe=batch)  # checked against the adapter on `probe`
print(type(merged.model.layers[0].self_attn.q_proj).__name__)  # a plain nn.Linear again
