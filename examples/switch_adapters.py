"""Two adapters, one base: load both by name, switch between them, or drop one."""

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
    peftkit.load_adapter(model, f"{out}/support", name="support")  # the first one is active
    peftkit.load_adapter(model, f"{out}/legal", name="legal")
    assert torch.equal(model(input_ids=ids).logits, expected["support"])
    peftkit.set_adapter(model, "legal")
    assert torch.equal(model(input_ids=ids).logits, expected["legal"])
    with peftkit.disable_adapters(model):  # the base model inside
        assert torch.equal(model(input_ids=ids).logits, base)
    peftkit.delete_adapter(model, "support")  # frees its tensors
    assert peftkit.adapter_names(model) == ["legal"]
print("support -> legal -> base -> legal alone; every output as saved")
