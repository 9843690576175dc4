"""Export an adapted model as a llama.cpp LoRA adapter (a GGUF file): :func:`export_gguf`.

The q/k row permutation (:func:`permute_rows`) is the one llama.cpp's Llama converter applies to
the base weights; :func:`write_gguf` is a minimal GGUF v3 writer (no dependency on ``gguf``).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import EMBEDDING, ModulesToSave, adapters, model_state

#: HF ``model_type`` → (llama.cpp architecture, whether its converter permutes q/k rows)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
#: module under ``model.layers.N.`` → llama.cpp tensor ``blk.N.<name>.weight``
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BLOCK = re.compile(r"(?:model\.)?layers\.(\d+)\.(" + "|".join(map(re.escape, BLOCK_TENSORS)) + ")")
_MERGE_HINT = (
    "run `peftkit merge` (or peftkit.merge_and_unload) instead and convert the merged folder "
    "with llama.cpp's convert_hf_to_gguf.py"
)

GGUF_MAGIC, GGUF_VERSION, GGUF_ALIGNMENT = 0x46554747, 3, 32  # "GGUF" little-endian
_GGUF_UINT32, _GGUF_FLOAT32, _GGUF_STRING = 4, 6, 8  # metadata value types
_GGML_F32 = 0  # tensor type


def permute_rows(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's q/k row order: within each head of d rows, new row ``2i + j`` is old row
    ``j·d/2 + i`` (the two rotate-half halves interleaved), as ``convert_hf_to_gguf.py`` does."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    d2 = rows // n_head // 2
    return w.reshape(n_head, 2, d2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (rows, ...)


def unpermute_rows(w: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`permute_rows` (what transformers' GGUF loader applies)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    d2 = rows // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (rows, ...)


def gguf_adapter_tensors(
    model: nn.Module, *, rank: int | None = None, name: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(metadata, tensors)`` of the llama.cpp LoRA adapter for adapter ``name`` of ``model``
    (default: the only or first active one): float32 tensors in torch layout, B already permuted
    for q/k. Raises ``ValueError`` for what llama.cpp cannot carry; :func:`export_gguf` writes
    the result."""
    current = model_state(model).resolve(name)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports Llama-family decoders (model_type {', '.join(ARCHITECTURES)}); "
            f"this model's model_type is {model_type!r}; {_MERGE_HINT}"
        )
    arch, permute = ARCHITECTURES[model_type]
    n_head = int(config.num_attention_heads)  # type: ignore[union-attr]
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    n_layers = int(config.num_hidden_layers)  # type: ignore[union-attr]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    full = [
        p for p, m in model.named_modules() if isinstance(m, ModulesToSave) and current in m.copies
    ]
    if full:
        raise ValueError(
            f"modules trained in full ({', '.join(full)}) cannot go into a llama.cpp LoRA adapter, "
            f"which holds only lora_a/lora_b pairs; {_MERGE_HINT}"
        )
    factors: dict[str, tuple[Tensor, Tensor, int | None]] = {}
    for name, layer in adapters(model, current):
        if layer.kind == EMBEDDING:
            raise ValueError(
                f"{name}: LoRA on an embedding is not exported to GGUF (only linear layers are); "
                f"{_MERGE_HINT}"
            )
        target, heads = _gguf_name(name, n_layers, n_head, n_kv, tied)
        try:
            a, b = layer.lora_factors(rank)
        except ValueError as e:
            raise ValueError(
                f"{name}: {e} (on the command line: `peftkit merge`); a llama.cpp adapter holds "
                "only B·A, so convert the merged folder with llama.cpp's convert_hf_to_gguf.py"
            ) from None
        factors[target] = (a.detach().float().cpu(), b.detach().float().cpu(), heads)
    if not factors:
        raise ValueError("model has no adapter layers to export")
    alpha = max(int(a.shape[0]) for a, _, _ in factors.values())
    tensors: dict[str, Tensor] = {}
    for target, (a, b, heads) in factors.items():
        r = int(a.shape[0])
        if r != alpha:  # llama.cpp multiplies by alpha / r: pre-divide so the product is 1
            b = b * (r / alpha)
        if permute and heads is not None:
            b = permute_rows(b, heads)  # (out, r), rows in llama.cpp's q/k order
        tensors[f"{target}.lora_a"] = a.contiguous()  # (r, in)
        tensors[f"{target}.lora_b"] = b.contiguous()  # (out, r)
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": float(alpha),
    }
    return metadata, tensors


