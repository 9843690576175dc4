"""peftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face models.

import peftkit
model = peftkit.adapt(model, peftkit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
peftkit.attach(optimizer, model)      # methods with step-time dynamics; harmless otherwise
...train...
peftkit.save_adapter(model, "out")    # PEFT's file layout
"""

from . import pretrained as _pretrained  # noqa: F401  (registers save_pretrained with adapt)
from .combining import combine
from .config import AdapterConfig
from .core import (
    AdaptedLayer,
    Adapter,
    ModulesToSave,
    adapters,
    dense_weight,
    disable_adapters,
    merge,
    trainable_parameters,
    unmerge,
)
from .gguf_export import export_gguf
from .hooks import TrainingHook, attach, detach, register_hook
from .inject import (
    active_adapters,
    adapt,
    adapter_names,
    delete_adapter,
    find_targets,
    merge_and_unload,
    set_adapter,
    unload,
)
from .methods import METHODS
from .methods.adalora import AdaLoraConfig
from .methods.delta_lora import DeltaLoraConfig
from .methods.dora_dynamic import DoraDynamicConfig
from .methods.dylora import DyLoraConfig, set_rank
from .methods.longlora import LongLoraConfig
from .methods.lora import LoraConfig
from .methods.lora_fa import LoraFAConfig
from .methods.mora import MoraConfig
from .methods.vera import VeraConfig
from .optim import param_groups
from .paged import PagedAdamW
from .quant import NF4Linear, nf4_dequantize, nf4_quantize, quantize_
from .routing import route
from .state import export_lora, load_adapter, read_adapter_config, save_adapter

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "NF4Linear",
    "PagedAdamW",
    "AdaptedLayer",
    "Adapter",
    "AdaLoraConfig",
    "AdapterConfig",
    "DeltaLoraConfig",
    "DoraDynamicConfig",
    "DyLoraConfig",
    "LoraConfig",
    "LoraFAConfig",
    "LongLoraConfig",
    "ModulesToSave",
    "MoraConfig",
    "TrainingHook",
    "VeraConfig",
    "active_adapters",
    "adapt",
    "adapter_names",
    "adapters",
    "attach",
    "combine",
    "delete_adapter",
    "dense_weight",
    "detach",
    "disable_adapters",
    "export_gguf",
    "export_lora",
    "find_targets",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "nf4_dequantize",
    "nf4_quantize",
    "param_groups",
    "quantize_",
    "read_adapter_config",
    "register_hook",
    "route",
    "save_adapter",
    "set_adapter",
    "set_rank",
    "trainable_parameters",
    "unload",
    "unmerge",
]
