"""Adapters as files, in Hugging Face PEFT's layout, written atomically, read without pickle.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<weight>.lora_A.weight`` /
``.lora_B.weight`` (``.lora_embedding_A`` / ``_B`` for an ``nn.Embedding``) and, for
``trainable_modules``, ``base_model.model.<module>.<tensor>``. ``<weight>`` is the adapted
weight's name (:mod:`lightning_lora.names`): the module name for a layer (exactly PEFT's key); an
``nn.MultiheadAttention`` is written in PEFT's layout, one pair over its fused in-projection and
one over ``out_proj`` (:mod:`lightning_lora.peft_mha`: exact both ways). Tensors have PEFT's
shapes: a conv's ``lora_A`` is a kernel ``(r, in, *k)`` and its ``lora_B`` a 1×1 conv
``(out, r, 1, ...)``. Names may be relative to a submodule, the model that will be served
(``root``, :mod:`lightning_lora.roots`).
``peft.PeftModel.from_pretrained`` loads our files, and
:func:`~lightning_lora.load.load_adapter` loads what PEFT's ``save_pretrained`` writes
(:mod:`lightning_lora.peft_format` says which files are accepted). What PEFT has no field for
(our ``init``, ``mha_projections``, ``adapter_dtype``, which weights are stored transposed, the
adapter root, the block layout of MHA adapters)
rides in the safetensors metadata, which PEFT ignores, together with a copy of the fields that
set the math, so a pair of files from two different saves is detected.

Reading never trusts a file: tensors come from safetensors only (no pickle), and
:func:`read_adapter` checks the two files against each other before any model is touched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import AdapterSpec
from .delta import Update, delta_weight
from .errors import AdapterFileError
from .names import FILE_PREFIX, file_key, parse_file_key, peft_mha_owner
from .params import adapter_entries
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MATH_KEYS,
    check_peft_config,
    pattern_value,
    peft_config_dict,
    transposed_weights,
)
from .peft_mha import METADATA_FIELD, from_peft, peft_layout
from .roots import rebase, relative, resolve_root, served_name_or_path
from .state import lora_config

METADATA_KEY = "lightning_lora"

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


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under the file's keys (:mod:`lightning_lora.names`): ``lora_A``
    ``(r, d_in)`` and ``lora_B`` ``(d_out, r)`` per adapted weight (a conv's as kernels, see
    :meth:`~lightning_lora.layers.LoRALayer.adapter_shapes`), and the ``trainable_modules``'
    state under ``base_model.model.<module>.<tensor>``; an ``nn.MultiheadAttention`` in PEFT's
    layout (:func:`~lightning_lora.peft_mha.peft_layout`)."""
    layout = peft_layout(model, adapter_name)
    covered = {file_key(name, part) for name in layout.covered for part in "AB"}
    tensors = {e.file_key: e.tensor.detach() for e in adapter_entries(model, adapter_name) if e.file_key not in covered}
    return tensors | layout.tensors


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    root: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's layout.

    ``root``: the submodule that will be served, e.g. ``"model"`` for a LightningModule holding a
    Hugging Face model as ``self.model``; names in the files are then relative to it (what
    ``PeftModel.from_pretrained(hf_model, path)`` expects), and the root is recorded in the
    metadata. ``"auto"`` finds it (:func:`~lightning_lora.roots.default_adapter_root`); ``None``
    writes full names. ``base_model_name_or_path`` defaults to the served model's Hugging Face
    ``config.name_or_path`` when it has one.

    Each file is written atomically, the weights first: a save interrupted between the two
    files leaves a pair that :func:`load_adapter` recognises as mismatched instead of loading
    new weights with an old config. Tensors are copied to CPU (shared storage, e.g. tied
    weights in a trainable module, is copied apart, as safetensors requires).
    """
    path = Path(path)
    config = lora_config(model, adapter_name)
    root = resolve_root(model, root)
    base = base_model_name_or_path or served_name_or_path(model, root)
    tensors, peft = rebase(adapter_tensors(model, adapter_name), peft_config_dict(model, adapter_name, base), root)
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    records = peft_layout(model, adapter_name).records
    extras = {
        "version": _version(),
        "adapter_name": adapter_name,
        "init": config.init,
        "mha_projections": config.mha_projections,
        "adapter_dtype": config.adapter_dtype,
        "target_patterns": config.target_modules,
        "trainable_patterns": config.trainable_modules,
        "fan_in_fan_out": [relative(n, root) for n in transposed_weights(model, adapter_name)],
        "config": {k: peft[k] for k in MATH_KEYS},
        "root": root,
        METADATA_FIELD: {relative(name, root): record for name, record in records.items()},
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
    return check_peft_config(config, file)


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


@dataclass
class AdapterFile:
    """An adapter directory, read and checked on its own, before any model is touched.

    ``pairs`` maps each adapted weight's name to ``(A, B)`` as stored (``(r, d_in)`` and
    ``(d_out, r)``; a conv's as kernels: :meth:`update` gives the matrices); ``trainable`` holds
    the trainable modules' tensors under the model's state-dict keys; ``embedding`` names the
    weights keyed as PEFT keys an ``nn.Embedding`` (``lora_embedding_A``).
    """

    path: Path
    config: dict[str, Any]
    pairs: dict[str, tuple[Tensor, Tensor]]
    trainable: dict[str, Tensor]
    extras: dict[str, Any]
    embedding: frozenset[str] = frozenset()
    alphas: dict[str, float] = field(default_factory=dict)
    """``lora_alpha`` of weights read from PEFT's MHA layout (their names are not in the config)."""

    def rank(self, name: str) -> int:
        return int(self.pairs[name][0].shape[0])

    def alpha(self, name: str) -> float:
        """``lora_alpha`` of weight ``name`` (its ``alpha_pattern`` entry, if any)."""
        if name in self.alphas:
            return self.alphas[name]
        return float(pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"]))

    def spec(self, name: str, base: AdapterSpec | None = None) -> AdapterSpec:
        """The hyper-parameters of weight ``name``: rank and alpha from the file, the rest from
        ``base`` (the config the adapter is injected with)."""
        base = base or AdapterSpec(r=self.rank(name), alpha=self.alpha(name))
        use_rslora = bool(self.config.get("use_rslora"))
        return replace(base, r=self.rank(name), alpha=self.alpha(name), use_rslora=use_rslora)

    def scaling(self, name: str) -> float:
        """The factor on ``B A`` of weight ``name`` (:func:`~lightning_lora.config.lora_scale`)."""
        return self.spec(name).scale

    def update(self, name: str) -> Update:
        """``(A (r, d_in), B (d_out, r), scale)`` of weight ``name``: matrices, whatever the layer."""
        A, B = self.pairs[name]
        return A.flatten(1), B.flatten(1), self.scaling(name)

    def delta_weight(self, name: str) -> Tensor:
        """``ΔW = scale · B A`` of shape ``(d_out, d_in)``, in float32."""
        return delta_weight(*self.update(name))

    def delta_norm(self, name: str) -> float:
        """``‖ΔW‖_F`` without forming ΔW: ``‖s·BA‖²_F = s² · Σ (BᵀB) ⊙ (AAᵀ)``, two ``r × r``
        products in float64."""
        A, B, scale = self.update(name)
        A, B = A.double(), B.double()
        return abs(scale) * float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0).sqrt())


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read directory ``path`` and check that its two files agree with each other: every weight
    has an ``A`` and a ``B`` whose ranks match each other and the config."""
    config = read_adapter_config(path)
    tensors, extras = read_adapter_tensors(path)
    file = Path(path) / ADAPTER_WEIGHTS
    saved = extras.get("config")
    if saved is not None:
        differ = [k for k in MATH_KEYS if saved.get(k) != config.get(k, saved.get(k))]
        if differ:
            k = differ[0]
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says {k}={config.get(k)!r} but {file} was saved "
                f"with {k}={saved.get(k)!r}: the two files come from different saves (an interrupted "
                f"save, or files copied from two adapters). Save the adapter again."
            )
    halves: dict[str, dict[str, Tensor]] = {}
    trainable: dict[str, Tensor] = {}
    embedding: set[str] = set()
    for key, tensor in tensors.items():
        parsed = parse_file_key(key)
        if parsed:
            halves.setdefault(parsed.name, {})[f"lora_{parsed.part}"] = tensor
            if parsed.embedding:
                embedding.add(parsed.name)
        elif re.search(r"\.lora_\w+", key):
            raise AdapterFileError(
                f"{file} holds {key!r}, a LoRA tensor of a kind lightning-lora does not implement "
                f"(it loads lora_A/lora_B and lora_embedding_A/lora_embedding_B pairs)."
            )
        else:
            trainable[key.removeprefix(FILE_PREFIX)] = tensor
    if not halves:
        raise AdapterFileError(f"{file} holds no lora_A/lora_B tensors; it is not a LoRA adapter.")
    pairs = {}

    def rank_of(name: str) -> int:
        return int(pattern_value(config.get("rank_pattern") or {}, name, config["r"]))

    def alpha_of(name: str) -> float:
        return float(pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))

    mha = {peft_mha_owner(n) for n in halves} - {None}
    for name, ab in halves.items():
        if set(ab) != {"lora_A", "lora_B"}:
            lacking = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterFileError(
                f"{file} has {name}'s {set(ab).pop()} but not its {lacking}; the file is incomplete."
            )
        A, B = ab["lora_A"], ab["lora_B"]
        if name in mha or peft_mha_owner(name) is not None:
            pairs[name] = (A, B)  # PEFT's MHA layout: checked as a whole by from_peft
            continue
        expected = rank_of(name)
        if A.dim() < 2 or B.dim() != A.dim() or A.shape[0] != expected or B.shape[1] != expected:
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says r={expected} for {name!r}, but {file} has "
                f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} (expected ({expected}, d_in) and "
                f"(d_out, {expected}), or a conv's ({expected}, in, *kernel) and (d_out, {expected}, 1, ...)); "
                f"the files do not belong together."
            )
        if any(n != 1 for n in B.shape[2:]):
            raise AdapterFileError(
                f"{file} has lora_B {tuple(B.shape)} for {name!r}: a conv adapter's B must be a 1×1 kernel "
                f"(PEFT's layout); lightning-lora does not implement other kernels for B."
            )
        pairs[name] = (A, B)
    layouts = extras.get(METADATA_FIELD) if "version" in extras else None  # None: a file PEFT wrote
    pairs, alphas = from_peft(pairs, alpha_of, rank_of, layouts, file, config.get("peft_version"))
    return AdapterFile(Path(path), config, pairs, trainable, extras, frozenset(embedding), alphas)
