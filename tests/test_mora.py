"""MoRA against explicit dense constructions of its operators (the spec's formulas)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.mora import MoraLayer, compress, decompress, r_hat

F64 = torch.float64


def wrap(k: int, rh: int) -> torch.Tensor:
    """P (n r̂, k): padded position i reads feature i mod k (wrap-around padding)."""
    i = torch.arange(-(-k // rh) * rh)
    return torch.zeros(len(i), k, dtype=F64).index_put_((i, i % k), torch.ones(len(i), dtype=F64))


def groups(size: int, rh: int) -> torch.Tensor:
    """G (r̂, size): contiguous groups, the first size mod r̂ of them one longer."""
    g = torch.zeros(rh, size, dtype=F64)
    q, m = divmod(size, rh)
    c = 0
    for j in range(rh):
        for _ in range(q + (j < m)):
            g[j, c] = 1
            c += 1
    return g


def tile(size: int, width: int) -> torch.Tensor:
    """T (size, width): output i copies input i mod width."""
    i = torch.arange(size)
    one = torch.tensor(1.0, dtype=F64)
    return torch.zeros(size, width, dtype=F64).index_put_((i, i % width), one)


def rotation(b: int, rh: int) -> torch.Tensor:
    """R_b (r̂, r̂): RoPE by angles b θ_j, θ_j = 10000^(-2j/r̂), rotate-half pairing (j, j + r̂/2)."""
    r = torch.zeros(rh, rh, dtype=F64)
    h = rh // 2
    for j in range(h):
        a = b * 10000.0 ** (-2 * j / rh)
        r[j, j], r[j, j + h] = math.cos(a), -math.sin(a)
        r[j + h, j + h], r[j + h, j] = math.cos(a), math.sin(a)
    return r


def explicit_delta(k: int, d: int, rh: int, mora_type: int, m: torch.Tensor) -> torch.Tensor:
    """ΔW (d, k) built from the spec's matrices."""
    n = -(-k // rh)
    strided = tile(n * rh, rh).T @ wrap(k, rh)  # (r̂, k): C[j, c] = #{i : i≡j (r̂), i≡c (k)}
    if mora_type == 6:
        block = torch.block_diag(*[m @ rotation(b, rh) for b in range(n)])  # (n r̂, n r̂)
        return tile(d, n * rh) @ block @ wrap(k, rh)
    comp = strided if mora_type in (1, 4) else groups(k, rh)
    decomp = tile(d, rh) if mora_type in (1, 3) else groups(d, rh).T
    return decomp @ m @ comp


# (in, out): square, uneven both ways, in < r̂ (n = 1), r̂ > 2·in (several wraps), tiny out.
SHAPES = [(64, 64), (100, 70), (70, 100), (96, 40), (12, 40), (5, 7), (40, 3)]


def _layer(k: int, d: int, r: int, mora_type: int, seed: int = 0) -> MoraLayer:
    torch.manual_seed(seed)
    layer = MoraLayer(nn.Linear(k, d).double(), r=r, mora_type=mora_type)
    with torch.no_grad():
        layer.M.normal_()
    return layer


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,d", SHAPES)
def test_forward_and_delta_equal_the_explicit_formula(k: int, d: int, mora_type: int) -> None:
    for r in (2, 8, 40):
        layer = _layer(k, d, r, mora_type)
        expected = explicit_delta(k, d, layer.r_hat, mora_type, layer.M.detach())
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-10, rtol=1e-10)
        x = torch.randn(2, 3, k, dtype=F64)
        torch.testing.assert_close(layer.update(x), x @ expected.T, atol=1e-10, rtol=1e-10)


def test_pure_operators() -> None:
    x = torch.randn(4, 10, dtype=F64)
    # type 1, r̂ = 4: n = 3 blocks over the wrapped input [x0..x9, x0, x1]
    xt = torch.cat([x, x[:, :2]], dim=1)
    torch.testing.assert_close(compress(x, 4, 1), xt[:, 0:4] + xt[:, 4:8] + xt[:, 8:12])
    # type 2: groups of sizes 3, 3, 2, 2
    want = torch.stack([x[:, 0:3].sum(1), x[:, 3:6].sum(1), x[:, 6:8].sum(1), x[:, 8:10].sum(1)], 1)
    torch.testing.assert_close(compress(x, 4, 2), want)
    # type 6: block 0 unrotated
    torch.testing.assert_close(compress(x, 4, 6)[:, 0], x[:, :4])
    y = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(decompress(y, 7, 1), y[:, [0, 1, 2, 0, 1, 2, 0]])
    torch.testing.assert_close(decompress(y, 7, 2), y[:, [0, 0, 0, 1, 1, 2, 2]])
    u = torch.randn(4, 2, 3, dtype=F64)  # type 6: (…, n, r̂) flattened, truncated or tiled
    torch.testing.assert_close(decompress(u, 4, 6), u.flatten(1)[:, :4])
    torch.testing.assert_close(decompress(u, 8, 6), u.flatten(1)[:, [0, 1, 2, 3, 4, 5, 0, 1]])


def test_r_hat_follows_the_official_rounding() -> None:
    assert r_hat(4096, 4096, 8, 6) == 256
    assert r_hat(4096, 11008, 8, 1) == 348
    assert r_hat(64, 64, 8, 6) == 32
    assert (r_hat(64, 128, 8, 1), r_hat(64, 128, 8, 6)) == (39, 38)
    with pytest.raises(ValueError, match="raise r"):
        r_hat(1, 1, 1, 6)


