"""lightning-lora: LoRA fine-tuning for any PyTorch Lightning pipeline.

The public API is what this module exports; everything else may change.
"""

__version__ = "0.1.0"

from .callback import LoRACallback
from .config import LoRAConfig
from .errors import AdapterFileError, LoRAConfigError, LoRAError, LoRAStateError, LoRATargetError
from .inject import (
    ParameterStats,
    adapter_names,
    inject_lora,
    lora_config,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    parameter_stats,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from .io import load_adapter, save_adapter
from .layers import LoRALayer, LoRALinear, LoRAParametrization

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
    "adapter_names",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "parameter_stats",
    "save_adapter",
    "set_adapter",
    "unload_lora",
    "unmerge_lora",
]
