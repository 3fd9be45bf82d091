"""PEFT's ``adapter_config.json``, both ways: what we write, and what we accept.

Writing: :func:`peft_config_dict` describes an adapter with exact module names as targets (so
any PEFT version selects the same modules) and per-weight rank or alpha only where they differ;
an ``nn.MultiheadAttention`` is one target with its fused rank (:mod:`lightning_lora.peft_mha`).
Reading: :func:`check_peft_config` accepts a ``LoraConfig`` only if every field that changes the
math is one we compute the same way; unknown fields left at their defaults are ignored with a
warning, others refused. :func:`config_for_file` turns an accepted file into the
:class:`~lightning_lora.config.LoRAConfig` that adapts exactly its weights.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import ADAPTER_DTYPES, LoRAConfig
from .errors import AdapterFileError
from .params import trainable_module_names
from .patterns import PatternKeyError, check_pattern_key
from .peft_mha import peft_layout
from .state import adapted_weights, lora_config
from .targets import target_fields

if TYPE_CHECKING:
    from .adapter_file import AdapterFile

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

MATH_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")
"""The fields that set what an adapter computes; the weights file keeps a copy to detect a
pair of files from two different saves."""

MATH_DEFAULTS = {"use_dora": False}
"""What a math key means where a copy lacks it (files saved before lightning-lora knew it)."""

# PEFT LoraConfig fields that do not change what a trained adapter computes.
HARMLESS_FIELDS = {
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "qalora_group_size",
    "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
    "velora_config", "arrow_config", "use_bdlora", "fan_in_fan_out", "use_dora",
}  # fmt: skip
# ``fan_in_fan_out`` is harmless too: PEFT decides it per module from the layer type (it forces it
# on for transformers' Conv1D and off for nn.Linear, with a warning, whatever the file says), and
# so does lightning-lora (:class:`~lightning_lora.layer_types.LoRAConv1D`).
# Fields whose non-default value means an adapter we cannot compute the same way.
MATH_FIELDS = {
    "lora_bias": "a trained bias on lora_B",
    "bias": "trained biases of the base layers",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on bare nn.Parameters",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")


def _is_default(value: Any) -> bool:
    return value in (None, False, "none", 0) or value == {} or value == []


def check_peft_config(config: Any, file: Path) -> dict[str, Any]:
    """``config`` (the parsed JSON of ``file``) if it is a LoRA adapter whose math we implement;
    else an :class:`AdapterFileError` naming the field and why."""
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, found {type(config).__name__}.")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"{file} describes a peft_type={config['peft_type']!r} adapter; lightning-lora loads LORA adapters only."
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterFileError(f"{file} lacks the field {key!r} that every LoRA adapter has.")
    check_field_types(config, file)
    for key, what in MATH_FIELDS.items():
        if not _is_default(config.get(key)):
            raise AdapterFileError(
                f"{file} sets {key}={config[key]!r}: {what}, which lightning-lora does not "
                f"implement yet, so its outputs would differ. Load it with PEFT instead."
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{file} was initialised with init_lora_weights={init!r}, which also changes the base "
            f"weights; this adapter only fits that modified (residual) base. Save the plain-LoRA conversion "
            f"for the original base instead: lightning-lora's save_adapter does by default "
            f"(convert_base_init=True), PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )
    unknown = sorted(k for k in config if k not in HARMLESS_FIELDS and k not in MATH_FIELDS)
    ignored = [k for k in unknown if _is_default(config[k])]
    refused = [k for k in unknown if not _is_default(config[k])]
    if refused:
        raise AdapterFileError(
            f"{file} sets fields lightning-lora does not know ({', '.join(f'{k}={config[k]!r}' for k in refused)}), "
            f"probably from a newer PEFT; they may change the adapter's math, so it is not loaded."
        )
    if ignored:
        warnings.warn(f"{file}: ignoring unknown fields left at their defaults: {ignored}", stacklevel=4)
    return config


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) and n for n in v)


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


# What each field we read must hold, and how to say it. Fields not listed are either harmless
# and unread, or checked for their default value (MATH_FIELDS).
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string such as 'LORA'"),
    "r": (_positive_int, "a positive integer (the rank)"),
    "lora_alpha": (_positive_number, "a positive number (the scale numerator)"),
    "lora_dropout": (
        _optional(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1),
        "a number in [0, 1)",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
    "target_modules": (_optional(lambda v: isinstance(v, str) or _names(v)), "a list of module names, or a string"),
    "exclude_modules": (_optional(lambda v: isinstance(v, str) or _names(v)), "a list of module names, or a string"),
    "modules_to_save": (_optional(_names), "a list of module names, or null"),
    "rank_pattern": (
        _optional(lambda v: isinstance(v, dict) and all(_positive_int(x) for x in v.values())),
        "an object mapping module names to positive integers",
    ),
    "alpha_pattern": (
        _optional(lambda v: isinstance(v, dict) and all(_positive_number(x) for x in v.values())),
        "an object mapping module names to positive numbers",
    ),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or the name of an initialisation"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string, or null"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
}


def check_field_types(config: dict[str, Any], file: Path) -> None:
    """Every field we read holds what it must: an :class:`AdapterFileError` names the file,
    the field, the value found and what was expected (``"r": "8"`` is not the rank 8,
    ``"use_rslora": "false"`` is not false)."""
    for key, (ok, expected) in FIELD_TYPES.items():
        if key in config and not ok(config[key]):
            raise AdapterFileError(
                f"{file}: field {key!r} must be {expected}, found {config[key]!r} "
                f"({type(config[key]).__name__}). Fix the file, or save the adapter again."
            )
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field_name) or {}:
            try:
                check_pattern_key(key)
            except PatternKeyError as err:
                raise AdapterFileError(f"{file}: {field_name} key {key!r} is refused: {err}.") from None


def peft_config_dict(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` describing adapter ``adapter_name`` of ``model``: exact module
    names as targets (so any PEFT version matches the same modules) and per-weight rank or
    alpha only where they differ from the config's."""
    config = lora_config(model, adapter_name)
    targets = [t for t in adapted_weights(model) if adapter_name in t.layer.lora_A]
    fields = target_fields(model, [t.name for t in targets])
    mha = peft_layout(model, adapter_name)
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        spec = t.layer.specs[adapter_name]
        if t.name in mha.covered:
            continue
        if spec.r != config.r:
            rank_pattern[t.name] = spec.r
        if spec.alpha != config.alpha:
            alpha_pattern[t.name] = spec.alpha
    for owner, rank in mha.ranks.items():  # PEFT's MHA: one rank and alpha for in_proj and out_proj
        if rank != config.r:
            rank_pattern[owner] = rank
        if mha.alphas[owner] != config.alpha:
            alpha_pattern[owner] = mha.alphas[owner]
    # PEFT adapts an MHA as a whole (an out_proj alone would be skipped by MHA's forward), and
    # always adapts its out_proj: zeros stand for one we do not adapt, so it is never excluded.
    target_modules = sorted({mha.owners.get(n, n) for n in fields["target_modules"]})
    exclude = [
        n for n in fields["exclude_modules"] if n not in mha.covered and n.removesuffix(".out_proj") not in mha.ranks
    ]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "exclude_modules": exclude or None,
        "modules_to_save": trainable_module_names(model, adapter_name) or None,
        "bias": "none",
        "fan_in_fan_out": bool(transposed_weights(model, adapter_name)),
        "init_lora_weights": True,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }


