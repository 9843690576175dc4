"""VeRA against Hugging Face PEFT (the oracle) and against its own equations."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.methods.vera import VeraLayer, VeraProjections, projections

peft = pytest.importorskip("peft")

# Mixed shapes: llama q (32→32), up (32→64), down (64→32); GPT-2 c_attn (32→96), c_fc (32→128),
# c_proj (32→32 and 128→32), all Conv1D.
CASES: dict[str, tuple[str, list[str]]] = {
    "llama-mixed": ("llama", ["q_proj", "up_proj", "down_proj"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc", "c_proj"]),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(kind: str, targets: list[str], **kw: Any) -> Any:
    return peft.get_peft_model(MODELS[kind](0), peft.VeraConfig(r=8, target_modules=targets, **kw))


@pytest.mark.parametrize("case", list(CASES))
def test_projections_equal_peft_bit_for_bit(case: str) -> None:
    kind, targets = CASES[case]
    theirs = _peft_model(kind, targets, projection_prng_key=7)
    ours = peftkit.adapt(
        MODELS[kind](0), peftkit.VeraConfig(r=8, target_modules=targets, projection_prng_key=7)
    )
    a, b = theirs.base_model.vera_A["default"], theirs.base_model.vera_B["default"]
    shared = ours.peftkit_shared.default
    assert isinstance(shared, VeraProjections)
    assert torch.equal(shared.vera_A, a) and torch.equal(shared.vera_B, b)
    # sized to the per-dimension maximum of the targets
    shapes = [(lay.in_features, lay.out_features) for _, lay in peftkit.adapters(ours)]
    assert a.shape == (8, max(i for i, _ in shapes)) and b.shape == (max(o for _, o in shapes), 8)
    pa, pb = projections(8, a.shape[1], b.shape[0], 7)
    assert torch.equal(pa, a) and torch.equal(pb, b)


def test_init_consumes_the_global_rng_like_peft() -> None:
    # init_weights=False keeps λ_d ~ N(0, 1) from the global RNG: the same draws as PEFT's.
    torch.manual_seed(3)
    theirs = _peft_model("llama", ["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(3)
    ours = peftkit.adapt(
        MODELS["llama"](0),
        peftkit.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    sd = theirs.state_dict()
    for name, layer in peftkit.adapters(ours):
        assert torch.equal(layer.lambda_d, sd[f"base_model.model.{name}.vera_lambda_d.default"])
        assert torch.equal(layer.lambda_b, torch.ones(layer.out_features))


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_peftkit(case: str, save_projection: bool, tmp_path: Any) -> None:
    kind, targets = CASES[case]
    theirs = _peft_model(kind, targets, save_projection=save_projection)
    _perturb(theirs, 1)
    theirs.eval()
    x = ids(vocab=128)
    y = output(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys) == save_projection
    ours = peftkit.load_adapter(MODELS[kind](0), tmp_path)
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_peft(case: str, save_projection: bool, tmp_path: Any) -> None:
    kind, targets = CASES[case]
    model = peftkit.adapt(
        MODELS[kind](0),
        peftkit.VeraConfig(
            r=8, target_modules=targets, save_projection=save_projection, d_initial=0.05
        ),
    )
    _perturb(model, 2)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in tensors) == save_projection
    assert ("base_model.vera_B" in tensors) == save_projection
    assert all(
        k.endswith(("vera_lambda_b", "vera_lambda_d"))
        for k in tensors
        if k.startswith("base_model.model.")
    )
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    again = peftkit.load_adapter(MODELS[kind](0), tmp_path)
    assert torch.equal(output(again, x), y)


def test_gradients_equal_peft() -> None:
    targets = ["q_proj", "up_proj", "down_proj"]
    theirs = _peft_model("llama", targets, init_weights=False)
    ours = peftkit.adapt(MODELS["llama"](0), peftkit.VeraConfig(r=8, target_modules=targets))
    sd = theirs.state_dict()
    with torch.no_grad():
        for name, layer in peftkit.adapters(ours):
            layer.lambda_b.copy_(sd[f"base_model.model.{name}.vera_lambda_b.default"])
            layer.lambda_d.copy_(sd[f"base_model.model.{name}.vera_lambda_d.default"])
    x = ids(vocab=128)
    for m in (theirs, ours):
        m.train()
        m(input_ids=x, labels=x).loss.backward()
    for name, layer in peftkit.adapters(ours):
        mod = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lambda_b.grad, mod.vera_lambda_b["default"].grad)
        torch.testing.assert_close(layer.lambda_d.grad, mod.vera_lambda_d["default"].grad)


def test_delta_weight_is_the_paper_equation() -> None:
    model = peftkit.adapt(
        MODELS["llama"](0), peftkit.VeraConfig(r=8, target_modules=["up_proj", "down_proj"])
    )
    _perturb(model, 4)
    a, b = model.peftkit_shared.default.vera_A, model.peftkit_shared.default.vera_B
    for _, layer in peftkit.adapters(model):
        assert isinstance(layer, VeraLayer)
        k, d = layer.in_features, layer.out_features
        expected = torch.diag(layer.lambda_b) @ b[:d] @ torch.diag(layer.lambda_d) @ a[:, :k]
        torch.testing.assert_close(layer.delta_weight(), expected)
        x = torch.randn(3, k)
        torch.testing.assert_close(layer.update(x), x @ expected.T)
        fa, fb = layer.lora_factors()
        assert fa.shape == (8, k) and fb.shape == (d, 8)
        torch.testing.assert_close(fb @ fa, expected)
        with pytest.raises(ValueError, match="rank-8"):
            layer.lora_factors(rank=4)


def test_shared_holder_stays_shared_after_to() -> None:
    model = peftkit.adapt(
        MODELS["gpt2"](0), peftkit.VeraConfig(r=8, target_modules=["c_attn", "c_proj"])
    )
    _perturb(model, 5)
    x = ids(vocab=128)
    y = output(model, x)
    model.to(torch.float64)
    holder = model.peftkit_shared.default
    assert holder.vera_A.dtype == torch.float64
    layers = [lay for _, lay in peftkit.adapters(model)]
    assert all(lay.shared is holder for lay in layers)
    assert sum(1 for m in model.modules() if isinstance(m, VeraProjections)) == 1
    torch.testing.assert_close(output(model, x), y.double(), atol=1e-5, rtol=0)
    for lay in layers:
        assert lay.delta_weight().dtype == torch.float64
    # one pair of projections for the whole model, none in the per-layer state
    sd = model.state_dict()
    assert [k for k in sd if k.endswith("vera_A")] == ["peftkit_shared.default.vera_A"]


def test_export_lora_equals_the_model(tmp_path: Any) -> None:
    targets = ["q_proj", "up_proj", "down_proj"]
    model = peftkit.adapt(MODELS["llama"](0), peftkit.VeraConfig(r=8, target_modules=targets))
    _perturb(model, 6)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.export_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)


def test_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="embedding"):
        peftkit.adapt(
            MODELS["llama"](0), peftkit.VeraConfig(r=8, target_modules=["q_proj", "embed_tokens"])
        )


def test_unsaved_projection_file_with_other_projections_is_refused(tmp_path: Any) -> None:
    model = peftkit.adapt(
        MODELS["llama"](0),
        peftkit.VeraConfig(r=8, target_modules=["q_proj"], save_projection=False),
    )
    peftkit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    a, b = projections(8, 32, 32, 0)
    save_file({**tensors, "base_model.vera_A": a, "base_model.vera_B": b}, str(path))
    peftkit.load_adapter(MODELS["llama"](0), tmp_path)  # the key's own projections: accepted
    save_file({**tensors, "base_model.vera_A": a + 1, "base_model.vera_B": b}, str(path))
    with pytest.raises(ValueError, match="save_projection"):
        peftkit.load_adapter(MODELS["llama"](0), tmp_path)


def test_nf4_base_trains_and_merges_to_16_bit() -> None:
    from peftkit.quant import quantize_

    model = quantize_(MODELS["llama"](0))
    peftkit.adapt(model, peftkit.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    _perturb(model, 7)
    x = ids(vocab=128)
    model(input_ids=x, labels=x).loss.backward()
    assert all(lay.lambda_b.grad is not None for _, lay in peftkit.adapters(model))
    peftkit.merge_and_unload(model, probe=x, atol=1e-4)
