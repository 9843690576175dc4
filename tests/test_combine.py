"""peftkit.combine: PEFT's add_weighted_adapter maths checked against PEFT 0.21.2 on the resulting
ΔW (every combination type, two and three sources, Linear, Conv1D and embedding layers, DARE's masks
included), the exact-sum and single-source identities, the deliberate differences from PEFT
(rsLoRA scale, non-LoRA sources, errors instead of silence) and the file round trip."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ids, output, tiny_gpt2, tiny_llama, tiny_llama_nf4
from torch import Tensor, nn

import peftkit
from peftkit.combining import DENSITY_TYPES, HOWS, SVD_TYPES, merge_tensors

# (targets, r, alpha) of up to three sources on the tiny Llama: overlapping target sets, so some
# layers hold one source, some two; "a" adapts the embedding too.
LLAMA = {
    "a": (["q_proj", "v_proj", "embed_tokens"], 4, 8),
    "b": (["v_proj", "down_proj"], 4, 16),
    "c": (["q_proj", "o_proj"], 4, 4),
}
GPT2 = {"a": (["c_attn", "wte"], 4, 8), "b": (["c_attn", "c_proj"], 4, 16)}
WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


def randomize(model: nn.Module, name: str, seed: int) -> None:
    """Give adapter ``name`` random non-zero parameters (B and an embedding's A start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peftkit.adapters(model, name):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def with_adapters(
    make: Any = tiny_llama, spec: dict[str, tuple[list[str], int, float]] | None = None, **kw: Any
) -> nn.Module:
    model = make()
    for i, (n, (targets, r, alpha)) in enumerate((spec or LLAMA).items()):
        cfg = peftkit.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw)
        peftkit.adapt(model, cfg, name=n)
        randomize(model, n, seed=10 + i)
    return model


def deltas(model: nn.Module, name: str) -> dict[str, Tensor]:
    return {path: layer.delta_weight().detach() for path, layer in peftkit.adapters(model, name)}


def weighted_sum(model: nn.Module, weights: dict[str, float]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n, w in weights.items():
        for path, d in deltas(model, n).items():
            out[path] = out.get(path, torch.zeros_like(d)) + w * d
    return out


def peft_twin(model: nn.Module, names: list[str], tmp: Path, make: Any) -> Any:
    """The same adapters in PEFT: saved by peftkit, loaded by PeftModel."""
    peft = pytest.importorskip("peft")
    for n in names:
        peftkit.save_adapter(model, tmp / n, name=n)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(tmp / n), adapter_name=n)
    return pm


def peft_deltas(pm: Any, name: str, kinds: dict[str, str]) -> dict[str, Tensor]:
    """PEFT's ΔW per layer, as (out, in) (its embeddings and Conv1D give (in, out))."""
    out = {}
    for path, kind in kinds.items():
        d = pm.base_model.model.get_submodule(path).get_delta_weight(name).detach()
        out[path] = d.T if kind in ("embedding", "conv1d") else d
    return out


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor], rel: float) -> None:
    """Same layers, and per layer max |got − want| ≤ rel · max |want|."""
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        err = (got[path] - w).abs().max().item()
        assert err <= rel * max(w.abs().max().item(), 1e-6), (path, err)


