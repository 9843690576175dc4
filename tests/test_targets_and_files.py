"""Target matching, adapt/unload, and the strictness and atomicity of adapter files."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output, sole
from torch import nn

import peftkit
from peftkit.core import Adapter


def names(model: nn.Module) -> list[str]:
    return sorted(n for n, _ in peftkit.adapters(model))


def test_suffix_regex_and_all_linear() -> None:
    m = peftkit.adapt(MODELS["llama"](0), peftkit.LoraConfig(target_modules=["q_proj"]))
    assert names(m) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    m = peftkit.adapt(
        MODELS["llama"](0), peftkit.LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj")
    )
    assert names(m) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    m = peftkit.adapt(MODELS["llama"](0), peftkit.LoraConfig(target_modules="all-linear"))
    assert len(names(m)) == 14 and "lm_head" not in names(m)
    m = peftkit.adapt(MODELS["gpt2"](0), peftkit.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names(m) and len(names(m)) == 8  # Conv1D layers count as linear
    m = peftkit.adapt(
        MODELS["bert"](0),
        peftkit.LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]),
    )
    assert "classifier" not in names(m)


def test_an_adapted_layer_answers_for_its_base_weight_and_transformers_can_tie_it() -> None:
    """Models read a layer's ``weight`` from outside its forward (T5's feed-forward casts to
    ``wo.weight.dtype``) and transformers ties an output head by setting ``head.weight``: the
    wrapper reads and sets its base's, so T5 runs with ``wo`` adapted and tying an adapted head
    leaves one shared tensor and the same state-dict keys (it used to add a stray one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t5 = peftkit.adapt(MODELS["t5"](0), peftkit.LoraConfig(r=2, target_modules="all-linear"))
    assert any(n.endswith("DenseReluDense.wo") for n in names(t5))
    wo = t5.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert wo.weight is wo.base.weight and wo.bias is None
    x = ids(batch=2, seq=5, vocab=125) + 3
    assert torch.isfinite(t5(input_ids=x, decoder_input_ids=x).logits).all()

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    keys = set(model.state_dict())
    model.lm_head.base.weight = nn.Parameter(model.lm_head.base.weight.detach().clone())  # untie
    model.tie_weights()
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    assert set(model.state_dict()) == keys


def test_layers_to_transform_and_exclude() -> None:
    m = peftkit.adapt(
        MODELS["llama"](0),
        peftkit.LoraConfig(
            target_modules=["q_proj", "v_proj"], layers_to_transform=[1], exclude_modules=["v_proj"]
        ),
    )
    assert names(m) == ["model.layers.1.self_attn.q_proj"]


def test_unwrappable_target_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"model\.norm.*LlamaRMSNorm"):
        peftkit.adapt(MODELS["llama"](0), peftkit.LoraConfig(target_modules=["norm"]))


def test_target_matching_nothing_lists_real_names() -> None:
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        peftkit.adapt(MODELS["llama"](0), peftkit.LoraConfig(target_modules=["query"]))


def test_a_name_is_used_once_and_unload() -> None:
    model = MODELS["mlp"](0)
    fc1 = model.fc1
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["fc1"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["fc2"]))
    assert peftkit.unload(model) is model
    assert model.fc1 is fc1 and isinstance(model.head, nn.Linear)
    assert not any(isinstance(m, Adapter) for m in model.modules())
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["fc2"]))


def test_config_is_frozen_and_validated() -> None:
    cfg = peftkit.LoraConfig(target_modules=["q"])
    with pytest.raises(AttributeError):
        cfg.r = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        peftkit.LoraConfig(8, target_modules=["q"])  # type: ignore[misc]
    with pytest.raises(ValueError, match="rank_pattern"):
        peftkit.LoraConfig(target_modules=["q"], rank_pattern={"q": 0})


def saved(tmp_path: Any) -> tuple[nn.Module, Any]:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    peftkit.save_adapter(model, tmp_path)
    return model, tmp_path


