"""Two adapters, one base: load one, unload it, load the other (one adapter per model today)."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config)


ids = torch.arange(16).unsqueeze(0)
with tempfile.TemporaryDirectory() as out, torch.no_grad():
    expected = {}
    for name, seed in (("support", 1), ("legal", 2)):  # two different (random) adapters
        torch.manual_seed(seed)
        m = peftkit.adapt(tiny_llama(), peftkit.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peftkit.save_adapter(m, f"{out}/{name}")
        expected[name] = m.eval()(input_ids=ids).logits

    model = tiny_llama().eval()
    base = model(input_ids=ids).logits
    peftkit.load_adapter(model, f"{out}/support")
    assert torch.equal(model(input_ids=ids).logits, expected["support"])
    peftkit.unload(model)  # the base model again
    assert torch.equal(model(input_ids=ids).logits, base)
    peftkit.load_adapter(model, f"{out}/legal")
    assert torch.equal(model(input_ids=ids).logits, expected["legal"])
print("switched support -> base -> legal; every output as saved")
