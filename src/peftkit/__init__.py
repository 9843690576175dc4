"""peftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face models.

    import peftkit
    model = peftkit.adapt(model, peftkit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peftkit.attach(optimizer, model)      # methods with step-time dynamics; harmless otherwise
    ...train...
    peftkit.save_adapter(model, "out")    # PEFT's file layout
"""

from .config import AdapterConfig
from .core import (
    Adapter,
    ModulesToSave,
    adapters,
    dense_weight,
    disable_adapters,
    merge,
    trainable_parameters,
    unmerge,
)
from .hooks import TrainingHook, attach, detach, register_hook
from .inject import adapt, find_targets, merge_and_unload, unload
from .methods import METHODS
from .methods.lora import LoraConfig
from .state import export_lora, load_adapter, read_adapter_config, save_adapter

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "LoraConfig",
    "ModulesToSave",
    "TrainingHook",
    "adapt",
    "adapters",
    "attach",
    "dense_weight",
    "detach",
    "disable_adapters",
    "export_lora",
    "find_targets",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter_config",
    "register_hook",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