@pytest.fixture
def peft_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's new adapter draws its (overwritten) init from the global RNG before the DARE masks;
    run that init inside fork_rng so the masks are the first draws after torch.manual_seed."""
    from peft.tuners.lora.model import LoraModel

    inject = LoraModel.inject_adapter

    def forked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng():
            return inject(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "inject_adapter", forked)


def _compare_with_peft(
    make: Any, spec: dict[str, Any], names: list[str], how: str, tmp: Path, **kw: Any
) -> None:
    model = with_adapters(make, {n: spec[n] for n in names})
    pm = peft_twin(model, names, tmp, make)
    density = 0.5 if how in DENSITY_TYPES else None
    sign = kw.pop("majority_sign_method", "total")
    weights = {n: WEIGHTS[n] for n in names}
    seed = 1234
    torch.manual_seed(seed)
    pm.base_model.add_weighted_adapter(
        names,
        list(weights.values()),
        "mix",
        combination_type=how,
        density=density,
        majority_sign_method=sign,
        svd_rank=kw.get("rank"),
        svd_clamp=kw.get("svd_clamp"),
    )
    peftkit.combine(
        model,
        weights,
        name="mix",
        how=how,
        density=density,
        seed=seed,
        majority_sign_method=sign,
        **kw,
    )
    kinds = {path: layer.kind for path, layer in peftkit.adapters(model, "mix")}
    assert_same(deltas(model, "mix"), peft_deltas(pm, "mix", kinds), rel=1e-5)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("n_sources", [2, 3])
def test_matches_peft(how: str, n_sources: int, tmp_path: Path, peft_rng: None) -> None:
    """ΔW per layer equals PEFT's add_weighted_adapter result (DARE: the same masks, drawn in
    PEFT's order from a generator seeded like PEFT's global one)."""
    _compare_with_peft(tiny_llama, LLAMA, ["a", "b", "c"][:n_sources], how, tmp_path)


@pytest.mark.parametrize("how", ["cat", "svd", "linear", "ties", "dare_linear_svd"])
def test_matches_peft_conv1d(how: str, tmp_path: Path, peft_rng: None) -> None:
    """GPT-2's Conv1D (fan_in_fan_out) and tied embedding: PEFT transposes there; ΔW agrees."""
    _compare_with_peft(tiny_gpt2, GPT2, ["a", "b"], how, tmp_path)


@pytest.mark.parametrize(
    "how,kw",
    [
        ("svd", {"rank": 8}),
        ("svd", {"rank": 2, "svd_clamp": 0.9}),
        ("ties", {"majority_sign_method": "frequency"}),
        ("dare_ties_svd", {"majority_sign_method": "frequency", "rank": 6}),
    ],
)
def test_matches_peft_options(how: str, kw: dict[str, Any], tmp_path: Path, peft_rng: None) -> None:
    _compare_with_peft(tiny_llama, LLAMA, ["a", "b", "c"], how, tmp_path, **kw)


def test_cat_is_the_exact_weighted_sum() -> None:
    model = with_adapters()
    weights = {"a": 0.7, "b": -1.5, "c": -0.25}
    peftkit.combine(model, weights, name="mix", how="cat")
    assert_same(deltas(model, "mix"), weighted_sum(model, weights), rel=1e-6)
    assert {layer.r for _, layer in peftkit.adapters(model, "mix")} == {12}  # Σ rᵢ everywhere


def test_svd_exact_at_summed_rank_truncates_below() -> None:
    """The docstring's trade-off: svd at rank ≥ rank(Σ wᵢΔWᵢ) is exact; the default (max rᵢ)
    is not. A rank above a layer's min(in, out) gets zero components."""
    model = with_adapters()
    weights = {"a": 0.7, "b": 0.3, "c": 0.5}
    want = weighted_sum(model, weights)
    peftkit.combine(model, weights, name="exact", how="svd", rank=12)
    assert_same(deltas(model, "exact"), want, rel=1e-5)
    peftkit.combine(model, weights, name="wide", how="svd", rank=40)  # hidden size is 32
    assert_same(deltas(model, "wide"), want, rel=1e-5)
    peftkit.combine(model, weights, name="short", how="svd")
    errs = [(d - want[p]).abs().max().item() for p, d in deltas(model, "short").items()]
    assert max(errs) > 1e-2


def test_rslora_scale_is_right_and_peft_is_off_by_sqrt_r(tmp_path: Path) -> None:
    """rsLoRA sources (s = α/√r): the result is Σ wᵢΔWᵢ at scale 1. PEFT 0.21.2 copies use_rslora
    into the result, so its ΔW is √(new r) times too large."""
    spec = {"a": LLAMA["a"], "b": LLAMA["b"]}
    model = with_adapters(spec=spec, use_rslora=True)
    weights = {"a": 0.7, "b": 0.3}
    pm = peft_twin(model, ["a", "b"], tmp_path, tiny_llama)
    pm.base_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    peftkit.combine(model, weights, name="mix", how="cat")
    mine = deltas(model, "mix")
    assert_same(mine, weighted_sum(model, weights), rel=1e-6)
    cfg = peftkit.core.model_state(model).adapters["mix"].config
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (8, 8, False)
    kinds = {path: layer.kind for path, layer in peftkit.adapters(model, "mix")}
    theirs = peft_deltas(pm, "mix", kinds)
    assert_same(theirs, {p: math.sqrt(8) * d for p, d in mine.items()}, rel=1e-5)


