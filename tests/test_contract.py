"""The contract battery: every method in the registry × every model kind passes the same checks.

A method joins by adding a row to ``ROWS``: how to build its config for given targets, which
layer kinds it supports, and any exemption with its reason. A row may also add a second adapter
beside the first, both active (``second``), so that every check runs on a model holding two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from torch import nn

import peftkit
from peftkit.core import Adapter, ModulesToSave, get_state, layer_kind


@dataclasses.dataclass
class Row:
    make: Callable[..., peftkit.AdapterConfig]
    embeddings: bool = True  # can it wrap nn.Embedding?
    bad: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)
    init_atol: float = 0.0  # output at init equals the base's within this
    exempt: dict[str, str] = dataclasses.field(default_factory=dict)  # check -> reason
    # perturb as one optimizer step: the model's training hooks run around the change (so a
    # method whose hook moves W, Delta-LoRA, is checked in its trained state)
    step_perturb: bool = False
    nf4: bool = True  # composes with an NF4 base (QLoRA)? if not, adapt() must refuse it
    # a second adapter's config, from the first one's targets and modules_to_save: added as
    # "second" beside the first ("default"), and both are active
    second: Callable[..., peftkit.AdapterConfig] | None = None


def cfg(cls: Callable[..., peftkit.AdapterConfig], **defaults: Any) -> Callable[..., Any]:
    """A config factory whose keyword arguments override ``defaults``."""
    return lambda **kw: cls(**{**defaults, **kw})


ROWS: dict[str, Row] = {
    "lora": Row(
        make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8),
        bad=[({"r": 0}, "r"), ({"r": -2}, "r"), ({"lora_alpha": float("nan")}, "lora_alpha"),
             ({"lora_dropout": 1.5}, "lora_dropout"), ({"init_lora_weights": "pissa"},
                                                        "init_lora_weights")],
    ),
    "rslora": Row(make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8, use_rslora=True)),
    "dora": Row(
        make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8, use_dora=True),
        init_atol=1e-5,
        bad=[({"r": 0}, "r"), ({"lora_dropout": 1.5}, "lora_dropout"),
             ({"use_dora": "yes"}, "use_dora")],
    ),
    "vera": Row(
        make=cfg(peftkit.VeraConfig, r=8),
        embeddings=False,  # PEFT's VeRA wraps Linear/Conv1D only; adapt refuses embeddings
        bad=[({"r": 0}, "r"), ({"projection_prng_key": -1}, "projection_prng_key"),
             ({"vera_dropout": 1.0}, "vera_dropout"), ({"d_initial": float("inf")}, "d_initial"),
             ({"save_projection": "yes"}, "save_projection")],
    ),
    "mora": Row(
        make=cfg(peftkit.MoraConfig, r=4, mora_type=6),
        embeddings=False,  # the compression acts on dense inputs; adapt refuses embeddings
        bad=[({"r": 0}, "r"), ({"mora_type": 5}, "mora_type"),
             ({"lora_dropout": -0.1}, "lora_dropout")],
    ),
    "mora1": Row(make=cfg(peftkit.MoraConfig, r=4, mora_type=1), embeddings=False),
    "dylora": Row(
        make=cfg(peftkit.DyLoraConfig, r=4, lora_alpha=8),
        bad=[({"r": 0}, "r"), ({"r_min": 5}, "r_min"), ({"lora_alpha": -1}, "lora_alpha"),
             ({"lora_dropout": 1.0}, "lora_dropout"), ({"frozen": "yes"}, "frozen"),
             ({"seed": 1.5}, "seed")],
    ),
    "dora_dynamic": Row(
        make=cfg(peftkit.DoraDynamicConfig, target_r=2, init_r=4, total_step=8, prune_interval=2,
                 lora_dropout=0.0),
        bad=[({"target_r": 0}, "target_r"), ({"init_r": 1}, "init_r"),
             ({"total_step": None}, "total_step"), ({"prune_interval": 0}, "prune_interval"),
             ({"beta": 1.0}, "beta"), ({"start_ratio": 0.6}, "start_ratio"),
             ({"regularization_loss_alpha": -1.0}, "regularization_loss_alpha")],
    ),
    # init_r == target_r: a plain adapter here (nothing to prune, so saving needs no allocation);
    # pruning, PEFT parity and the hooks are tested in test_adalora.py.
    "adalora": Row(
        make=cfg(peftkit.AdaLoraConfig, init_r=4, target_r=4, total_step=8, lora_alpha=8),
        embeddings=False,  # PEFT's AdaLoRA wraps Linear/Conv1D only; adapt refuses embeddings
        bad=[({"init_r": 0}, "init_r"), ({"target_r": 5}, "target_r"),
             ({"total_step": None}, "total_step"), ({"tinit": 8}, "tinit"),
             ({"deltaT": 0}, "deltaT"), ({"beta1": 1.0}, "beta1"),
             ({"orth_reg_weight": -0.5}, "orth_reg_weight"), ({"lora_alpha": 0}, "lora_alpha"),
             ({"rank_pattern": {"fc1.lora_E": [True]}}, "rank_pattern")],
    ),
}

ROWS["lora_fa"] = Row(
    make=cfg(peftkit.LoraFAConfig, r=4, lora_alpha=8),
    embeddings=False,  # refused: ids need no saved activation, and a zero A frozen never learns
    bad=[({"r": 0}, "r"), ({"lora_alpha": float("nan")}, "lora_alpha"),
         ({"lora_dropout": 1.5}, "lora_dropout"), ({"gradient_correction": "yes"},
                                                   "gradient_correction")],
)
# LongLoRA: S2-Attn in train mode on the tiny Llama; embeddings/norms trained as modules_to_save
# (targets=None default here so that make() without targets still fails as the battery expects).
ROWS["longlora"] = Row(
    make=cfg(peftkit.LongLoraConfig, target_modules=None, r=4, lora_alpha=8),
    bad=[({"r": 0}, "r"), ({"group_size_ratio": 0.0}, "group_size_ratio"),
         ({"group_size_ratio": 1.5}, "group_size_ratio"), ({"context_factor": 0.5},
                                                          "context_factor"),
         ({"lora_dropout": 1.5}, "lora_dropout")],
)
_DELTA_TOL = ("W itself trains (W_t = W_0 + λs(B_tA_t - B_KA_K), accumulated step by step); "
              "W_0 and W_t are recovered from the factors to floating-point tolerance, not bitwise")
ROWS["delta_lora"] = Row(
    make=cfg(peftkit.DeltaLoraConfig, r=4, lora_alpha=8, warmup_steps=0),
    step_perturb=True,
    nf4=False,  # it writes into W, which an NF4 base cannot hold: adapt() refuses (tested below)
    bad=[({"r": 0}, "r"), ({"lora_dropout": 0.1}, "lora_dropout"),
         ({"delta_lambda": -1.0}, "delta_lambda"), ({"warmup_steps": -1}, "warmup_steps"),
         ({"warmup_steps": 1.5}, "warmup_steps")],
    exempt={
        "disable_adapters_is_base": _DELTA_TOL + ": disabled output = W_t x - λs(...)x",
        "save_load_roundtrip": _DELTA_TOL + ": loading rebuilds W_t in closed form",
        "unmerge_restores_base": "unmerge gives back the trained W_t, not W_0; unload restores "
                                 "W_0 (" + _DELTA_TOL + ")",
    },
)

# Two adapters on one model, both active: the first LoRA (rank 4) on every target, the second
# (rank 2) on all but the first linear target, with its own modules_to_save copy. So some layers
# hold one adapter and others two, whose updates add; merge, unmerge, merge_and_unload, disable,
# save/load (PEFT's multi-adapter folder) and training all see both. No check is exempt.
ROWS["two_lora"] = Row(
    make=cfg(peftkit.LoraConfig, r=4, lora_alpha=8),
    second=lambda target_modules, modules_to_save: peftkit.LoraConfig(
        r=2, lora_alpha=4, target_modules=target_modules[1:], modules_to_save=modules_to_save
    ),
)
#: the rows of one adapter each, for the files that build their own models from ``make``
METHODS = [m for m in ROWS if ROWS[m].second is None]

# (targets, embedding targets, modules_to_save) per model kind.
TARGETS: dict[str, tuple[list[str], list[str], list[str] | None]] = {
    "mlp": (["fc1", "fc2"], ["embed"], ["head"]),
    "llama": (["q_proj", "v_proj", "up_proj"], ["embed_tokens"], None),
    "gpt2": (["c_attn", "c_proj"], ["wte"], None),
    "bert": (["query", "value"], ["word_embeddings"], ["classifier"]),
    "nf4": (["q_proj", "v_proj", "up_proj"], [], None),  # QLoRA: the tiny Llama in NF4
}

CASES = [(m, k) for m in ROWS for k in TARGETS if k != "nf4" or ROWS[m].nf4]


def build(method: str, kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base model, adapted model with non-trivial adapter weights, input)."""
    row = ROWS[method]
    linear, emb, save = TARGETS[kind]
    targets = linear + (emb if row.embeddings else [])
    base = MODELS[kind](seed)
    model = MODELS[kind](seed)
    peftkit.adapt(model, row.make(target_modules=targets, modules_to_save=save))
    if row.second is not None:
        second = row.second(target_modules=targets, modules_to_save=save)
        peftkit.adapt(model, second, name="second")
        peftkit.set_adapter(model, ["default", "second"])
    vocab = 32 if kind == "mlp" else 128
    return base, model, ids(vocab=vocab)


