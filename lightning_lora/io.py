"""Adapters as files, in Hugging Face PEFT's layout, written atomically, read without pickle.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` and, for ``trainable_modules``, ``base_model.model.<module>.<tensor>``.
``peft.PeftModel.from_pretrained`` loads it; :func:`load_adapter` loads what PEFT's
``save_pretrained`` writes. What PEFT has no field for (our ``init``, ``mha_projections``,
``adapter_dtype``) rides in the safetensors metadata, which PEFT ignores.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import AdapterFileError, LoRAConfigError, LoRATargetError
from .inject import (
    inject_lora,
    lora_config,
    lora_layers,
    lora_state_dict,
    trainable_module_names,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
METADATA_KEY = "lightning_lora"

# PEFT LoraConfig fields that do not change what a trained adapter computes.
_HARMLESS_FIELDS = {
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "qalora_group_size",
    "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
    "velora_config", "arrow_config", "use_bdlora",
}  # fmt: skip
# Fields whose non-default value means an adapter we cannot compute the same way.
_MATH_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "bias": "trained biases of the base layers",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on bare nn.Parameters",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")


def _is_default(value: Any) -> bool:
    return value in (None, False, "none", 0) or value == {} or value == []


# ------------------------------------------------------------------------------------ write


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it into
    place: a crash mid-write leaves the previous file whole, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def peft_config_dict(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` describing adapter ``adapter_name`` of ``model``: exact module
    names as targets (so any PEFT version matches the same modules) and per-module rank or
    alpha only where they differ from the config's."""
    config = lora_config(model, adapter_name)
    targets = [t for t in lora_layers(model) if adapter_name in t.layer.lora_A]
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        r = t.layer.r[adapter_name]
        if r != config.r:
            rank_pattern[t.path] = r
        alpha = t.layer.scaling[adapter_name] * (r**0.5 if config.use_rslora else r)
        if abs(alpha - config.alpha) > 1e-9 * max(1.0, config.alpha):
            alpha_pattern[t.path] = alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted({t.path for t in targets}),
        "exclude_modules": None,
        "modules_to_save": trainable_module_names(model, adapter_name) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's file keys (``base_model.model.<module>.lora_A.weight``)."""
    suffix = re.compile(rf"\.(lora_[AB])\.{re.escape(adapter_name)}$")
    out = {}
    for key, tensor in lora_state_dict(model, adapter_name).items():
        out[PREFIX + suffix.sub(r".\1.weight", key)] = tensor
    return out


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's layout.

    Each file is written atomically. Tensors are copied to CPU (shared storage, e.g. tied
    weights in a trainable module, is copied apart, as safetensors requires).
    """
    path = Path(path)
    config = lora_config(model, adapter_name)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_tensors(model, adapter_name).items()}
    extras = {
        "version": _version(),
        "adapter_name": adapter_name,
        "init": config.init,
        "mha_projections": config.mha_projections,
        "adapter_dtype": config.adapter_dtype,
        "target_patterns": config.target_modules,
        "trainable_patterns": config.trainable_modules,
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(extras)}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    text = json.dumps(peft_config_dict(model, adapter_name, base_model_name_or_path), indent=2, sort_keys=True)
    atomic_write(path / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text + "\n"))
    return path


def _version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------------------------- read


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of directory ``path``, checked to be a LoRA adapter whose math we
    implement. Unknown fields with default values are ignored with a warning."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        what = "does not exist" if not Path(path).exists() else f"has no {ADAPTER_CONFIG}"
        raise AdapterFileError(
            f"adapter directory {str(path)!r} {what}; an adapter directory holds {ADAPTER_CONFIG} "
            f"and {ADAPTER_WEIGHTS}, as written by save_adapter or PEFT's save_pretrained."
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file} is not valid JSON ({err}); the file is corrupt.") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, found {type(config).__name__}.")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"{file} describes a {config['peft_type']} adapter; lightning-lora loads LORA adapters only."
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterFileError(f"{file} lacks the field {key!r} that every LoRA adapter has.")
    for key, what in _MATH_FIELDS.items():
        if not _is_default(config.get(key)):
            raise AdapterFileError(
                f"{file} sets {key}={config[key]!r}: {what}, which lightning-lora does not "
                f"implement yet, so its outputs would differ. Load it with PEFT instead."
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{file} was initialised with init_lora_weights={init!r}, which also changes the base "
            f"weights; this adapter only fits that modified base. Convert it with PEFT "
            f"(path_initial_model_for_weight_conversion) first."
        )
    unknown = sorted(k for k in config if k not in _HARMLESS_FIELDS and k not in _MATH_FIELDS)
    ignored = [k for k in unknown if _is_default(config[k])]
    refused = [k for k in unknown if not _is_default(config[k])]
    if refused:
        raise AdapterFileError(
            f"{file} sets fields lightning-lora does not know ({', '.join(f'{k}={config[k]!r}' for k in refused)}), "
            f"probably from a newer PEFT; they may change the adapter's math, so it is not loaded."
        )
    if ignored:
        warnings.warn(f"{file}: ignoring unknown fields left at their defaults: {ignored}", stacklevel=3)
    return config


def read_adapter_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of ``adapter_model.safetensors`` (never a pickle) and our metadata extras."""
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing; the adapter directory is incomplete.")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({err}); it may be truncated.") from None
    extras = json.loads(metadata.get(METADATA_KEY, "{}"))
    return tensors, extras


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.x.y.lora_A.weight`` → (``x.y``, ``lora_A``); other keys → (key, "")."""
    key = key.removeprefix(PREFIX)
    m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.weight)?", key)
    return (m.group(1), m.group(2)) if m else (key, "")


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: a key matches a module name or a dotted suffix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> list[str]:
    """Inject adapter ``adapter_name`` into ``model`` and fill it from directory ``path``.

    The adapted modules are the ones the file has tensors for, so PEFT's and our pattern
    dialects need not agree. Every tensor must fit: a shape mismatch names the module and both
    shapes; a module the model lacks is named. The loaded adapter becomes the active one.
    Returns the adapted weights' names.
    """
    peft = read_adapter_config(path)
    tensors, extras = read_adapter_tensors(path)
    lora_keys: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        module, kind = _split_key(key)
        if kind:
            lora_keys.setdefault(module, {})[kind] = tensor
        else:
            other[module] = tensor
    incomplete = [m for m, ab in lora_keys.items() if set(ab) != {"lora_A", "lora_B"}]
    if incomplete or not lora_keys:
        raise AdapterFileError(
            f"{Path(path) / ADAPTER_WEIGHTS} lacks lora_A/lora_B pairs for {incomplete or 'any module'}."
        )
    targets, excludes = _target_modules(model, sorted(lora_keys), path)
    try:
        config = LoRAConfig(
            r=int(peft["r"]),
            alpha=float(peft["lora_alpha"]),
            dropout=float(peft.get("lora_dropout") or 0.0),
            target_modules=targets,
            exclude_modules=excludes,
            trainable_modules=list(peft.get("modules_to_save") or []),
            init=extras.get("init", "zeros_b"),
            mha_projections=list(extras.get("mha_projections", ["q", "k", "v"])),
            use_rslora=bool(peft.get("use_rslora", False)),
            adapter_dtype=extras.get("adapter_dtype"),
        )
    except (LoRAConfigError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{Path(path) / ADAPTER_CONFIG}: {err}") from None
    try:
        names = inject_lora(model, config, adapter_name=adapter_name)
    except LoRATargetError as err:
        raise AdapterFileError(f"adapter {str(path)!r} does not fit this model: {err}") from None
    _fill(model, adapter_name, config, peft, lora_keys, other, path)
    return names


def _target_modules(model: nn.Module, layer_paths: list[str], path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Module names to inject (and to exclude), from the LoRA layer paths in a file: a
    parametrized tensor's layer ``m.parametrizations.w.0`` maps back to module ``m``; q/k/v
    blocks map to their nn.MultiheadAttention, whose out_proj is excluded if the file has none."""
    modules = dict(model.named_modules())
    targets: list[str] = []
    excludes: list[str] = []
    for layer_path in layer_paths:
        module = layer_path.split(".parametrizations.")[0]
        if module not in modules:
            raise AdapterFileError(
                f"adapter {str(path)!r} has weights for module {module!r}, which this "
                f"{type(model).__name__} does not have; it was trained on another architecture "
                f"(or saved from a wrapper: compare the module names)."
            )
        owner = module.rsplit(".", 1)[0] if module.endswith(".out_proj") else module
        if isinstance(modules.get(owner), nn.MultiheadAttention) and any(
            p.startswith(owner + ".parametrizations.") for p in layer_paths
        ):
            module = owner
            if not any(p.startswith(owner + ".out_proj.") for p in layer_paths):
                excludes.append(owner + ".out_proj")
        if module not in targets:
            targets.append(module)
    return targets, sorted(set(excludes))