def _gguf_name(
    name: str, n_layers: int, n_head: int, n_kv: int, tied: bool
) -> tuple[str, int | None]:
    """llama.cpp's base tensor for the module at ``name``, and the head count its rows are
    permuted by (q: heads, k: KV heads, others: None)."""
    if name == "lm_head":
        if tied:
            raise ValueError(
                "lm_head: its weight is tied to embed_tokens, and llama.cpp's base GGUF then has "
                "no output tensor for a LoRA to attach to; train without lm_head in the targets, "
                f"or {_MERGE_HINT}"
            )
        return "output.weight", None
    m = _BLOCK.fullmatch(name)
    if m is None:
        raise ValueError(
            f"{name}: llama.cpp adapters cover q/k/v/o_proj, gate/up/down_proj and an untied "
            f"lm_head; this module has no llama.cpp tensor. Adapt only those, or {_MERGE_HINT}"
        )
    layer, module = int(m.group(1)), m.group(2)
    if layer >= n_layers:
        raise ValueError(f"{name}: layer {layer} is beyond the config's {n_layers} layers")
    heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}.get(module)
    return f"blk.{layer}.{BLOCK_TENSORS[module]}.weight", heads


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    rank: int | None = None,
    name: str | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` (default: the only or first active one) as a
    llama.cpp LoRA adapter at ``path`` (``.gguf``).

    llama.cpp loads it beside the base model's GGUF (``llama-cli -m base.gguf --lora a.gguf``,
    ``llama_cpp.Llama(model_path=..., lora_path=...)``, an Ollama ``ADAPTER`` line). The layout
    is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and ``src/llama-adapter.cpp``
    reads (https://github.com/ggml-org/llama.cpp; GGUF v3:
    https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    * metadata ``general.architecture`` (``llama``, ``qwen2``), ``general.type = "adapter"``,
      ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
    * per adapted linear, two float32 tensors named after the base tensor:
      ``blk.N.attn_q.weight.lora_a`` holds A ``(r, in)`` and ``….lora_b`` holds B ``(out, r)``,
      in torch layout (GGUF lists dimensions reversed: ``ne = [in, r]`` and ``[r, out]``);
    * llama.cpp computes ``W x + scale · B (A x)`` with ``scale = lora_scale · alpha / r``, r
      read from B. peftkit writes ``alpha`` = the largest rank and folds each module's own
      scaling into B, so ``lora_scale = 1`` reproduces the adapted model (rsLoRA and
      per-module ranks included);
    * llama.cpp's Llama converter interleaves the two rotary halves of every head of ``q_proj``
      and ``k_proj``; the rows of B for those two get the same permutation, A stays. Without it
      a q/k adapter would load without error and compute garbage attention.

    Works for any method with an exact LoRA form (``layer.lora_factors``; ``rank`` truncates
    where the method allows it, as in :func:`peftkit.export_lora`) on Llama and Mistral
    (``llama``) and Qwen2 (``qwen2``, not permuted) models, for adapters on the seven
    projections and an untied ``lm_head``. Refuses DoRA (Liu) and other full-rank updates,
    ``modules_to_save``, embedding LoRAs and an ``lm_head`` tied to the embedding, naming
    ``peftkit merge`` plus llama.cpp's ``convert_hf_to_gguf.py`` instead. The file is written to
    a temporary name and renamed: an existing file at ``path`` is replaced whole or left as it
    was.
    """
    out = Path(path)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF adapter file name must end in .gguf")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name ending in .gguf")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist; create the folder first")
    metadata, tensors = gguf_adapter_tensors(model, rank=rank, name=name)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_gguf(f, metadata, tensors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_gguf(f: Any, metadata: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """GGUF v3 to the binary file ``f``: header, metadata (str → string, float → float32, int →
    uint32), tensor infos, then each float32 tensor's data at a 32-byte aligned offset."""
    import numpy as np

    head = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))
    parts = [head]
    for key, value in metadata.items():
        parts.append(_gguf_string(key))
        if isinstance(value, str):
            parts += [struct.pack("<I", _GGUF_STRING), _gguf_string(value)]
        elif isinstance(value, float):
            parts.append(struct.pack("<If", _GGUF_FLOAT32, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(struct.pack("<II", _GGUF_UINT32, value))
        else:
            raise TypeError(f"metadata {key}: no GGUF type for {type(value).__name__}")
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise TypeError(f"tensor {name}: expected float32, got {t.dtype}")
        shape = tuple(reversed(t.shape))  # GGUF's ne: the fastest dimension first
        parts += [_gguf_string(name), struct.pack(f"<I{len(shape)}Q", len(shape), *shape)]
        parts.append(struct.pack("<IQ", _GGML_F32, offset))
        blob = np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes()
        blobs.append(blob)
        offset += _padded(len(blob))
    info = b"".join(parts)
    f.write(info + bytes(_padded(len(info)) - len(info)))
    for blob in blobs:
        f.write(blob + bytes(_padded(len(blob)) - len(blob)))


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _padded(n: int) -> int:
    return (n + GGUF_ALIGNMENT - 1) // GGUF_ALIGNMENT * GGUF_ALIGNMENT
