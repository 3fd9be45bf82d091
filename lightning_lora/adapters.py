"""Many adapters on one frozen base: load them side by side, switch, combine, delete, disable.

One base model holds any number of named adapters (``lora_A[name]``, ``lora_B[name]`` in every
adapted layer); ``set_adapter`` chooses which ones the forward pass adds. Nothing here copies the
base: a new adapter costs ``r · (d_in + d_out)`` numbers per adapted weight.

* :func:`load_adapter` adds an adapter from a directory (ours or PEFT's).
* :func:`combine_adapters` adds an adapter whose update is ``Σ wᵢ ΔWᵢ``, exactly.
* :func:`delete_adapter` removes one; :func:`disable_adapters` runs the base model for a while.

A new adapter (injected, loaded or combined) becomes the only active and only trainable one,
so what was just added is what runs and trains; ``set_adapter`` switches back. Trainable modules
(a classification head) are part of the model, shared by all adapters.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .config import ADAPTER_DTYPES, LoRAConfig
from .errors import AdapterFileError, LoRAConfigError, LoRAError, LoRAStateError
from .inject import (
    adapter_names,
    check_adapter_name,
    has_lora,
    inject_lora,
    lora_config,
    lora_layers,
    lora_state,
    mark_only_lora_as_trainable,
    remove_empty_layers,
    set_adapter,
    unload_lora,
)
from .io import ADAPTER_CONFIG, AdapterFile, read_adapter
from .targets import target_fields

# ------------------------------------------------------------------------------------- load


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> list[str]:
    """Inject adapter ``adapter_name`` into ``model`` and fill it from directory ``path``.

    The adapted weights are exactly the ones the file has tensors for, so PEFT's and our target
    dialects need not agree. As with :func:`~lightning_lora.inject.inject_lora`, the loaded
    adapter becomes the only active (and only trainable) one; switch with ``set_adapter``.
    The file's trainable-module tensors are written into the model's modules, which every
    adapter shares (a warning says so when that changes another adapter's head).

    Every tensor must fit: a shape mismatch names the weight and both shapes, a module the
    model lacks is named. On any error the model is left exactly as it was.
    Returns the adapted weights' names.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise LoRAStateError(
            f"the model already has an adapter named {adapter_name!r}; load this one under another "
            f"name (load_adapter(model, path, adapter_name='second')) or delete_adapter(model, {adapter_name!r}) first."
        )
    file = read_adapter(path)
    had_lora = has_lora(model)
    active = {t.path: list(t.layer.active_adapters) for t in lora_layers(model)}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        config = _config_for(model, file)
        names = inject_lora(model, config, adapter_name=adapter_name)
        _fill(model, adapter_name, file)
        _load_trainable(model, adapter_name, file, warn_shared=had_lora)
    except Exception as err:
        _roll_back(model, adapter_name, had_lora, active, flags)
        if isinstance(err, LoRAError) and not isinstance(err, AdapterFileError):
            raise AdapterFileError(f"adapter {str(path)!r} does not fit this model: {err}") from None
        raise
    return names


def _config_for(model: nn.Module, file: AdapterFile) -> LoRAConfig:
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
            adapter_dtype=dtype,
        )
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{file.path / ADAPTER_CONFIG}: {err}") from None


def _fill(model: nn.Module, adapter_name: str, file: AdapterFile) -> None:
    """Copy the file's A/B into the freshly injected adapter, checking every shape first."""
    layers = {t.name: t for t in lora_layers(model) if adapter_name in t.layer.lora_A}
    missing = sorted(set(layers) - set(file.pairs))
    extra = sorted(set(file.pairs) - set(layers))
    if missing or extra:
        what = f"lacks weights for {missing[:3]}" if missing else f"has weights for {extra[:3]}, not adapted here"
        raise AdapterFileError(f"adapter {str(file.path)!r} {what} (its target_modules select other modules).")
    for name, target in layers.items():
        A, B = file.pairs[name]
        layer, r = target.layer, file.rank(name)
        if tuple(A.shape) != (r, layer.d_in) or tuple(B.shape) != (layer.d_out, r):
            raise AdapterFileError(
                f"adapter {str(file.path)!r} does not fit {name!r}: the file has lora_A "
                f"{tuple(A.shape)} and lora_B {tuple(B.shape)}, this model's {layer.d_out}×{layer.d_in} "
                f"weight needs ({r}, {layer.d_in}) and ({layer.d_out}, {r}). Was it trained on another base model?"
            )
    for name, target in layers.items():
        layer, r = target.layer, file.rank(name)
        if r != layer.r[adapter_name]:  # a rank_pattern entry: re-create at the file's rank
            A0, dropout = layer.lora_A[adapter_name], layer.dropout[adapter_name]
            active = layer.active_adapters
            layer.delete_adapter(adapter_name)
            layer.add_adapter(adapter_name, r, 1.0, dropout, "zeros_b", A0.dtype, A0.device)
            layer.set_active(active)
        layer.scaling[adapter_name] = file.scaling(name)
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(file.pairs[name][0])
            layer.lora_B[adapter_name].copy_(file.pairs[name][1])