def perturb(model: nn.Module, seed: int = 0, *, step: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    hooks = get_state(model).hooks if step else []  # type: ignore[union-attr]
    for h in hooks:
        h.before_step()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    for h in hooks:
        h.after_step()


@pytest.mark.parametrize("method,kind", CASES)
def test_init_equals_base(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    torch.testing.assert_close(output(model, x), output(base, x), atol=ROWS[method].init_atol,
                               rtol=0)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_unmerge(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    perturb(model, step=ROWS[method].step_perturb)
    y = output(model, x)
    assert (y - output(base, x)).abs().max() > 1e-4, "perturbed adapter should change outputs"
    if kind == "nf4":  # re-quantising would silently erase small adapters: refused
        with pytest.raises(ValueError, match="NF4"):
            peftkit.merge(model)
        assert not any(a.merged for _, a in peftkit.adapters(model))
        torch.testing.assert_close(output(model, x), y, atol=0, rtol=0)
        return
    before = {k: v.clone() for k, v in base.state_dict().items()}
    moved = "unmerge_restores_base" in ROWS[method].exempt  # W trained: unmerge gives back W_t
    if moved:
        before = {f"{n}.weight": a.base.weight.detach().clone() for n, a in peftkit.adapters(model)}
    peftkit.merge(model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        peftkit.merge(model)
    peftkit.unmerge(model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)
    for name, a in peftkit.adapters(model):
        w = a.base.weight
        torch.testing.assert_close(w, before[f"{name}.weight"], atol=1e-6, rtol=0)
    if moved:  # ... and unload still gives back W_0, to tolerance
        peftkit.unload(model)
        got = model.state_dict()
        for k, v in base.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_and_unload(method: str, kind: str) -> None:
    _, model, x = build(method, kind)
    perturb(model, step=ROWS[method].step_perturb)
    model.eval()
    y = output(model, x)
    out = peftkit.merge_and_unload(model, probe=x)
    assert out is model
    assert not any(isinstance(m, (Adapter, ModulesToSave)) for m in model.modules())
    if kind == "nf4":  # a dense 16/32-bit model holding dequant(W) + ΔW
        assert not any(layer_kind(m) == "nf4" for m in model.modules() if m is not model)
    torch.testing.assert_close(output(model, x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_disable_adapters_is_base(method: str, kind: str) -> None:
    base, model, x = build(method, kind)
    perturb(model, step=ROWS[method].step_perturb)
    with peftkit.disable_adapters(model):
        if "disable_adapters_is_base" in ROWS[method].exempt:
            torch.testing.assert_close(output(model, x), output(base, x), atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(output(model, x), output(base, x))
    assert not torch.equal(output(model, x), output(base, x))


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_roundtrip(method: str, kind: str, tmp_path: Any) -> None:
    _, model, x = build(method, kind)
    perturb(model, step=ROWS[method].step_perturb)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    fresh = MODELS[kind](0)
    assert peftkit.load_adapter(fresh, tmp_path) is fresh
    # loading makes the first adapter active; which ones were active is not in the files
    peftkit.set_adapter(fresh, peftkit.active_adapters(model))
    if "save_load_roundtrip" in ROWS[method].exempt:
        torch.testing.assert_close(output(fresh, x), y, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(output(fresh, x), y)
    assert peftkit.trainable_parameters(fresh)[0] == 0
    again = MODELS[kind](0)
    peftkit.load_adapter(again, tmp_path, trainable=True)
    assert peftkit.trainable_parameters(again)[0] == peftkit.trainable_parameters(model)[0]


@pytest.mark.parametrize("method,kind", CASES)
def test_only_intended_parameters_train(method: str, kind: str) -> None:
    _, model, _ = build(method, kind)
    intended = set()
    for m in model.modules():
        if isinstance(m, Adapter):
            intended.update(id(getattr(m, n)) for n in m.trainable_names()
                            if isinstance(getattr(m, n, None), nn.Parameter))
        if isinstance(m, ModulesToSave):  # every adapter's copy trains, active or not
            intended.update(id(p) for p in m.copies.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == intended
    n, total = peftkit.trainable_parameters(model)
    assert 0 < n < total


@pytest.mark.parametrize("method,kind", CASES)
def test_training_lowers_loss(method: str, kind: str) -> None:
    _, model, x = build(method, kind)
    model.train()
    torch.manual_seed(0)
    target = torch.randn_like(output(model, x))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    losses = []
    for _ in range(8):
        loss = nn.functional.mse_loss(output(model, x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", list(ROWS))
def test_bad_config_values_name_the_field(method: str) -> None:
    row = ROWS[method]
    for kwargs, field in row.bad:
        with pytest.raises(ValueError, match=field):
            row.make(target_modules=["fc1"], **kwargs)
    with pytest.raises(ValueError, match="target_modules"):
        row.make()


@pytest.mark.parametrize("method", [m for m in ROWS if not ROWS[m].nf4])
def test_nf4_base_refused_where_it_cannot_compose(method: str) -> None:
    linear, _, _ = TARGETS["nf4"]
    with pytest.raises(ValueError, match="NF4"):
        peftkit.adapt(MODELS["nf4"](0), ROWS[method].make(target_modules=linear))
