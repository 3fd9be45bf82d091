"""Adapters as files, in Hugging Face PEFT's layout, written atomically, read without pickle.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<weight>.lora_A.weight`` /
``.lora_B.weight`` and, for ``trainable_modules``, ``base_model.model.<module>.<tensor>``.
``<weight>`` is the adapted weight's name as :func:`~lightning_lora.inject.lora_layers` gives it:
the module name for an ``nn.Linear`` (exactly PEFT's key), ``attn.in_proj_weight[q]`` for a block
of an ``nn.MultiheadAttention`` (a lightning-lora extension PEFT does not read).
``peft.PeftModel.from_pretrained`` loads our files, and
:func:`~lightning_lora.adapters.load_adapter` loads what PEFT's ``save_pretrained`` writes. What
PEFT has no field for (our ``init``, ``mha_projections``, ``adapter_dtype``) rides in the
safetensors metadata, which PEFT ignores, together with a copy of the fields that set the math,
so a pair of files from two different saves is detected.

Reading never trusts a file: tensors come from safetensors only (no pickle), and
:func:`read_adapter` checks the two files against each other before any model is touched.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import AdapterFileError
from .inject import lora_config, lora_layers, trainable_module_names
from .targets import target_fields

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
METADATA_KEY = "lightning_lora"
_MATH_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")

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
    place: a crash mid-write leaves the previous file whole, never a truncated one, and no
    temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Writers differ (safetensors creates 0600 files): give the file the mode a plain
        # open() would, or keep the mode of the file it replaces.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def peft_config_dict(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` describing adapter ``adapter_name`` of ``model``: exact module
    names as targets (so any PEFT version matches the same modules) and per-weight rank or
    alpha only where they differ from the config's."""
    config = lora_config(model, adapter_name)
    targets = [t for t in lora_layers(model) if adapter_name in t.layer.lora_A]
    fields = target_fields(model, [t.name for t in targets])
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        r = t.layer.r[adapter_name]
        if r != config.r:
            rank_pattern[t.name] = r
        alpha = t.layer.scaling[adapter_name] * (r**0.5 if config.use_rslora else r)
        if abs(alpha - config.alpha) > 1e-9 * max(1.0, config.alpha):
            alpha_pattern[t.name] = alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(fields["target_modules"]),
        "exclude_modules": fields["exclude_modules"] or None,
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
    """The adapter's tensors under the file's keys: ``base_model.model.<weight>.lora_A.weight``
    (``(r, d_in)``) and ``.lora_B.weight`` (``(d_out, r)``) per adapted weight, and the
    ``trainable_modules``' state under ``base_model.model.<module>.<tensor>``."""
    out = {}
    for t in lora_layers(model):
        if adapter_name in t.layer.lora_A:
            out[f"{PREFIX}{t.name}.lora_A.weight"] = t.layer.lora_A[adapter_name].detach()
            out[f"{PREFIX}{t.name}.lora_B.weight"] = t.layer.lora_B[adapter_name].detach()
    for module_name in trainable_module_names(model, adapter_name):
        for key, tensor in model.get_submodule(module_name).state_dict(prefix=f"{module_name}.").items():
            out[PREFIX + key] = tensor.detach()
    return out


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's layout.

    Each file is written atomically, the weights first: a save interrupted between the two
    files leaves a pair that :func:`load_adapter` recognises as mismatched instead of loading
    new weights with an old config. Tensors are copied to CPU (shared storage, e.g. tied
    weights in a trainable module, is copied apart, as safetensors requires).
    """
    path = Path(path)
    config = lora_config(model, adapter_name)
    peft = peft_config_dict(model, adapter_name, base_model_name_or_path)
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in adapter_tensors(model, adapter_name).items()}
    extras = {
        "version": _version(),
        "adapter_name": adapter_name,
        "init": config.init,
        "mha_projections": config.mha_projections,
        "adapter_dtype": config.adapter_dtype,
        "target_patterns": config.target_modules,
        "trainable_patterns": config.trainable_modules,
        "config": {k: peft[k] for k in _MATH_KEYS},
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(extras)}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    text = json.dumps(peft, indent=2, sort_keys=True)
    atomic_write(path / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text + "\n"))
    return path


def _version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------------------------- read


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of directory ``path``, checked to be a LoRA adapter whose math we
    implement. Unknown fields with default values are ignored with a warning; unknown fields
    with other values, and known ones that change the math (DoRA, ...), are refused."""
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
            f"{file} describes a peft_type={config['peft_type']!r} adapter; lightning-lora loads LORA adapters only."
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
    try:
        extras = json.loads(metadata.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{file}: its {METADATA_KEY!r} metadata is not valid JSON ({err}).") from None
    return tensors, extras


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """Per-weight rank/alpha: an exact name (our files), else PEFT's rule (the key is a regex
    matching the name or a dotted suffix of it)."""
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            continue
    return default


@dataclass
class AdapterFile:
    """An adapter directory, read and checked on its own, before any model is touched.

    ``pairs`` maps each adapted weight's name to ``(A (r, d_in), B (d_out, r))``; ``trainable``
    holds the trainable modules' tensors under the model's state-dict keys.
    """

    path: Path
    config: dict[str, Any]
    pairs: dict[str, tuple[Tensor, Tensor]]
    trainable: dict[str, Tensor]
    extras: dict[str, Any]

    def rank(self, name: str) -> int:
        return int(self.pairs[name][0].shape[0])

    def scaling(self, name: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of weight ``name``."""
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"]))
        r = self.rank(name)
        return alpha / (r**0.5 if self.config.get("use_rslora") else r)

    def delta_weight(self, name: str) -> Tensor:
        """``ΔW = scaling · B A`` of shape ``(d_out, d_in)``, in float32."""
        A, B = self.pairs[name]
        return (B.float() @ A.float()) * self.scaling(name)

    def delta_norm(self, name: str) -> float:
        """``‖ΔW‖_F`` without forming ΔW: ``‖s·BA‖²_F = s² · Σ (BᵀB) ⊙ (AAᵀ)``, two ``r × r``
        products in float64."""
        A, B = (t.double() for t in self.pairs[name])
        return abs(self.scaling(name)) * float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0).sqrt())


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read directory ``path`` and check that its two files agree with each other: every weight
    has an ``A`` and a ``B`` whose ranks match each other and the config."""
    config = read_adapter_config(path)
    tensors, extras = read_adapter_tensors(path)
    file = Path(path) / ADAPTER_WEIGHTS
    saved = extras.get("config")
    if saved is not None:
        differ = [k for k in _MATH_KEYS if saved.get(k) != config.get(k, saved.get(k))]
        if differ:
            k = differ[0]
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says {k}={config.get(k)!r} but {file} was saved "
                f"with {k}={saved.get(k)!r}: the two files come from different saves (an interrupted "
                f"save, or files copied from two adapters). Save the adapter again."
            )
    halves: dict[str, dict[str, Tensor]] = {}
    trainable: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.weight)?", key.removeprefix(PREFIX))
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif re.search(r"\.lora_\w+", key):
            raise AdapterFileError(
                f"{file} holds {key!r}, a LoRA tensor of a kind lightning-lora does not implement "
                f"(it loads lora_A/lora_B pairs for nn.Linear and nn.MultiheadAttention)."
            )
        else:
            trainable[key.removeprefix(PREFIX)] = tensor
    if not halves:
        raise AdapterFileError(f"{file} holds no lora_A/lora_B tensors; it is not a LoRA adapter.")
    pairs = {}
    for name, ab in halves.items():
        if set(ab) != {"lora_A", "lora_B"}:
            lacking = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterFileError(
                f"{file} has {name}'s {set(ab).pop()} but not its {lacking}; the file is incomplete."
            )
        A, B = ab["lora_A"], ab["lora_B"]
        expected = int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != expected or B.shape[1] != expected:
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says r={expected} for {name!r}, but {file} has "
                f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} (expected ({expected}, d_in) and "
                f"(d_out, {expected})); the files do not belong together."
            )
        pairs[name] = (A, B)
    return AdapterFile(Path(path), config, pairs, trainable, extras)