@pytest.mark.parametrize("how", ["cat", "svd", "linear", "ties", "dare_linear"])
@pytest.mark.parametrize("rslora", [False, True])
def test_single_source_weight_one_reproduces_it(how: str, rslora: bool) -> None:
    """peft#3761's check: combining one adapter with weight 1 gives that adapter (any type is
    linear with one source, as in PEFT), rsLoRA included; the logits agree too."""
    model = with_adapters(spec={"a": LLAMA["a"]}, use_rslora=rslora)
    density = 0.5 if how in DENSITY_TYPES else None
    peftkit.combine(model, {"a": 1.0}, name="same", how=how, density=density, seed=0)
    assert_same(deltas(model, "same"), deltas(model, "a"), rel=1e-6)
    x = ids(vocab=128)
    want = output(model, x)
    peftkit.set_adapter(model, "same")
    torch.testing.assert_close(output(model, x), want, atol=1e-5, rtol=0)


def test_new_adapter_is_frozen_inactive_and_round_trips(tmp_path: Path) -> None:
    model = with_adapters()
    rng = torch.get_rng_state()
    peftkit.combine(model, {"a": 0.5, "b": 0.5, "c": -0.2}, name="mix", how="ties", density=0.6)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the caller's stream
    assert peftkit.active_adapters(model) == ["a"]
    assert peftkit.adapter_names(model) == ["a", "b", "c", "mix"]
    assert not any(
        p.requires_grad for _, lay in peftkit.adapters(model, "mix") for p in lay.parameters()
    )
    peftkit.set_adapter(model, "mix")
    x = ids(vocab=128)
    want = output(model, x)
    assert (want - output(tiny_llama(), x)).abs().max() > 1e-3
    peftkit.save_adapter(model, tmp_path / "mix", name="mix")
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path / "mix", name="mix")
    torch.testing.assert_close(output(fresh, x), want, atol=0, rtol=0)


def test_nf4_base() -> None:
    model = with_adapters(
        tiny_llama_nf4, {"a": (["q_proj", "v_proj"], 4, 8), "b": (["v_proj"], 2, 4)}
    )
    peftkit.combine(model, {"a": 0.6, "b": 0.4}, name="mix", how="cat")
    assert_same(deltas(model, "mix"), weighted_sum(model, {"a": 0.6, "b": 0.4}), rel=1e-6)


# -- sources that are not plain LoRA -------------------------------------------------------------
EXPORTABLE = {
    "vera": peftkit.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "dylora": peftkit.DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "adalora": peftkit.AdaLoraConfig(
        init_r=4, target_r=4, total_step=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    ),
    "lora_fa": peftkit.LoraFAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora_dynamic": peftkit.DoraDynamicConfig(
        target_r=2, init_r=4, total_step=8, prune_interval=2, target_modules=["q_proj", "v_proj"]
    ),
    "mora1": peftkit.MoraConfig(r=4, mora_type=1, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("method", EXPORTABLE)
def test_methods_with_an_exact_export_combine(method: str) -> None:
    """Not plain LoRA, but exactly a LoRA (peftkit.export_lora's form): accepted; cat is the
    exact weighted sum and svd at the summed rank reproduces it."""
    model = tiny_llama()
    peftkit.adapt(model, EXPORTABLE[method], name="m")
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["v_proj", "o_proj"]), name="l")
    randomize(model, "m", seed=1)
    randomize(model, "l", seed=2)
    weights = {"m": 0.5, "l": -0.7}
    want = weighted_sum(model, weights)
    assert all(d.abs().max() > 1e-3 for d in want.values())
    peftkit.combine(model, weights, name="cat", how="cat")
    assert_same(deltas(model, "cat"), want, rel=1e-5)
    rank = next(layer.r for _, layer in peftkit.adapters(model, "cat"))  # Σ rᵢ
    peftkit.combine(model, weights, name="svd", how="svd", rank=rank)
    assert_same(deltas(model, "svd"), want, rel=1e-4)


def test_modules_to_save_is_refused() -> None:
    model = with_adapters(spec={"a": LLAMA["a"]})
    cfg = peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peftkit.adapt(model, cfg, name="h")
    with pytest.raises(ValueError, match="lm_head.*modules_to_save"):
        peftkit.combine(model, {"a": 0.5, "h": 0.5}, name="mix")