def _load_trainable(model: nn.Module, adapter_name: str, file: AdapterFile, warn_shared: bool) -> None:
    if not file.trainable:
        return
    own = model.state_dict()
    unknown = sorted(k for k in file.trainable if k not in own)
    if unknown:
        raise AdapterFileError(
            f"adapter {str(file.path)!r} has trainable-module tensors {unknown[:3]} this model lacks."
        )
    for key, tensor in file.trainable.items():
        if own[key].shape != tensor.shape:
            raise AdapterFileError(
                f"adapter {str(file.path)!r}: {key!r} has shape {tuple(tensor.shape)} in the file "
                f"and {tuple(own[key].shape)} in the model."
            )
    others = [n for n in adapter_names(model) if n != adapter_name]
    if (
        warn_shared
        and others
        and any(not torch.equal(own[k].cpu(), v.to(own[k].dtype)) for k, v in file.trainable.items())
    ):
        modules = sorted({k.rsplit(".", 1)[0] for k in file.trainable})
        warnings.warn(
            f"adapter {adapter_name!r} replaces the weights of {modules}, which adapters {others} use too: "
            f"trainable modules are part of the model, not of one adapter, so set_adapter({others[0]!r}) "
            f"will run adapter {others[0]!r} with the {modules[0]} of adapter {adapter_name!r}.",
            stacklevel=3,
        )
    model.load_state_dict(dict(file.trainable), strict=False)


def _roll_back(
    model: nn.Module, adapter_name: str, had_lora: bool, active: dict[str, list[str]], flags: dict[int, bool]
) -> None:
    """Undo a partial load: remove what was injected, restore active adapters and flags."""
    if not had_lora:
        if has_lora(model):
            unload_lora(model, merge=False)
        return
    if adapter_name in adapter_names(model):
        delete_adapter(model, adapter_name)
    state = lora_state(model)
    if state is not None:
        state.configs.pop(adapter_name, None)
    for t in lora_layers(model):
        t.layer.set_active(active.get(t.path, []))
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), p.requires_grad))


# ---------------------------------------------------------------------- switch / delete / off


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward pass adds (merged ones included: they are in ``W``)."""
    names: list[str] = []
    for t in lora_layers(model):
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
    merged = [t.name for t in lora_layers(model) if adapter_name in t.layer.merged_adapters]
    if merged:
        raise LoRAStateError(
            f"adapter {adapter_name!r} is merged into {merged[0]!r} ({len(merged)} weight(s)); deleting it "
            f"would leave its ΔW in W for good. Call unmerge_lora(model) first, or unload_lora(model, "
            f"merge=True) to keep it in the weights."
        )
    if present == [adapter_name]:
        unload_lora(model, merge=False)
        return
    for t in lora_layers(model):
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
    targets = list(lora_layers(model))
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
    targets = [t for t in lora_layers(model) if any(n in t.layer.lora_A for n in weights)]
    ranks: dict[str, int] = {}
    dtypes: set[torch.dtype] = set()
    follows_base = True
    for t in targets:
        layer = t.layer
        names = [n for n in weights if n in layer.lora_A]
        dtype = functools.reduce(torch.promote_types, (layer.lora_A[n].dtype for n in names))
        A = torch.cat([layer.lora_A[n].detach().to(dtype) for n in names])
        B = torch.cat(
            [(layer.lora_B[n].detach().float() * (weights[n] * layer.scaling[n])).to(dtype) for n in names], 1
        )
        layer.add_adapter(adapter_name, A.shape[0], 1.0, 0.0, "zeros_b", dtype, A.device)
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
