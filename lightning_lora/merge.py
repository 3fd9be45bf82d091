"""Moving ``ΔW`` into ``W`` and out again, explicitly: no merge hides in ``train()``/``eval()``.

``merge_lora`` computes ``W + Σ ΔW`` in float32 (:func:`~lightning_lora.layers.merged_block`),
checks every result for NaN/Inf before it writes any weight, and casts once; ``unmerge_lora``
subtracts again (exact in fp32; in bf16 within a rounding of ``|W| + |ΔW|``, see the README).
Every merge is noted on the module owning the weight (:mod:`~lightning_lora.provenance`), where
it outlives the LoRA layers, so the model knows which adapters its weights hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from . import quantized
from .delta import first_nonfinite, merged_block
from .errors import LoRAStateError
from .layers import LoRALinear, LoRAWrapper
from .provenance import MERGED_ATTR, forget_merge, record_merge
from .sharing import other_holders, tensor_holders
from .state import AdaptedWeight, adapted_weights, require_adapted


def merge_lora(model: nn.Module, adapter_names: str | Iterable[str] | None = None, safe: bool = True) -> None:
    """``W ← W + ΔW`` for the active adapters (or ``adapter_names``), computed in float32 and
    cast once to ``W``'s dtype. With ``safe``, every result is checked for NaN/Inf before any
    weight is written, so a poisoned adapter leaves the whole model untouched. A weight tied to
    another module (one tensor under two names) is refused before anything is written."""
    plan = merge_plan(require_adapted(model, "merge"), adapter_names)
    refuse_tied(model, plan)
    if safe:
        refuse_nonfinite(plan)
    for target, names in plan:
        record_merge(model, target, names)
        target.layer.merge(target.weight, names)


MergePlan = list[tuple[AdaptedWeight, list[str]]]


def refuse_nonfinite(plan: MergePlan) -> None:
    """Raise, naming the weight, if any merge of ``plan`` would give NaN or Inf in ``W``'s dtype;
    one synchronisation for all of them. Nothing is written."""
    bad = first_nonfinite(t.layer.merged_region(t.weight, names).to(t.weight.dtype) for t, names in plan)
    if bad is not None:
        target, names = plan[bad]
        raise LoRAStateError(
            f"merging adapter(s) {names} into {target.name!r} gives NaN or Inf in "
            f"{target.weight.dtype}; no weight was changed. Check the adapter's "
            f"tensors (lightning-lora inspect) or train with a lower learning rate."
        )


def merge_plan(targets: list[AdaptedWeight], adapter_names: str | Iterable[str] | None) -> MergePlan:
    """Which adapters to merge into which weight; refuses one that is merged already."""
    wanted = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    plan = []
    for target in targets:
        layer = target.layer
        names = layer.active_adapters if wanted is None else [n for n in wanted if n in layer.lora_A]
        if names and quantized.is_packed(target.weight):
            raise LoRAStateError(
                f"cannot merge into {target.name!r}: its base weight is quantized ({target.weight.dtype}, "
                f"packed), and writing ΔW into it would corrupt it. unload_lora(model, merge=True) replaces "
                f"each quantized layer by a dense one holding W + ΔW in its compute dtype (or requantizes "
                f"it with requantize=True); or keep the adapter separate."
            )
        done = [n for n in names if n in layer.merged_adapters]
        if done:
            raise LoRAStateError(
                f"adapter {done[0]!r} is already merged into {target.name!r}; merging twice would "
                f"add ΔW twice. Call unmerge_lora(model) first."
            )
        dora = [n for n in names if layer.specs[n].use_dora]
        if dora and len(names) > 1:
            raise LoRAStateError(
                f"cannot merge DoRA adapter {dora[0]!r} into {target.name!r} together with "
                f"{[n for n in names if n != dora[0]]}: a DoRA merge rescales the rows of W + ΔW, so it goes into a "
                f"weight alone. Merge one adapter at a time (merge_lora(model, {dora[0]!r}))."
            )
        if names:
            plan.append((target, list(names)))
    if not plan:
        raise LoRAStateError("nothing to merge: no active adapter (see set_adapter).")
    return plan


def refuse_tied(model: nn.Module, plan: list[tuple[AdaptedWeight, list[str]]]) -> None:
    """Refuse to merge into a weight that other modules share (tied input and output
    embeddings): ``W + ΔW`` would reach them too, though the adapter only adds to one of them,
    so the merged model would compute something the trained one never did. Injection refuses
    such targets already (:mod:`~lightning_lora.sharing`); this catches weights tied after it.
    One module registered under two names is not tied: it is one module with one adapter."""
    holders = tensor_holders(model)
    for target, _ in plan:
        others = other_holders(holders, target.weight, _owner(model, target))
        if others:
            raise LoRAStateError(
                f"cannot merge into {target.name!r}: its weight is one tensor with {others} (tied weights), so ΔW "
                f"would change {others[0]!r} as well, which the adapter does not update; no weight was changed. "
                f"Keep the adapter unmerged (unload_lora(model, merge=False), or LoRACallback(merge_on_fit_end="
                f"False)), or untie the weights before injecting (e.g. tie_word_embeddings=False)."
            )


def _owner(model: nn.Module, target: AdaptedWeight) -> nn.Module:
    """The module whose tensor ``target.weight`` is, as :mod:`~lightning_lora.sharing` names owners:
    a wrapper for its base layer's weight, the parametrized module for a parametrization's."""
    if isinstance(target.layer, LoRAWrapper):
        return target.layer
    return model.get_submodule(f".{target.path}".split(".parametrizations.")[0].lstrip("."))


def unmerge_lora(model: nn.Module) -> None:
    """``W ← W − ΔW`` for every merged adapter (exact in fp32; in bf16 within a rounding of
    ``|W| + |ΔW|``, see the README)."""
    targets = require_adapted(model, "unmerge")
    if not any(t.layer.merged_adapters for t in targets):
        raise LoRAStateError("nothing to unmerge: no adapter is merged (see merge_lora).")
    for target in targets:
        forget_merge(model, target, target.layer.unmerge(target.weight))


def merge_quantized(model: nn.Module, requantize: bool = False) -> list[quantized.RequantizationError]:
    """Merge the active adapters of every LoRA layer over a quantized base and put a plain layer
    in its place: a dense ``nn.Linear`` in the base's compute dtype holding ``W + ΔW`` (``W``
    dequantized, the sum formed in float32, cast once), or with ``requantize`` the base's own
    quantized type holding ``Q(W + ΔW)``; returns the error each requantization added (empty
    without ``requantize``). All or nothing: every result is checked for NaN/Inf before any
    layer is replaced. Layers over dense weights are left to :func:`merge_lora`."""
    targets = [
        t
        for t in adapted_weights(model)
        if isinstance(t.layer, LoRALinear) and quantized.is_quantized(t.layer.base_layer)
    ]

    def merged(t: AdaptedWeight):
        base = t.layer.base_layer
        updates = [t.layer.update(n) for n in t.layer.unmerged_active()]
        return merged_block(quantized.dequantized(base), updates).to(quantized.compute_dtype(base))

    bad = first_nonfinite(merged(t) for t in targets)
    if bad is not None:
        raise LoRAStateError(
            f"merging into the quantized weight of {targets[bad].name!r} gives NaN or Inf in "
            f"{quantized.compute_dtype(targets[bad].layer.base_layer)}; no layer was changed."
        )
    errors = []
    for t in targets:
        base, weight = t.layer.base_layer, merged(t)
        if requantize:
            plain, error = quantized.requantized(base, weight, t.name)
            errors.append(error)
        else:
            plain = quantized.dense_linear(base, weight)
        record_merge(model, t, t.layer.unmerged_active())  # on the quantized base: moved to its successor
        plain.__dict__[MERGED_ATTR] = base.__dict__.pop(MERGED_ATTR)
        parent, _, child = t.path.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    if errors:
        worst = max(errors, key=lambda e: e.relative)
        warnings.warn(
            f"requantized {len(errors)} merged layer(s); the largest error is in {worst.name!r}: "
            f"‖Q(W+ΔW) − (W+ΔW)‖/‖W+ΔW‖ = {worst.relative:.3g} (max abs {worst.max_abs:.3g}).",
            stacklevel=2,
        )
    return errors
