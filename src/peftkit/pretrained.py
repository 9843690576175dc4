"""What ``save_pretrained`` writes for an adapted Hugging Face model: the adapter, never a model.

An adapted model's ``state_dict`` holds peftkit's layer names (``q_proj.base.weight``,
``q_proj.lora_A``); written as a ``model.safetensors``, ``from_pretrained`` would randomly
initialise every adapted layer and warn only in a load report. So :func:`peftkit.adapt` gives an
adapted model that has a ``save_pretrained`` method its own ``save_pretrained``, one instance
attribute (``unload``/``merge_and_unload`` remove it; the class is never touched), which writes
the adapter in PEFT's layout, as ``PeftModel.save_pretrained`` does:

- ``model.save_pretrained(dir)`` and ``Trainer.save_model(dir)`` (which calls it) write
  ``adapter_config.json`` + ``adapter_model.safetensors``. ``AutoModelForCausalLM.from_pretrained
  (dir)`` then loads the base named in ``base_model_name_or_path`` and the adapter (through
  PEFT), and ``peftkit.load_adapter(model, dir)`` reads the folder. No ``config.json`` is written:
  with one, ``from_pretrained`` would look for a full model in the folder.
- The Trainer's checkpoints hold the adapter the same way, not the frozen base.
  :class:`peftkit.integrations.hf.PeftkitCallback` adds what resuming needs (see there).

Note: an instance attribute is the one per-model hook ``transformers`` leaves: ``Trainer._save``
and users both call ``model.save_pretrained``, and neither offers a way to change what it writes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from torch import nn

from .inject import ON_ADAPTED, ON_UNLOADED
from .state import save_adapter

ATTR = "save_pretrained"


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    is_main_process: bool = True,
    state_dict: Any = None,
    push_to_hub: bool = False,
    **_: Any,
) -> None:
    """Write ``model``'s adapter to ``save_directory`` in PEFT's layout (see the module).

    ``state_dict`` (passed by the Trainer under DeepSpeed/FSDP) is not used: the adapter's own
    tensors are written. ``safe_serialization``, ``max_shard_size`` and the like do not apply to
    an adapter file and are ignored."""
    if push_to_hub:
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported on a peftkit model; write the "
            "adapter with peftkit.save_adapter(model, dir) and upload the folder"
        )
    if not is_main_process:
        return
    path = Path(save_directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    save_adapter(model, path)


def install(root: nn.Module) -> None:
    """Give ``root`` the adapter-writing ``save_pretrained`` if its class has one (HF models)."""
    if callable(getattr(type(root), ATTR, None)):
        object.__setattr__(root, ATTR, functools.partial(save_pretrained, root))


def remove(root: nn.Module) -> None:
    """Undo :func:`install`: the class's ``save_pretrained`` applies again."""
    vars(root).pop(ATTR, None)


ON_ADAPTED.append(install)
ON_UNLOADED.append(remove)

__all__ = ["install", "remove", "save_pretrained"]