def test_dora_is_refused_with_the_fix() -> None:
    model = with_adapters(spec={"a": LLAMA["a"]})
    peftkit.adapt(
        model, peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), name="d"
    )
    with pytest.raises(ValueError, match="DoRA.*merge_and_unload"):
        peftkit.combine(model, {"a": 0.5, "d": 0.5}, name="mix")
    assert peftkit.adapter_names(model) == ["a", "d"]


def test_no_exact_lora_form_is_refused_naming_export_lora() -> None:
    model = with_adapters(spec={"a": LLAMA["a"]})
    peftkit.adapt(model, peftkit.MoraConfig(r=4, mora_type=6, target_modules=["q_proj"]), name="m")
    with pytest.raises(ValueError, match="no exact LoRA form.*export_lora"):
        peftkit.combine(model, {"a": 0.5, "m": 0.5}, name="mix")
    assert peftkit.adapter_names(model) == ["a", "m"]


def test_delta_lora_in_place_is_refused_with_the_way_out() -> None:
    model = tiny_llama()
    peftkit.adapt(model, peftkit.DeltaLoraConfig(r=2, target_modules=["q_proj"]), name="d")
    with pytest.raises(ValueError, match="export_lora"):
        peftkit.combine(model, {"d": 1.0}, name="mix")


# -- errors where PEFT is silent or crashes ------------------------------------------------------
@pytest.mark.parametrize("how", DENSITY_TYPES)
def test_missing_density_names_the_field(how: str) -> None:
    model = with_adapters()
    with pytest.raises(ValueError, match="density="):
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name="mix", how=how)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True])
def test_density_outside_range(density: Any) -> None:
    model = with_adapters()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name="mix", how="ties", density=density)


@pytest.mark.parametrize(
    "weights,kw,match",
    [
        ({"a": 0.5}, {"name": "b"}, "already has an adapter named 'b'"),
        ({"a": 0.5, "zz": 1, "yy": 2}, {"name": "mix"}, r"no adapter named \['zz', 'yy'\]"),
        ({}, {"name": "mix"}, "weights is empty"),
        ({"a": float("inf")}, {"name": "mix"}, "weight of 'a'"),
        ({"a": 0.5}, {"name": "mix", "how": "average"}, "not a combination type"),
        ({"a": 0.5}, {"name": "mix", "how": "cat", "density": 0.5}, "does not prune"),
        ({"a": 0.5}, {"name": "mix", "how": "cat", "rank": 4}, "rank= applies to the svd"),
        ({"a": 0.5}, {"name": "mix", "how": "svd", "rank": 0}, "positive integer"),
        (
            {"a": 0.5},
            {"name": "mix", "how": "ties", "density": 0.5, "majority_sign_method": "mean"},
            "majority_sign_method",
        ),
        ({"a": 0.5}, {"name": "mix", "how": "dare_linear", "density": 0.5, "seed": 1.5}, "seed"),
        ({"a": 0.5}, {"name": "../up"}, "not usable"),
    ],
)
def test_errors(weights: dict[str, Any], kw: dict[str, Any], match: str) -> None:
    model = with_adapters()
    with pytest.raises(ValueError, match=match):
        peftkit.combine(model, weights, **kw)
    assert peftkit.adapter_names(model) == ["a", "b", "c"]


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_unequal_ranks_name_the_types_that_accept_them(how: str) -> None:
    model = with_adapters(spec={"a": LLAMA["a"], "b": (["v_proj"], 2, 4)})
    density = 0.5 if how in DENSITY_TYPES else None
    with pytest.raises(ValueError, match=r"one rank.*\{'a': 4, 'b': 2\}.*'cat'.*ties_svd"):
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name="mix", how=how, density=density)
    for ok in ("cat", *SVD_TYPES):
        d = 0.5 if ok in DENSITY_TYPES else None
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name=ok, how=ok, density=d, seed=0)


