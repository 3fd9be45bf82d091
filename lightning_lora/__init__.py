"""lightning-lora: LoRA fine-tuning for any PyTorch Lightning pipeline.

The public API is what this module exports; everything else may change. ``LoRACallback`` is
imported on first use, so the core and the ``lightning-lora`` command line start without
importing Lightning (seconds at every start).
"""

__version__ = "0.1.0"

from .adapters import active_adapters, combine_adapters, delete_adapter, disable_adapters, load_adapter
from .config import LoRAConfig
from .errors import AdapterFileError, LoRAConfigError, LoRAError, LoRAStateError, LoRATargetError
from .inject import (
    adapter_names,
    inject_lora,
    lora_config,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from .io import read_adapter, save_adapter
from .layers import LoRALayer, LoRALinear, LoRAParametrization
from .stats import ParameterStats, parameter_stats


def __getattr__(name: str) -> object:
    if name == "LoRACallback":
        from .callback import LoRACallback

        return LoRACallback
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRALayer",
    "LoRALinear",
    "LoRAParametrization",
    "LoRAStateError",
    "LoRATargetError",
    "ParameterStats",
    "active_adapters",
    "adapter_names",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "parameter_stats",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "unload_lora",
    "unmerge_lora",
]
