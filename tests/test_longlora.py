"""LongLoRA: S2-Attn through transformers' AttentionInterface, trainable embeddings and norms,
position interpolation, PEFT files.

Oracles: an explicit dense-mask S2 attention written from the group definitions (registered as
its own attention implementation on a merged copy), the unadapted base model, a base model built
with linear RoPE scaling, and PEFT 0.21.2 loading the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODELS, ids
from torch import nn

import peftkit
from peftkit.integrations.longlora_hf import NAME, RopeSwitch, group_size

transformers = pytest.importorskip("transformers")

RATIO = 0.25
N = 16  # G = 4


def tiny_qwen3(seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **{"tie_word_embeddings": False, **kw},
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


def tiny_tied_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


BUILD = {**{k: MODELS[k] for k in ("llama", "qwen2", "mistral")}, "qwen3": tiny_qwen3}
KINDS = list(BUILD)


def logits(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=x, attention_mask=mask).logits  # type: ignore[no-any-return]


def perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def padded() -> torch.Tensor:
    """(3, N) masks: no padding, left padding, right padding."""
    m = torch.ones(3, N, dtype=torch.long)
    m[1, :5] = 0
    m[2, -6:] = 0
    return m


def adapted(kind: str, **kw: Any) -> nn.Module:
    model = BUILD[kind](0)
    peftkit.adapt(model, peftkit.LongLoraConfig(r=4, **kw))
    return model


# -- the explicit S2 oracle ---------------------------------------------------------------------

REF_PADDING: list[torch.Tensor | None] = [None]


def reference_s2(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kw: Any,
) -> tuple[torch.Tensor, None]:
    """S2 from its definition: head h < H/2 attends within floor(i/G), the rest within
    floor((i + G/2)/G), causally; padding keys never. Dense (H, N, N) mask, fp32 softmax."""
    if not module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, **kw)  # type: ignore[no-any-return]
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, N, D)
    g = max(2, int(n * RATIO) // 2 * 2)
    i = torch.arange(n)
    allowed = torch.zeros(h, n, n, dtype=torch.bool)
    for head in range(h):
        grp = i // g if head < h // 2 else (i + g // 2) // g
        allowed[head] = (grp[:, None] == grp[None, :]) & (i[None, :] <= i[:, None])
    allowed = allowed.expand(b, h, n, n).clone()  # (B, H, N, N)
    pad = REF_PADDING[0]
    if pad is not None:
        allowed &= pad.bool()[:, None, None, :]
        allowed |= torch.eye(n, dtype=torch.bool)  # padded query rows: not compared
    scores = (q @ k.transpose(-1, -2)) * (scaling or d**-0.5)  # (B, H, N, N)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    out = scores.softmax(-1) @ v  # (B, H, N, D)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def _register_reference() -> None:
    from transformers.masking_utils import sdpa_mask

    transformers.AttentionInterface.register("test_s2_reference", reference_s2)
    transformers.masking_utils.AttentionMaskInterface.register("test_s2_reference", sdpa_mask)


def merged_twin(model: nn.Module, kind: str, tmp: Path) -> nn.Module:
    """A plain model computing what ``model`` computes (loaded from its file, then merged)."""
    peftkit.save_adapter(model, tmp)
    twin = peftkit.load_adapter(BUILD[kind](0), tmp)
    return peftkit.merge_and_unload(twin)


# -- tests ---------------------------------------------------------------------------------------


def test_group_size_rule() -> None:
    assert [group_size(n, 0.25) for n in (1, 7, 8, 16, 18, 4096)] == [2, 2, 2, 4, 4, 1024]
    assert group_size(100, 1.0) == 100


def test_config_defaults_validation_and_file_keys() -> None:
    c = peftkit.LongLoraConfig()
    assert (c.r, c.lora_alpha, c.group_size_ratio, c.context_factor) == (8, 16, 0.25, None)
    assert c.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert c.trainable == ("embed_tokens", "norm") and c.method == "longlora"
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["peftkit_method"] == "longlora"
    assert peftkit.LongLoraConfig.from_dict(d) == c
    for kw, field in [
        ({"group_size_ratio": 0}, "group_size_ratio"),
        ({"group_size_ratio": 1.5}, "group_size_ratio"),
        ({"context_factor": 0.5}, "context_factor"),
        ({"context_factor": float("inf")}, "context_factor"),
        ({"r": 0}, "r"),
        ({"trainable": [3]}, "trainable"),
    ]:
        with pytest.raises((ValueError, TypeError), match=field):
            peftkit.LongLoraConfig(**kw)


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_is_explicit_s2(kind: str, tmp_path: Path) -> None:
    model = adapted(kind, init_lora_weights=False)
    assert model.config._attn_implementation == NAME
    perturb(model, 1)
    twin = merged_twin(model, kind, tmp_path)
    twin.set_attn_implementation("test_s2_reference")
    model.train()
    twin.train()
    x = ids(batch=3, seq=N, vocab=128)
    for mask in (None, padded()):
        REF_PADDING[0] = mask
        got, want = logits(model, x, mask), logits(twin, x, mask)
        keep = torch.ones(3, N, dtype=torch.bool) if mask is None else mask.bool()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-5)
    REF_PADDING[0] = None
    # and S2 differs from full attention (the check above is not vacuous)
    twin.set_attn_implementation("sdpa")
    assert (logits(model, x) - logits(twin, x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_eval_and_disabled_are_the_base(kind: str) -> None:
    base, model = BUILD[kind](0), adapted(kind)
    x, mask = ids(batch=3, seq=N, vocab=128), padded()
    assert torch.equal(logits(model, x, mask), logits(base, x, mask))  # B = 0: a no-op
    perturb(model)
    assert not torch.equal(logits(model, x, mask), logits(base, x, mask))
    model.train()
    base.train()
    with peftkit.disable_adapters(model):
        assert torch.equal(logits(model, x, mask), logits(base, x, mask))
    assert not torch.equal(logits(model, x), logits(base, x))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_padded_training_is_finite(kind: str) -> None:
    model = adapted(kind)
    perturb(model)
    model.train()
    x, mask = ids(batch=3, seq=N, vocab=128), padded()
    labels = x.masked_fill(mask == 0, -100)
    loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_activation_checkpointing_keeps_s2(tmp_path: Path) -> None:
    """A reentrant checkpoint runs its first pass without autograd; S2 must still apply there,
    or the loss and the recomputed gradients would come from different attentions."""
    x = ids(batch=2, seq=N, vocab=128)
    runs = []
    for ckpt in (False, True):
        model = adapted("llama")
        perturb(model)
        model.train()
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": True})
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_generate_uses_full_attention(tmp_path: Path) -> None:
    kind = "mistral"  # its sliding-window mask path; the others share Llama's
    model = adapted(kind)
    perturb(model)
    twin = merged_twin(model, kind, tmp_path)
    x = ids(batch=2, seq=6, vocab=128)
    kw: dict[str, Any] = {"max_new_tokens": 5, "do_sample": False}
    want = twin.generate(x, **kw)
    assert torch.equal(model.generate(x, **kw), want)
    model.train()  # generate runs under no_grad: still full attention
    assert torch.equal(model.generate(x, **kw), want)


def test_eager_original_and_unload() -> None:
    base = MODELS["llama"](0, attn_implementation="eager")
    model = MODELS["llama"](0, attn_implementation="eager")
    peftkit.adapt(model, peftkit.LongLoraConfig(r=4))
    x, mask = ids(batch=3, seq=N, vocab=128), padded()
    assert torch.equal(logits(model, x, mask), logits(base, x, mask))
    model.train()
    assert torch.isfinite(logits(model, x, mask)).all()  # S2 reads the additive mask
    perturb(model)
    peftkit.unload(model)
    assert model.config._attn_implementation == "eager"
    assert not hasattr(model, "peftkit_shared")
    assert torch.equal(logits(model, x, mask), logits(base.train(), x, mask))


def test_trainable_modules_and_counts(tmp_path: Path) -> None:
    model = adapted("qwen3")
    saved = {n for n, m in model.named_modules() if isinstance(m, peftkit.ModulesToSave)}
    assert "model.embed_tokens" in saved and "model.norm" in saved
    assert "model.layers.1.self_attn.q_norm" in saved  # PEFT's suffix rule: ends in "norm"
    assert "model.layers.0.input_layernorm" in saved and "lm_head" not in saved
    n, total = peftkit.trainable_parameters(model)
    lora = sum(a.lora_A.numel() + a.lora_B.numel() for _, a in peftkit.adapters(model))
    full = sum(p.numel() for s in saved for p in model.get_submodule(s).trained.parameters())
    assert n == lora + full and total == sum(p.numel() for p in tiny_qwen3(0).parameters()) + lora
    peftkit.save_adapter(model, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(d["modules_to_save"]) == saved and d["peftkit_method"] == "longlora"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_peft_loads_the_file(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = adapted(kind, init_lora_weights=False)
    perturb(model, 2)
    model.eval()
    x = ids(batch=2, seq=N, vocab=128)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(BUILD[kind](0), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)
    peftkit.export_lora(model, tmp_path / "plain")  # a plain LoRA file: the same modules_to_save
    theirs = peft.PeftModel.from_pretrained(BUILD[kind](0), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)
    ours = peftkit.load_adapter(BUILD[kind](0), tmp_path / "plain")
    torch.testing.assert_close(logits(ours, x), logits(model, x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dora_layers_compose(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = adapted("llama", use_dora=True)
    assert {type(a).__name__ for _, a in peftkit.adapters(model)} == {"DoraLayer"}
    perturb(model, 3)
    x = ids(batch=2, seq=N, vocab=128)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(BUILD["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tied_embeddings(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_tied_llama()
    peftkit.adapt(model, peftkit.LongLoraConfig(r=4))
    perturb(model, 4)
    head = model.get_output_embeddings().weight
    assert head is model.model.embed_tokens.original.weight  # the head keeps the frozen original
    assert head is not model.model.embed_tokens.trained.weight
    x = ids(batch=2, seq=N, vocab=128)
    y = logits(model, x)
    peftkit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_tied_llama(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=0)
    peftkit.merge_and_unload(model)
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path / "m")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(again, x), y, atol=1e-5, rtol=0)


# -- position interpolation ------------------------------------------------------------------------

LONG = 100  # beyond max_position_embeddings = 64


def test_interpolation_matches_linear_rope_config() -> None:
    model = adapted("llama", context_factor=4)
    scaled = MODELS["llama"](0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    base = MODELS["llama"](0)
    x = ids(batch=1, seq=LONG, vocab=128)
    assert model.config.rope_parameters["factor"] == 4.0
    assert torch.equal(logits(model, x), logits(scaled, x))
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-3
    with peftkit.disable_adapters(model):
        assert torch.equal(logits(model, x), logits(base, x))
    peftkit.unload(model)
    assert model.config.rope_parameters == base.config.rope_parameters
    assert not any(isinstance(m, RopeSwitch) for m in model.modules())
    assert torch.equal(logits(model, x), logits(base, x))


def test_interpolation_multiplies_an_existing_linear_factor() -> None:
    model = MODELS["llama"](0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    peftkit.adapt(model, peftkit.LongLoraConfig(r=4, context_factor=3))
    assert model.config.rope_parameters["factor"] == 6.0


def test_interpolation_saved_and_merged(tmp_path: Path) -> None:
    model = adapted("qwen2", context_factor=4, init_lora_weights=False)
    perturb(model, 5)
    model.eval()
    x = ids(batch=1, seq=LONG, vocab=128)
    y = logits(model, x)
    peftkit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["context_factor"] == 4
    fresh = peftkit.load_adapter(MODELS["qwen2"](0), tmp_path / "a")
    assert torch.equal(logits(fresh, x), y)
    peftkit.merge_and_unload(model)
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "linear" and saved["factor"] == 4.0
    again = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(again, x), y, atol=1e-5, rtol=0)


def test_interpolation_refusals() -> None:
    with pytest.raises(ValueError, match="RoPE"):
        peftkit.adapt(
            MODELS["gpt2"](0), peftkit.LongLoraConfig(target_modules=["c_attn"], context_factor=2)
        )
    llama3 = MODELS["llama"](
        0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        peftkit.adapt(llama3, peftkit.LongLoraConfig(context_factor=2))
    assert llama3.config._attn_implementation == "sdpa"  # refused before any change
    assert not hasattr(llama3, "peftkit_state")


def test_models_without_rope_attention() -> None:
    """GPT-2 (learned positions) and a plain MLP: LoRA + trainable modules, attention untouched."""
    gpt2 = MODELS["gpt2"](0)
    peftkit.adapt(gpt2, peftkit.LongLoraConfig(target_modules=["c_attn"], trainable=["ln_f"]))
    assert gpt2.config._attn_implementation == "sdpa"
    assert isinstance(gpt2.transformer.ln_f, peftkit.ModulesToSave)
    mlp = MODELS["mlp"](0)
    peftkit.adapt(mlp, peftkit.LongLoraConfig(target_modules=["fc1"]))
    assert len(list(peftkit.adapters(mlp))) == 1


def test_group_wider_than_sliding_window_is_refused() -> None:
    model = adapted("mistral")
    model.config.sliding_window = 2  # read at call time by Mistral's attention
    model.train()
    with pytest.raises(ValueError, match="sliding window"):
        logits(model, ids(batch=1, seq=N, vocab=128))
