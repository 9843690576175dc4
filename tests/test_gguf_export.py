"""``export_gguf``: llama.cpp LoRA adapters, read back with the ``gguf`` package.

The oracles are llama.cpp's documented layout (names ``blk.N.<t>.weight.lora_a|b``, torch
layout with GGUF's reversed ``ne``, ``scale = alpha / r``), the q/k row order of its Llama
converter written here by index (``row 2i + j`` ← ``row j·d/2 + i``), its interleaved rotary
embedding, and the adapted model's own outputs. The comparison with llama.cpp itself is
``bench/llamacpp_check.py`` (it needs a source build of llama-cpp-python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import ids, output, sole, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2
from torch import nn

import peftkit
from peftkit import cli
from peftkit.gguf_export import gguf_adapter_tensors

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# llama.cpp's base tensor for each HF Llama projection (spec §6.2)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gguf_name(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q.weight``."""
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def llama_cpp_rows(rows: int, n_head: int) -> list[int]:
    """The source row of each row in llama.cpp's q/k layout: per head of d rows, new row 2i + j
    is old row j·d/2 + i."""
    d = rows // n_head
    return [h * d + j * (d // 2) + i
            for h in range(n_head) for i in range(d // 2) for j in range(2)]  # fmt: skip


def read(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any], dict[str, torch.Tensor]]:
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in r.tensors}
    return r, meta, tensors


def trained(model: nn.Module, config: peftkit.AdapterConfig, steps: int = 3) -> nn.Module:
    """``model`` adapted and trained a few steps (every B non-zero), in eval mode."""
    peftkit.adapt(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    peftkit.attach(opt, model)
    model.train()
    for t in range(steps):
        output(model, ids(vocab=128, seed=t)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def gguf_deltas(path: Path, n_head: int, n_kv: int) -> dict[str, torch.Tensor]:
    """ΔW per llama.cpp base tensor as llama.cpp applies it (alpha / r · B A), rows put back in
    HF order for q/k."""
    _, meta, t = read(path)
    alpha = meta["adapter.lora.alpha"]
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in t}:
        a, b = t[f"{name}.lora_a"].double(), t[f"{name}.lora_b"].double()  # (r, in), (out, r)
        delta = (alpha / b.shape[1]) * b @ a  # (out, in)
        heads = {"attn_q": n_head, "attn_k": n_kv}.get(name.split(".")[2])
        if heads is not None:
            hf = torch.empty_like(delta)
            hf[llama_cpp_rows(delta.shape[0], heads)] = delta
            delta = hf
        out[name] = delta
    return out


# ---------------------------------------------------------------------------------- the file
def test_names_shapes_dtypes_and_metadata(tmp_path: Path) -> None:
    model = trained(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    path = peftkit.export_gguf(model, tmp_path / "a.gguf")
    r, meta, tensors = read(path)
    assert meta == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": 4.0,  # the rank: the scale 8/4 is folded into B
    }
    assert r.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert r.fields["GGUF.version"].contents() == 3
    expected = {}
    for name, layer in peftkit.adapters(model):
        expected[gguf_name(name) + ".lora_a"] = (4, layer.in_features)
        expected[gguf_name(name) + ".lora_b"] = (layer.out_features, 4)
    assert len(expected) == 2 * 2 * 7
    assert {t.name: tuple(t.data.shape) for t in r.tensors} == expected
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(expected[t.name]))  # GGUF's ne: fastest first
        assert t.data_offset % 32 == 0
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (16, 4)  # 2 KV heads of 8


def test_permutation_is_llama_cpps_row_order() -> None:
    from peftkit.gguf_export import permute_rows, unpermute_rows

    w = torch.arange(3 * 64 * 2, dtype=torch.float64).reshape(3 * 64, 2)
    p = permute_rows(w, 3)
    torch.testing.assert_close(p, w[llama_cpp_rows(192, 3)], rtol=0, atol=0)
    assert p[:6, 0].tolist() == [0, 64, 2, 66, 4, 68]  # source rows 0, 32, 1, 33, 2, 34
    torch.testing.assert_close(unpermute_rows(p, 3), w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even size"):
        permute_rows(torch.zeros(10, 2), 2)


def test_adapter_on_the_permuted_base_is_the_permuted_merged_weight(tmp_path: Path) -> None:
    """llama.cpp holds permute(W) for q/k and adds B'A': that must equal permute(W + ΔW)."""
    model = trained(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    for name, layer in peftkit.adapters(model):
        base = layer.base.weight.detach().double()  # (out, in)
        merged = base + layer.delta_weight().detach().double()
        a, b = t[gguf_name(name) + ".lora_a"].double(), t[gguf_name(name) + ".lora_b"].double()
        scale = meta["adapter.lora.alpha"] / b.shape[1]
        heads = {"q_proj": 4, "k_proj": 2}.get(name.rsplit(".", 1)[1])
        rows = llama_cpp_rows(base.shape[0], heads) if heads else list(range(base.shape[0]))
        torch.testing.assert_close(base[rows] + scale * b @ a, merged[rows], rtol=0, atol=1e-6)
        if heads:  # control: the unpermuted B does not fit llama.cpp's layout
            unpermuted = torch.empty_like(b)
            unpermuted[rows] = b
            assert (base[rows] + scale * unpermuted @ a - merged[rows]).abs().max() > 1e-2


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rotary embedding for Llama: rotate adjacent pairs (2i, 2i+1) by pos·θ_i."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    ang = pos[:, None].double() * inv  # (T, d/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (H, T, d/2)
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * ang.cos() - x1 * ang.sin()
    out[..., 1::2] = x0 * ang.sin() + x1 * ang.cos()
    return out


def test_attention_scores_match_under_llama_cpps_rope(tmp_path: Path) -> None:
    """The exported q/k adapters, applied to llama.cpp's permuted weights with llama.cpp's
    interleaved RoPE, give the adapted HF model's rotated queries and keys, and its scores."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = trained(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    attn, cfg = model.model.layers[1].self_attn, model.config
    d, theta = 8, float(cfg.rope_parameters["rope_theta"])
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.arange(6)
    cos, sin = model.model.rotary_emb(x, pos[None])
    rotated = {}
    for proj, heads in (("q", 4), ("k", 2)):
        layer = sole(getattr(attn, f"{proj}_proj"))
        w = layer.base.weight.detach().double()
        hf = (x @ (w + layer.delta_weight().detach().double()).T).view(6, heads, d).transpose(0, 1)
        name = f"blk.1.attn_{proj}.weight"
        a, b = t[name + ".lora_a"].double(), t[name + ".lora_b"].double()
        w_cpp = w[llama_cpp_rows(w.shape[0], heads)] + meta["adapter.lora.alpha"] / 4 * b @ a
        cpp = (x @ w_cpp.T).view(6, heads, d).transpose(0, 1)  # (H, T, d)
        rot_hf, _ = apply_rotary_pos_emb(hf[None], hf[None], cos.double(), sin.double())
        rot_cpp = _rope_interleaved(cpp, pos, theta)
        torch.testing.assert_close(rot_cpp, rot_hf[0][..., llama_cpp_rows(d, 1)], atol=1e-6,
                                   rtol=0)  # fmt: skip
        rotated[proj] = (rot_hf[0], rot_cpp)
    for i in (0, 1):  # scores of query head 0 against KV head 0: the same numbers
        q, k = rotated["q"][i][0], rotated["k"][i][0]  # (T, d)
        rotated[f"s{i}"] = q @ k.T  # (T, T)
    torch.testing.assert_close(rotated["s1"], rotated["s0"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- every method
METHODS = {
    "lora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "rslora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL),
    "rank_pattern": lambda: peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"k_proj": 2, "down_proj": 6}
    ),
    "lora_fa": lambda: peftkit.LoraFAConfig(r=4, lora_alpha=8, target_modules=ALL),
    "vera": lambda: peftkit.VeraConfig(r=8, target_modules=ALL),
    "mora1": lambda: peftkit.MoraConfig(r=4, mora_type=1, target_modules=ALL),
    "dylora": lambda: peftkit.DyLoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "adalora": lambda: peftkit.AdaLoraConfig(
        init_r=4, target_r=4, total_step=8, lora_alpha=8, target_modules=ALL
    ),
    "dora_dynamic": lambda: peftkit.DoraDynamicConfig(
        target_r=2,
        init_r=4,
        total_step=8,
        prune_interval=2,
        lora_dropout=0.0,
        target_modules=ALL,
    ),  # fmt: skip
    "delta_lora": lambda: peftkit.DeltaLoraConfig(
        r=4, lora_alpha=8, warmup_steps=1, target_modules=ALL
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_file_reproduces_the_adapted_model(method: str, tmp_path: Path) -> None:
    """Base weights + the ΔW that llama.cpp would add (read back, un-permuted) = the adapted
    model: per layer to 1e-6 and in the logits."""
    model = trained(tiny_llama(), METHODS[method]())
    path = peftkit.export_gguf(model, tmp_path / f"{method}.gguf")
    deltas = gguf_deltas(path, n_head=4, n_kv=2)
    layers = dict(peftkit.adapters(model))
    assert sorted(deltas) == sorted(gguf_name(n) for n in layers)
    if method != "delta_lora":  # Delta-LoRA's delta_weight is relative to its trained W
        for name, layer in layers.items():
            want = layer.delta_weight().detach().double()
            torch.testing.assert_close(deltas[gguf_name(name)], want, rtol=0, atol=1e-6)
    base = tiny_llama()
    with torch.no_grad():
        for name in layers:
            base.get_submodule(name).weight += deltas[gguf_name(name)].float()
    x = ids(vocab=128)
    torch.testing.assert_close(output(base, x), output(model, x), rtol=1e-5, atol=1e-5)


def test_dylora_rank_truncates(tmp_path: Path) -> None:
    model = trained(tiny_llama(), METHODS["dylora"]())
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "r2.gguf", rank=2))
    assert meta["adapter.lora.alpha"] == 2.0
    assert t["blk.0.attn_q.weight.lora_a"].shape == (2, 32)
    with pytest.raises(ValueError, match="rank-3"):
        peftkit.export_gguf(trained(tiny_llama(), METHODS["lora"]()), tmp_path / "x.gguf", rank=3)


def test_per_module_ranks_keep_their_scale(tmp_path: Path) -> None:
    """One alpha for the file, llama.cpp's scale alpha / r per tensor: a rank-2 tensor gets
    its B pre-scaled so that the product is the module's own scaling."""
    model = trained(tiny_llama(), METHODS["rank_pattern"]())
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    assert meta["adapter.lora.alpha"] == 6.0
    assert t["blk.0.attn_k.weight.lora_b"].shape == (16, 2)
    assert t["blk.0.ffn_down.weight.lora_b"].shape == (32, 6)
    k = sole(model.model.layers[0].self_attn.k_proj)
    b = t["blk.0.attn_k.weight.lora_b"]
    want = (k.lora_B.detach() * k.scaling)[llama_cpp_rows(16, 2)] * (2 / 6)
    torch.testing.assert_close(b, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_mistral_is_llama_and_qwen2_is_not_permuted(kind: str, tmp_path: Path) -> None:
    make = {"mistral": tiny_mistral, "qwen2": tiny_qwen2}[kind]
    model = trained(make(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    assert meta["general.architecture"] == {"mistral": "llama", "qwen2": "qwen2"}[kind]
    q = sole(model.model.layers[0].self_attn.q_proj)
    b = (q.lora_B * q.scaling).detach()
    want = b[llama_cpp_rows(32, 4)] if kind == "mistral" else b
    torch.testing.assert_close(t["blk.0.attn_q.weight.lora_b"], want, rtol=0, atol=0)


# --------------------------------------------------------------------------------- refusals
def _lora(model: nn.Module, **kw: Any) -> nn.Module:
    return peftkit.adapt(model, peftkit.LoraConfig(r=2, **{"target_modules": ALL, **kw}))


def tied_llama() -> nn.Module:
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


REFUSALS = {
    "dora": (lambda: _lora(tiny_llama(), use_dora=True), r"DoRA.*peftkit merge"),
    "gpt2": (
        lambda: peftkit.adapt(tiny_gpt2(), peftkit.LoraConfig(r=2, target_modules=["c_attn"])),
        r"model_type is 'gpt2'; run `peftkit merge`",
    ),
    "modules_to_save": (
        lambda: _lora(tiny_llama(), modules_to_save=["lm_head"]),
        r"trained in full \(lm_head\).*only lora_a/lora_b",
    ),
    "embedding": (
        lambda: _lora(tiny_llama(), target_modules=["q_proj", "embed_tokens"]),
        r"embed_tokens: LoRA on an embedding",
    ),
    "tied lm_head": (
        lambda: _lora(tied_llama(), target_modules=["q_proj", "lm_head"]),
        r"lm_head: its weight is tied",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_alternative(case: str, tmp_path: Path) -> None:
    make, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        peftkit.export_gguf(make(), tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_untied_lm_head_is_the_output_tensor(tmp_path: Path) -> None:
    model = trained(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["lm_head"]))
    _, _, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    assert {n: tuple(v.shape) for n, v in t.items()} == {
        "output.weight.lora_a": (2, 32),
        "output.weight.lora_b": (128, 2),
    }


def test_bad_paths_and_an_existing_file_survives_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftkit import gguf_export

    model = _lora(tiny_llama())
    for bad, message in (
        (tmp_path / "adapter", r"must end in \.gguf"),
        (tmp_path / "missing" / "a.gguf", "does not exist"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            peftkit.export_gguf(model, bad)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        peftkit.export_gguf(model, tmp_path / "dir.gguf")
    old = tmp_path / "old.gguf"
    old.write_bytes(b"previous adapter")

    def half_then_fail(f: Any, metadata: Any, tensors: Any) -> None:
        f.write(b"GGUF partial")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        peftkit.export_gguf(model, old)
    assert old.read_bytes() == b"previous adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "old.gguf"]
    monkeypatch.undo()
    peftkit.export_gguf(model, old)  # a good write replaces it whole
    assert len(gguf.GGUFReader(old).tensors) == 2 * 2 * 7


def test_tensors_function_is_what_the_file_holds(tmp_path: Path) -> None:
    model = trained(tiny_llama(), METHODS["lora"]())
    metadata, tensors = gguf_adapter_tensors(model)
    _, meta, t = read(peftkit.export_gguf(model, tmp_path / "a.gguf"))
    assert meta == metadata
    assert sorted(t) == sorted(tensors)
    for name, v in tensors.items():
        assert torch.equal(t[name], v)


# ------------------------------------------------------------------------------------- CLI
def _tiny_llama_folder(folder: Path) -> Path:
    from transformers import BertTokenizerFast

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(123))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    tiny_llama().save_pretrained(str(folder))
    return folder


def test_cli_export_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _tiny_llama_folder(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = trained(AutoModelForCausalLM.from_pretrained(str(base)), METHODS["lora"]())
    peftkit.save_adapter(model, tmp_path / "adapter")
    args = ["--adapter", tmp_path / "adapter", "--model", base]  # the task defaults to causal-lm
    out = tmp_path / "a.gguf"
    code = cli.main([str(a) for a in ["export", *args, "--output", out, "--format", "gguf"]])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert str(out) in stdout and "llama.cpp" in stdout
    deltas = gguf_deltas(out, n_head=4, n_kv=2)
    for name, layer in peftkit.adapters(model):
        want = layer.delta_weight().detach().double()
        torch.testing.assert_close(deltas[gguf_name(name)], want, rtol=0, atol=1e-6)

    dora = _lora(AutoModelForCausalLM.from_pretrained(str(base)), use_dora=True)
    peftkit.save_adapter(dora, tmp_path / "dora")
    for argv, message in (
        (["--adapter", tmp_path / "dora", *args[2:], "--output", tmp_path / "d.gguf"], "DoRA"),
        ([*args, "--output", tmp_path / "folder"], "must end in .gguf"),
    ):
        code = cli.main([str(a) for a in ["export", *argv, "--format", "gguf"]])
        _, stderr = capsys.readouterr()
        assert code == 2
        assert stderr.count("\n") == 1 and stderr.startswith("peftkit: error:")
        assert message in stderr
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "folder").exists()


def test_one_named_adapter_of_several_is_exported(tmp_path: Path) -> None:
    model = trained(tiny_llama(), METHODS["lora"]())
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["v_proj"]), name="other")
    with torch.no_grad():
        for _, a in peftkit.adapters(model, "other"):
            a.lora_B.normal_()
    _, default = peftkit.gguf_export.gguf_adapter_tensors(model, name="default")
    _, other = peftkit.gguf_export.gguf_adapter_tensors(model, name="other")
    assert len(other) == 2 * 2 and all(".attn_v." in k for k in other)  # v_proj in 2 layers
    assert len(default) > len(other)
    for path, a in peftkit.adapters(model, "other"):
        b = other[gguf_name(path) + ".lora_b"]
        torch.testing.assert_close(b, (a.lora_B * a.scaling * a.r / 2).detach().float())
