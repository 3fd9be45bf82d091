"""Many adapters on one frozen base: name, switch, combine, delete, disable.

One base model holds any number of named adapters (``lora_A[name]``, ``lora_B[name]`` in every
adapted layer); ``set_adapter`` chooses which ones the forward pass adds. Nothing here copies the
base: a new adapter costs ``r · (d_in + d_out)`` numbers per adapted weight.

* :func:`~lightning_lora.load.load_adapter` adds an adapter from a directory (ours or PEFT's).
* :func:`combine_adapters` adds an adapter whose update is ``Σ wᵢ ΔWᵢ``, exactly.
* :func:`delete_adapter` removes one; :func:`disable_adapters` runs the base model for a while.

A new adapter (injected, loaded or combined) becomes the only active and only trainable one,
so what was just added is what runs and trains; ``set_adapter`` switches back. Trainable modules
(a classification head) are part of the model, shared by all adapters.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import ADAPTER_DTYPES, AdapterSpec, LoRAConfig
from .errors import LoRAConfigError, LoRAStateError
from .params import mark_only_lora_as_trainable
from .state import adapted_weights, lora_config, lora_state
from .surgery import remove_empty_layers, strip_lora
from .targets import target_fields

# ------------------------------------------------------------------------------------ names


def check_adapter_name(name: Any) -> None:
    """An adapter name becomes a key of ``nn.ParameterDict`` and part of state-dict keys: it
    must be a non-empty string without dots that is not an attribute of ``nn.ParameterDict``."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ParameterDict, name):
        why = (
            "it is an attribute of nn.ParameterDict, which holds the adapters"
            if isinstance(name, str) and name and "." not in name
            else "adapter names are non-empty strings without dots (they become state-dict keys)"
        )
        raise LoRAStateError(f"adapter_name={name!r} cannot be used: {why}. Choose another, e.g. 'task_a'.")


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in order of first appearance."""
    names: list[str] = []
    for target in adapted_weights(model):
        names.extend(n for n in target.layer.adapter_names if n not in names)
    return names


def set_adapter(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make ``names`` the active adapter(s) of every layer that has them (the others go
    inactive). Several names add their updates. No weights are loaded or changed."""
    names = [names] if isinstance(names, str) else list(names)
    present = adapter_names(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise LoRAStateError(f"no adapter named {missing} in the model; adapters: {present}")
    targets = list(adapted_weights(model))
    for target in targets:  # every layer agrees before any changes (DoRA adapters run alone)
        target.layer.check_active([n for n in names if n in target.layer.lora_A])
    for target in targets:
        target.layer.set_active([n for n in names if n in target.layer.lora_A])


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward pass adds (merged ones included: they are in ``W``)."""
    names: list[str] = []
    for t in adapted_weights(model):
        names.extend(n for n in t.layer.active_adapters if n not in names)
    return names


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer. A module left without adapters gets its
    original type back; deleting the last adapter unloads LoRA altogether
    (``unload_lora(model, merge=False)``), ``requires_grad`` flags included.

    Refused while the adapter is merged: its ``ΔW`` would stay in ``W`` with nothing left to
    unmerge it.
    """
    present = adapter_names(model)
    if adapter_name not in present:
        raise LoRAStateError(f"no adapter named {adapter_name!r} to delete; adapters: {present}")
    merged = [t.name for t in adapted_weights(model) if adapter_name in t.layer.merged_adapters]
    if merged:
        raise LoRAStateError(
            f"adapter {adapter_name!r} is merged into {merged[0]!r} ({len(merged)} weight(s)); deleting it "
            f"would leave its ΔW in W for good. Call unmerge_lora(model) first, or unload_lora(model, "
            f"merge=True) to keep it in the weights."
        )
    moved = [t for t in adapted_weights(model) if adapter_name in t.layer.initial]
    if moved:
        moved[0].layer.delete_adapter(adapter_name)  # refuses, naming the init and the way out
    if present == [adapter_name]:
        strip_lora(model)  # nothing is merged (checked above): the base weights are untouched
        return
    for t in adapted_weights(model):
        if adapter_name in t.layer.lora_A:
            t.layer.delete_adapter(adapter_name)
    remove_empty_layers(model)
    state = lora_state(model)
    if state is not None:
        state.configs.pop(adapter_name, None)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the ``with`` block: every LoRA layer adds nothing; on exit the
    previous state comes back, also after an exception. Weights are never touched.

    Refused while an adapter is merged: its ``ΔW`` is inside ``W``, so switching the layers off
    would not give the base model, and taking it out (unmerge) then putting it back (merge)
    would change ``W`` by a rounding in low precision behind the caller's back.
    """
    targets = list(adapted_weights(model))
    if not targets:
        raise LoRAStateError("cannot disable adapters: the model has no LoRA layers (it already is the base model).")
    merged = sorted({n for t in targets for n in t.layer.merged_adapters})
    if merged:
        raise LoRAStateError(
            f"cannot disable adapters while {merged} are merged into the base weights: the LoRA layers "
            f"can be switched off, but ΔW would stay inside W. Call unmerge_lora(model) first "
            f"(disable_adapters never changes weights)."
        )
    before = [t.layer.adapters_disabled for t in targets]
    for t in targets:
        t.layer.adapters_disabled = True
    try:
        yield
    finally:
        for t, flag in zip(targets, before, strict=True):
            t.layer.adapters_disabled = flag


# ----------------------------------------------------------------------------------- combine


def combine_adapters(model: nn.Module, weights: Mapping[str, float], adapter_name: str) -> list[str]:
    """Add adapter ``adapter_name`` whose update is exactly ``Σ wᵢ ΔWᵢ`` over ``weights``
    (``{"a": 0.7, "b": 0.3}``; any real weights, negative ones subtract a task).

    Concatenated ranks, per adapted weight, with ``Aᵢ (rᵢ × d_in)``, ``Bᵢ (d_out × rᵢ)``,
    scale ``sᵢ``::

        A = [A₁; A₂; …]              (Σrᵢ × d_in)
        B = [w₁s₁B₁, w₂s₂B₂, …]      (d_out × Σrᵢ),   scale 1
        B A = Σ wᵢ sᵢ Bᵢ Aᵢ = Σ wᵢ ΔWᵢ

    No SVD, no truncation: the rank is ``Σrᵢ``. Ranks, scales and adapter dtypes may differ
    (the result takes their promoted dtype; ``wᵢsᵢBᵢ`` is formed in float32). A weight only some
    adapters adapt gets the sum of those. The new adapter has no dropout (it is exact at
    inference), is recorded with a config so :func:`~lightning_lora.io.save_adapter` writes it,
    and becomes the only active one. Returns the adapted weights' names.
    """
    check_adapter_name(adapter_name)
    present = adapter_names(model)
    if not weights:
        raise LoRAConfigError("combine_adapters needs at least one adapter and its weight, e.g. {'a': 0.7, 'b': 0.3}.")
    unknown = [n for n in weights if n not in present]
    if unknown:
        raise LoRAStateError(f"cannot combine {unknown}: no such adapter in the model; adapters: {present}")
    bad = {
        n: w
        for n, w in weights.items()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
    }
    if bad:
        raise LoRAConfigError(f"combine_adapters weights must be finite numbers, got {bad}.")
    if adapter_name in present:
        raise LoRAStateError(
            f"the model already has an adapter named {adapter_name!r}; give the combination a new name "
            f"or delete_adapter(model, {adapter_name!r}) first."
        )
    targets = [t for t in adapted_weights(model) if any(n in t.layer.lora_A for n in weights)]
    dora = next((n for t in targets for n in weights if n in t.layer.lora_magnitude_vector), None)
    if dora is not None:
        raise LoRAStateError(
            f"cannot combine adapter {dora!r}: it is a DoRA adapter, whose update rescales the rows of W + ΔW, so it "
            f"is not a sum of low-rank ΔW that concatenated ranks could hold. Combine plain LoRA adapters only."
        )
    moved = next((n for t in targets for n in weights if n in t.layer.initial), None)
    if moved is not None:
        raise LoRAStateError(
            f"cannot combine adapter {moved!r}: its init ({targets[0].layer.specs[moved].init!r}) moved part of W into "
            f"it, so its B A is not a change of the model. Combine plain LoRA adapters only."
        )
    ranks: dict[str, int] = {}
    dtypes: set[torch.dtype] = set()
    follows_base = True
    for t in targets:
        layer = t.layer
        names = [n for n in weights if n in layer.lora_A]
        dtype = functools.reduce(torch.promote_types, (layer.lora_A[n].dtype for n in names))
        A = torch.cat([layer.lora_A[n].detach().to(dtype) for n in names])
        B = torch.cat(
            [(layer.lora_B[n].detach().float() * (weights[n] * layer.specs[n].scale)).to(dtype) for n in names], 1
        )
        rank = A.shape[0]
        layer.add_adapter(adapter_name, AdapterSpec(r=rank, alpha=float(rank)), dtype, A.device)  # scale 1
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(A)
            layer.lora_B[adapter_name].copy_(B)
        ranks[t.name] = A.shape[0]
        dtypes.add(dtype)
        follows_base = follows_base and dtype == t.weight.dtype
    r = Counter(ranks.values()).most_common(1)[0][0]
    dtype_name = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    trainable = []
    for n in weights:
        trainable.extend(m for m in lora_config(model, n).trainable_modules if m not in trainable)
    config = LoRAConfig(
        r=r,
        alpha=float(r),  # scale alpha / r = 1: the weights and scales live in B
        trainable_modules=trainable,
        adapter_dtype=None if follows_base or dtype_name not in ADAPTER_DTYPES else dtype_name,
        **target_fields(model, list(ranks)),
    )
    state = lora_state(model)
    assert state is not None
    state.configs[adapter_name] = config
    set_adapter(model, adapter_name)  # new adapters are the only active and trainable ones
    mark_only_lora_as_trainable(model, adapter_name, config.trainable_modules)
    return list(ranks)
