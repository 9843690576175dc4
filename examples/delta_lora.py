"""Delta-LoRA: after the warm-up, W follows the change of BA (W += lambda * s * delta(BA))."""

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
model = peftkit.adapt(tiny_llama(), peftkit.DeltaLoraConfig(
    r=8, lora_alpha=16, delta_lambda=2.0, warmup_steps=3, target_modules=["q_proj", "v_proj"]))
q = model.model.layers[0].self_attn.q_proj  # an AdaptedLayer: .base and .adapters by name
w0 = q.base.weight.detach().clone()
losses = train(model, steps=10)  # peftkit.attach runs the update; W gets no gradient
print(f"Delta-LoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
      f"|W - W0| = {(q.base.weight - w0).norm():.4f}")

ids = torch.arange(16).unsqueeze(0)
with tempfile.TemporaryDirectory() as out, torch.no_grad():
    peftkit.export_lora(model, out)  # the exact rank-2r PEFT LoRA on the original base
    plain = peftkit.load_adapter(tiny_llama(), out).eval()
    print("exported rank:", peftkit.read_adapter_config(out)["r"])
    torch.testing.assert_close(plain(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)
# --8<-- [end:method]