def _fill(
    model: nn.Module,
    adapter_name: str,
    config: LoRAConfig,
    peft: Mapping[str, Any],
    lora_keys: Mapping[str, Mapping[str, Tensor]],
    other: Mapping[str, Tensor],
    path: str | os.PathLike,
) -> None:
    layers = {t.path: t for t in lora_layers(model) if adapter_name in t.layer.lora_A}
    missing = sorted(set(layers) - set(lora_keys))
    if missing:
        raise AdapterFileError(f"adapter {str(path)!r} lacks weights for adapted module(s) {missing[:3]}.")
    for layer_path, ab in lora_keys.items():
        target = layers.get(layer_path)
        if target is None:
            raise AdapterFileError(
                f"adapter {str(path)!r} has weights for {layer_path!r}, which is not a LoRA layer here."
            )
        layer = target.layer
        r = ab["lora_A"].shape[0]
        want_a, want_b = (r, layer.d_in), (layer.d_out, r)
        if tuple(ab["lora_A"].shape) != want_a or tuple(ab["lora_B"].shape) != want_b:
            raise AdapterFileError(
                f"adapter {str(path)!r} does not fit module {target.name!r}: the file has "
                f"lora_A {tuple(ab['lora_A'].shape)} and lora_B {tuple(ab['lora_B'].shape)}, the "
                f"model's weight needs A {want_a} and B {want_b} (a weight of {layer.d_out}×{layer.d_in}); "
                f"was it trained on another base model?"
            )
        expected_r = int(_pattern_value(peft.get("rank_pattern") or {}, layer_path, config.r))
        if r != expected_r:
            raise AdapterFileError(
                f"adapter {str(path)!r}: {ADAPTER_CONFIG} says r={expected_r} for {target.name!r} "
                f"but its tensors have rank {r}; the files do not belong together."
            )
        alpha = float(_pattern_value(peft.get("alpha_pattern") or {}, layer_path, config.alpha))
        scaling = alpha / (r**0.5 if config.use_rslora else r)
        if r != layer.r[adapter_name] or scaling != layer.scaling[adapter_name]:
            dtype, device = layer.lora_A[adapter_name].dtype, layer.lora_A[adapter_name].device
            active = layer.active_adapters
            layer.delete_adapter(adapter_name)
            layer.add_adapter(adapter_name, r, scaling, config.dropout, config.init, dtype, device)
            layer.set_active(active)
            layer.lora_A[adapter_name].requires_grad_(True)
            layer.lora_B[adapter_name].requires_grad_(True)
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(ab["lora_A"])
            layer.lora_B[adapter_name].copy_(ab["lora_B"])
    if other:
        own = model.state_dict()
        unknown = sorted(k for k in other if k not in own)
        if unknown:
            raise AdapterFileError(
                f"adapter {str(path)!r} has trainable-module tensors {unknown[:3]} this model lacks."
            )
        for key, tensor in other.items():
            if own[key].shape != tensor.shape:
                raise AdapterFileError(
                    f"adapter {str(path)!r}: {key!r} has shape {tuple(tensor.shape)} in the file "
                    f"and {tuple(own[key].shape)} in the model."
                )
        model.load_state_dict(dict(other), strict=False)
