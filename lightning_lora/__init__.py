"""lightning-lora: LoRA fine-tuning for any PyTorch Lightning pipeline.

The public API is what this module exports; everything else may change. ``LoRACallback`` is
imported on first use, so the core and the ``lightning-lora`` command line start without
importing Lightning (seconds at every start).
"""

__version__ = "0.1.0"

from .adapter_file import read_adapter
from .adapters import active_adapters, adapter_names, combine_adapters, delete_adapter, disable_adapters, set_adapter
from .advisor import RankSuggestion, spectra, suggest_ranks
from .config import AdapterSpec, LoRAConfig
from .errors import (
    AdapterFileError,
    AdapterSaveError,
    CheckpointError,
    LoRAConfigError,
    LoRAError,
    LoRAStateError,
    LoRATargetError,
)
from .inject import inject_lora, unload_lora
from .io import save_adapter
from .layer_types import LoRAConv, LoRAConv1D, LoRAEmbedding
from .layers import LoRALayer, LoRALinear, LoRAParametrization
from .load import load_adapter
from .loraplus import apply_loraplus
from .merge import merge_lora, unmerge_lora
from .mixed_batches import per_sample_adapters
from .params import lora_parameters, lora_state_dict, mark_only_lora_as_trainable
from .report import merge_report
from .resize import resize_adapter, resize_adapter_file
from .state import adapted_weights, lora_config
from .state import lora_layers as lora_layers  # the name before adapted_weights; kept for old code
from .stats import ParameterStats, parameter_stats


def __getattr__(name: str) -> object:
    if name == "LoRACallback":
        from .callback import LoRACallback

        return LoRACallback
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "AdapterSaveError",
    "AdapterSpec",
    "CheckpointError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRAError",
    "LoRALayer",
    "LoRALinear",
    "LoRAParametrization",
    "LoRAStateError",
    "LoRATargetError",
    "ParameterStats",
    "RankSuggestion",
    "active_adapters",
    "adapted_weights",
    "adapter_names",
    "apply_loraplus",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "merge_report",
    "parameter_stats",
    "per_sample_adapters",
    "read_adapter",
    "resize_adapter",
    "resize_adapter_file",
    "save_adapter",
    "set_adapter",
    "spectra",
    "suggest_ranks",
    "unload_lora",
    "unmerge_lora",
]