def test_rank_pattern_source_is_zero_padded_for_linear(tmp_path: Path) -> None:
    """A source with a smaller rank in some layers (rank_pattern) combines by the factor types
    once padded with zeros (PEFT fails on the shapes there): the result equals PEFT's on the same
    adapter padded by hand."""
    model = tiny_llama()
    peftkit.adapt(
        model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), name="a"
    )
    peftkit.adapt(
        model,
        peftkit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 4},
        ),
        name="b",
    )
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    padded = tiny_llama()
    for n in ("a", "b"):
        peftkit.adapt(
            padded,
            peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            name=n,
        )
    with torch.no_grad():
        for n in ("a", "b"):
            src = dict(peftkit.adapters(model, n))
            for path, layer in peftkit.adapters(padded, n):
                a, b = src[path].lora_A, src[path].lora_B * (src[path].scaling / layer.scaling)
                layer.lora_A.zero_()[: a.shape[0]] = a
                layer.lora_B.zero_()[:, : b.shape[1]] = b
    assert_same(deltas(padded, "b"), deltas(model, "b"), rel=1e-6)
    pm = peft_twin(padded, ["a", "b"], tmp_path, tiny_llama)
    pm.base_model.add_weighted_adapter(["a", "b"], [0.6, 0.9], "mix", combination_type="linear")
    peftkit.combine(model, {"a": 0.6, "b": 0.9}, name="mix", how="linear")
    kinds = {path: layer.kind for path, layer in peftkit.adapters(model, "mix")}
    assert_same(deltas(model, "mix"), peft_deltas(pm, "mix", kinds), rel=1e-5)


# -- DARE's seed ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_dare_seed_reproducible(how: str) -> None:
    model = with_adapters()
    w = {"a": 0.5, "b": 0.5, "c": 0.5}
    rng = torch.get_rng_state()
    for n, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        peftkit.combine(model, w, name=n, how=how, density=0.5, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng)  # a given seed leaves the global stream alone
    one, again, two = deltas(model, "s1"), deltas(model, "s1_again"), deltas(model, "s2")
    assert all(torch.equal(one[p], again[p]) for p in one)
    assert any((one[p] - two[p]).abs().max() > 1e-3 for p in one)
    # seed=None draws one seed from the global generator: reproducible under torch.manual_seed
    torch.manual_seed(5)
    peftkit.combine(model, w, name="g1", how=how, density=0.5)
    torch.manual_seed(5)
    peftkit.combine(model, w, name="g2", how=how, density=0.5)
    g1, g2 = deltas(model, "g1"), deltas(model, "g2")
    assert all(torch.equal(g1[p], g2[p]) for p in g1)


# -- the merge rules on their own (the spec's formulas, by hand) ---------------------------------
def test_ties_rule_by_hand() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.25, -1.0])
    # density 0.5 keeps the top 2 by magnitude: t1 → [3, 0, 0, -4], t2 → [-2, 2, 0, 0]
    # elected signs (total, unweighted): [+, +, + (0 sum), -]; agreeing entries: t1[0], t2[1], t1[3]
    got = merge_tensors(
        "ties", [t1, t2], [2.0, 10.0], density=0.5, sign_method="total", generator=None
    )
    torch.testing.assert_close(got, torch.tensor([6.0, 20.0, 0.0, -8.0]))
    got = merge_tensors(
        "ties", [t1, t2], [1.0, 1.0], density=1.0, sign_method="frequency", generator=None
    )
    # no pruning: signs [+,-]→0→+, [-,+]→0→+, [+,+]→+, [-,-]→-; mean over agreeing entries
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 0.375, -2.5]))


def test_dare_rule_by_hand() -> None:
    t = torch.randn(200, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    got = merge_tensors("dare_linear", [t], [2.0], density=0.25, sign_method="total", generator=g)
    mask = torch.bernoulli(torch.full_like(t, 0.25), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, 2.0 * t * mask / 0.25)
    assert 20 < int(mask.sum()) < 80


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_bfloat16_sources(how: str) -> None:
    """The maths runs in float32 (torch has no bfloat16 SVD on CPU); the result has the
    sources' dtype."""
    model = with_adapters(lambda: tiny_llama().to(torch.bfloat16))
    weights = {"a": 0.7, "b": 0.3, "c": -0.5}
    peftkit.combine(model, weights, name="mix", how=how, rank=12 if how == "svd" else None)
    got = deltas(model, "mix")
    sources = {a.lora_A.dtype for n in weights for _, a in peftkit.adapters(model, n)}
    assert {d.dtype for d in got.values()} == sources  # fp32 adapters on a bf16 base by default
    want = weighted_sum(model, weights)
    assert_same(
        {p: d.float() for p, d in got.items()}, {p: d.float() for p, d in want.items()}, rel=2e-2
    )