def transposed_weights(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Names of the weights of ``adapter_name`` stored ``(d_in, d_out)`` under ``lora_A`` /
    ``lora_B`` keys (transformers' ``Conv1D``: PEFT's ``fan_in_fan_out``). Files record them, so
    a file merged into a checkpoint without the model (``lightning-lora merge``) adds ``ΔWᵀ``
    there; an embedding's keys say so themselves."""
    return [
        t.name
        for t in adapted_weights(model)
        if adapter_name in t.layer.lora_A and t.layer.transposed and not t.layer.embedding_keys
    ]


def config_for_file(model: nn.Module, file: AdapterFile) -> LoRAConfig:
    """The LoRAConfig that adapts exactly the file's weights, with the file's hyper-parameters."""
    peft, extras = file.config, file.extras
    if "adapter_dtype" in extras:
        dtype = extras["adapter_dtype"]
    else:  # a PEFT file: keep the dtype it was saved in
        dtypes = {str(t.dtype).removeprefix("torch.") for pair in file.pairs.values() for t in pair}
        dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(ADAPTER_DTYPES) else None
    fields = target_fields(model, file.pairs)
    try:
        return LoRAConfig(
            r=int(peft["r"]),
            alpha=float(peft["lora_alpha"]),
            dropout=float(peft.get("lora_dropout") or 0.0),
            target_modules=fields["target_modules"],
            exclude_modules=fields["exclude_modules"],
            trainable_modules=list(peft.get("modules_to_save") or []),
            init=extras.get("init", "zeros_b"),
            mha_projections=fields["mha_projections"],
            use_rslora=bool(peft.get("use_rslora", False)),
            use_dora=peft.get("use_dora") is True,  # type-checked: a JSON boolean
            adapter_dtype=dtype,
            freeze_a=extras.get("freeze_a", False),
        )
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{file.path / ADAPTER_CONFIG}: {err}") from None