def test_rank_of_the_update() -> None:
    t1, t6 = _layer(64, 64, 8, 1), _layer(64, 64, 8, 6)
    assert t1.r_hat == t6.r_hat == 32
    assert torch.linalg.matrix_rank(t1.delta_weight()).item() == 32
    assert torch.linalg.matrix_rank(t6.delta_weight()).item() == 64  # full rank


def test_zero_init_still_gets_a_gradient() -> None:
    layer = MoraLayer(nn.Linear(24, 16), r=4, mora_type=6)
    x = torch.randn(5, 24)
    assert torch.equal(layer(x), layer.base(x))
    layer(x).pow(2).sum().backward()
    assert layer.M.grad is not None and layer.M.grad.abs().max() > 0


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# llama: q 32→32, up 32→64, down 64→32; r = 64 gives r̂ ≥ in (n = 1) and r̂ > 2·in for q (wraps).
MERGE_CASES = [
    ("llama", ["q_proj", "up_proj", "down_proj"], 3),
    ("llama", ["q_proj"], 64),
    ("gpt2", ["c_attn", "c_fc", "c_proj"], 3),
    ("gpt2", ["c_attn", "c_proj"], 48),
]


@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("kind,targets,r", MERGE_CASES)
def test_merge_is_exact(kind: str, targets: list[str], r: int, mora_type: int) -> None:
    model = peftkit.adapt(
        MODELS[kind](0), peftkit.MoraConfig(r=r, mora_type=mora_type, target_modules=targets)
    )
    _perturb(model, 1)
    x = ids(vocab=128)
    y = output(model, x)
    if r >= 48:
        assert any(a.r_hat >= a.in_features for _, a in peftkit.adapters(model))
    peftkit.merge(model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    peftkit.merge_and_unload(model, probe=x, atol=1e-5)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=0)


def test_file_layout_and_roundtrip(tmp_path: Any) -> None:
    model = peftkit.adapt(MODELS["gpt2"](0), peftkit.MoraConfig(r=4, target_modules=["c_attn"]))
    _perturb(model, 2)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["peftkit_method"], cfg["r"], cfg["mora_type"]) == (
        "LORA",
        "mora",
        4,
        6,
    )
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    rh = r_hat(32, 96, 4, 6)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight": (rh, rh) for i in (0, 1)
    }
    again = peftkit.load_adapter(MODELS["gpt2"](0), tmp_path)
    assert torch.equal(output(again, x), y)


def test_export_lora_type1_loads_in_peft(tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "up_proj", "down_proj"]
    model = peftkit.adapt(
        MODELS["llama"](0), peftkit.MoraConfig(r=3, mora_type=1, target_modules=targets)
    )
    _perturb(model, 3)
    x = ids(vocab=128)
    y = output(model, x)
    for _, layer in peftkit.adapters(model):
        a, b = layer.lora_factors()
        assert a.shape[0] == layer.r_hat
        torch.testing.assert_close(b @ a, layer.delta_weight())
    peftkit.export_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)


def test_export_lora_type6_is_refused(tmp_path: Any) -> None:
    model = peftkit.adapt(MODELS["llama"](0), peftkit.MoraConfig(r=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        peftkit.export_lora(model, tmp_path)


def test_rotation_tables_follow_the_model() -> None:
    model = peftkit.adapt(MODELS["llama"](0), peftkit.MoraConfig(r=3, target_modules=["q_proj"]))
    _perturb(model, 4)
    x = ids(vocab=128)
    y = output(model, x)
    model.to(F64)
    layer = next(a for _, a in peftkit.adapters(model))
    assert layer.rope_cos.dtype == F64 and "rope_cos" not in model.state_dict()
    torch.testing.assert_close(output(model, x), y.double(), atol=1e-5, rtol=0)


def test_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="embedding"):
        peftkit.adapt(
            MODELS["llama"](0), peftkit.MoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
        )


@pytest.mark.parametrize("mora_type", [1, 2, 6])
def test_backward_recomputing_the_compression_is_exact(mora_type: int) -> None:
    layer = _layer(10, 7, 2, mora_type)  # r̂ = 6 (uneven: n = 2, wrapped)
    x = torch.randn(2, 3, 10, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer.update, (x,))
    g = torch.randn(2, 3, 7, dtype=F64)
    (gx, gm) = torch.autograd.grad(layer.update(x), (x, layer.M), g)
    expected = explicit_delta(10, 7, layer.r_hat, mora_type, layer.M.detach())
    torch.testing.assert_close(gx, g @ expected)
    # ∂L/∂M by the plain autograd path through the pure operators
    rope = (layer.rope_cos, layer.rope_sin) if mora_type == 6 else None
    plain = decompress(compress(x, layer.r_hat, mora_type, rope) @ layer.M.T, 7, mora_type)
    (gm_plain,) = torch.autograd.grad(plain, layer.M, g)
    torch.testing.assert_close(gm, gm_plain)


def test_nf4_base_trains_and_merges_to_16_bit() -> None:
    from peftkit.quant import quantize_

    model = quantize_(MODELS["llama"](0))
    peftkit.adapt(model, peftkit.MoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    _perturb(model, 7)
    x = ids(vocab=128)
    model(input_ids=x, labels=x).loss.backward()
    assert all(lay.M.grad is not None for _, lay in peftkit.adapters(model))
    peftkit.merge_and_unload(model, probe=x, atol=1e-4)