def edit_config(path: Any, **changes: Any) -> None:
    f = path / "adapter_config.json"
    d = json.loads(f.read_text())
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    f.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("use_qalora", True, "use_qalora"),
        ("lora_bias", True, "lora_bias"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("target_parameters", ["w"], "target_parameters"),
        ("peft_type", KeyError, "peft_type"),
        ("r", KeyError, "'r'"),
        ("target_modules", KeyError, "target_modules"),
        ("some_future_key", 3, "some_future_key"),
        ("peft_type", "IA3", "IA3"),
    ],
)
def test_config_keys_are_strict(tmp_path: Any, key: str, value: Any, match: str) -> None:
    _, path = saved(tmp_path)
    edit_config(path, **{key: value})
    fresh = MODELS["mlp"](0)
    with pytest.raises(ValueError, match=match):
        peftkit.load_adapter(fresh, path)
    assert not any(isinstance(m, Adapter) for m in fresh.modules())


def test_null_and_default_unknown_keys_are_ignored(tmp_path: Any) -> None:
    model, path = saved(tmp_path)
    edit_config(path, use_qalora=False, some_future_key=None, eva_config=None, task_type="X")
    peftkit.load_adapter(MODELS["mlp"](0), path)


def test_tensors_are_strict(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    _, path = saved(tmp_path)
    f = path / "adapter_model.safetensors"
    good = load_file(str(f))
    bad = dict(good)
    bad.pop("base_model.model.fc1.lora_A.weight")
    bad["base_model.model.fc9.lora_A.weight"] = torch.zeros(1)
    bad["base_model.model.fc2.lora_B.weight"] = torch.zeros(3, 3)
    save_file(bad, str(f))
    fresh = MODELS["mlp"](0)
    with pytest.raises(ValueError) as e:
        peftkit.load_adapter(fresh, path)
    msg = str(e.value)
    assert "missing: base_model.model.fc1.lora_A.weight" in msg
    assert "unexpected: base_model.model.fc9.lora_A.weight" in msg
    assert "wrong shape: base_model.model.fc2.lora_B.weight (3, 3)" in msg
    assert not any(isinstance(m, Adapter) for m in fresh.modules())


def test_corrupted_or_missing_files(tmp_path: Any) -> None:
    _, path = saved(tmp_path)
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupted"):
        peftkit.load_adapter(MODELS["mlp"](0), path)
    with pytest.raises(FileNotFoundError, match="no such adapter"):
        peftkit.load_adapter(MODELS["mlp"](0), path / "nope")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        peftkit.load_adapter(MODELS["mlp"](0), path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        peftkit.load_adapter(MODELS["mlp"](0), path)


def test_failed_save_keeps_previous_adapter(tmp_path: Any, monkeypatch: Any) -> None:
    model, path = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        sole(model.fc1).lora_A.add_(1.0)

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("peftkit.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        peftkit.save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_export_lora_equals_model_and_rank_is_refused(tmp_path: Any) -> None:
    model = MODELS["gpt2"](0)
    peftkit.adapt(
        model, peftkit.LoraConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights=False)
    )
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.export_lora(model, tmp_path)
    again = peftkit.load_adapter(MODELS["gpt2"](0), tmp_path)
    torch.testing.assert_close(output(again, x), y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        peftkit.export_lora(model, tmp_path / "r2", rank=2)


def test_embedding_dropout_is_off_and_dropout_only_on_branch() -> None:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["embed", "fc1"], lora_dropout=0.5))
    assert isinstance(sole(model.embed).dropout, nn.Identity)
    assert isinstance(sole(model.fc1).dropout, nn.Dropout)
    model.train()
    with peftkit.disable_adapters(model):
        base = MODELS["mlp"](0).train()
        x = ids()
        assert torch.equal(output(model, x), output(base, x))
