"""Atomic file writing shared by adapters, hook states and checkpoints: every file goes to a
temporary sibling first (fsync'd) and is renamed over its target, so an interrupted write leaves
the previous file intact. Under torch.distributed only rank 0 writes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor


def is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _atomic_replace(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file to a temporary sibling first, then rename each over its target."""
    tmps: dict[Path, Path] = {}
    try:
        for path, write in files.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmps[path] = tmp
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def _text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def _tensor_writer(tensors: dict[str, Tensor]) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, str(path), metadata={"format": "pt"})


def write_files(
    directory: Path, json_files: dict[str, Any], tensor_files: dict[str, dict[str, Tensor]]
) -> None:
    """Write JSON documents and safetensors files into ``directory`` atomically (rank 0 only)."""
    if not is_writer():
        return
    directory.mkdir(parents=True, exist_ok=True)
    jobs: dict[Path, Callable[[Path], None]] = {}
    for name, tensors in tensor_files.items():
        jobs[directory / name] = _tensor_writer(tensors)
    for name, doc in json_files.items():
        jobs[directory / name] = _text_writer(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    _atomic_replace(jobs)
