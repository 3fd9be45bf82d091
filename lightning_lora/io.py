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
(our ``init``, ``mha_projections``, ``adapter_dtype``, ``freeze_a``, which weights are stored transposed, the
adapter root, the block layout of MHA adapters)
rides in the safetensors metadata, which PEFT ignores, together with a copy of the fields that
set the math, so a pair of files from two different saves is detected.

Saving replaces the directory as a whole (:mod:`lightning_lora.atomic`). Reading, which never
trusts a file, is :mod:`lightning_lora.adapter_file` (:func:`read_adapter` is re-exported here).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter_file import (
    METADATA_KEY,
    AdapterFile,
    read_adapter,
    read_adapter_config,
    read_adapter_files,
    read_adapter_tensors,
)
from .atomic import atomic_write, replace_directory
from .base_init import changes_base
from .errors import AdapterSaveError
from .names import file_key
from .params import adapter_entries
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MATH_KEYS, peft_config_dict, transposed_weights
from .peft_mha import METADATA_FIELD, peft_layout
from .provenance import merge_records
from .roots import rebase, relative, resolve_root, served_name_or_path
from .state import adapted_weights, lora_config

__all__ = [
    "METADATA_KEY",
    "AdapterFile",
    "adapter_tensors",
    "atomic_write",
    "read_adapter",
    "read_adapter_config",
    "read_adapter_files",
    "read_adapter_tensors",
    "save_adapter",
    "write_adapter_files",
]


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
    convert_base_init: bool = True,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's layout.

    ``root``: the submodule that will be served, e.g. ``"model"`` for a LightningModule holding a
    Hugging Face model as ``self.model``; names in the files are then relative to it (what
    ``PeftModel.from_pretrained(hf_model, path)`` expects), and the root is recorded in the
    metadata. ``"auto"`` finds it (:func:`~lightning_lora.roots.default_adapter_root`); ``None``
    writes full names. ``base_model_name_or_path`` defaults to the served model's Hugging Face
    ``config.name_or_path`` when it has one.

    The directory is replaced as a whole (:func:`~lightning_lora.atomic.replace_directory`):
    a reader, a crash at any instant, a full disk or a concurrent save sees the previous pair of
    files or the new pair, never one of each, and a failed save leaves the previous adapter as
    it was. Tensors are copied to CPU (shared storage, e.g. tied weights in a trainable module,
    is copied apart, as safetensors requires). If adapters were merged into the model's weights
    before this one trained, the file says so (``merged_into_base``), and loading it into a
    model without that merge warns.

    An adapter whose init changed ``W`` (``"pissa"``, ``"olora"``: :mod:`lightning_lora.base_init`)
    only fits the residual weights. ``convert_base_init`` (default) writes PEFT's conversion
    instead, a plain LoRA adapter for the *original* base: rank ``2r``, ``A' = [A; A₀]``,
    ``B' = [B, −B₀]``, alpha scaled to keep ``s`` (``path_initial_model_for_weight_conversion``
    in PEFT). ``False`` writes it as trained, ``init_lora_weights`` naming the init: what PEFT
    saves by default, for the residual model saved beside it.
    """
    path = Path(path)
    _check_target(path)
    config = lora_config(model, adapter_name)
    root = resolve_root(model, root)
    base = base_model_name_or_path or served_name_or_path(model, root)
    tensors, peft = adapter_tensors(model, adapter_name), peft_config_dict(model, adapter_name, base)
    init = config.init
    if changes_base(init):
        if convert_base_init:
            tensors, peft, init = converted_to_lora(model, adapter_name, tensors, peft), peft, "zeros_b"
        else:
            peft["init_lora_weights"] = init
    tensors, peft = rebase(tensors, peft, root)
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    records = peft_layout(model, adapter_name).records
    extras = {
        "version": _version(),
        "adapter_name": adapter_name,
        "init": init,
        "mha_projections": config.mha_projections,
        "adapter_dtype": config.adapter_dtype,
        "target_patterns": config.target_modules,
        "trainable_patterns": config.trainable_modules,
        "fan_in_fan_out": [relative(n, root) for n in transposed_weights(model, adapter_name)],
        "config": {k: peft[k] for k in MATH_KEYS},
        "root": root,
        METADATA_FIELD: {relative(name, root): record for name, record in records.items()},
    }
    if init != config.init:
        extras["converted_from"] = config.init
    if config.freeze_a:  # a training choice PEFT has no field for: training resumed from the file keeps it
        extras["freeze_a"] = True
    merged = {name: [r.digest for r in records] for name, records in merge_records(model).items()}
    if merged:
        extras["merged_into_base"] = merged
    return write_adapter_files(path, peft, tensors, extras)


def converted_to_lora(
    model: nn.Module, adapter_name: str, tensors: dict[str, Tensor], peft: dict[str, Any]
) -> dict[str, Tensor]:
    """The tensors (file keys) of a base-changing adapter as PEFT's plain-LoRA conversion
    (``ΔW = s·(B A − B₀ A₀) = s·[B, −B₀][A; A₀]``); ``peft`` is updated in place: ranks doubled,
    alphas scaled so that every scale stays, ``init_lora_weights: true``."""
    out = dict(tensors)
    for t in adapted_weights(model):
        if adapter_name in t.layer.initial:
            A0, B0 = t.layer.initial[adapter_name]
            key_a = file_key(t.name, "A", t.layer.embedding_keys)
            key_b = file_key(t.name, "B", t.layer.embedding_keys)
            out[key_a] = torch.cat([tensors[key_a], A0.to(tensors[key_a])], 0)
            out[key_b] = torch.cat([tensors[key_b], -B0.to(tensors[key_b])], 1)
    factor = math.sqrt(2) if peft.get("use_rslora") else 2.0  # alpha/r or alpha/√r kept at rank 2r
    peft["r"] *= 2
    peft["lora_alpha"] *= factor
    peft["rank_pattern"] = {k: 2 * v for k, v in (peft.get("rank_pattern") or {}).items()}
    peft["alpha_pattern"] = {k: factor * v for k, v in (peft.get("alpha_pattern") or {}).items()}
    peft["init_lora_weights"] = True
    return out


def _check_target(path: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if (path / name).exists() and not (path / name).is_file():
            raise AdapterSaveError(f"cannot save to {str(path)!r}: {str(path / name)!r} is not a file; remove it.")


def write_adapter_files(
    path: str | os.PathLike, peft: dict[str, Any], tensors: dict[str, Tensor], extras: dict
) -> Path:
    """Write ``adapter_config.json`` (``peft``) and ``adapter_model.safetensors`` (``tensors`` on
    the CPU, our ``extras`` in its metadata) as one new version of directory ``path``, replaced
    as a whole (:func:`~lightning_lora.atomic.replace_directory`)."""
    path = Path(path)
    _check_target(path)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(extras)}
    text = json.dumps(peft, indent=2, sort_keys=True) + "\n"

    def fill(directory: Path) -> None:
        try:
            save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata=metadata)
        except SafetensorError as err:  # an I/O error inside safetensors: say it as Python does
            code = re.search(r"os error (\d+)", str(err))
            raise OSError(int(code[1]) if code else errno.EIO, str(err), str(directory / ADAPTER_WEIGHTS)) from None
        (directory / ADAPTER_CONFIG).write_text(text)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # safetensors makes 0600 files
            os.chmod(directory / name, 0o666 & ~_umask())

    return replace_directory(path, fill, managed=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _version() -> str:
    from . import __version__

    return __version__
