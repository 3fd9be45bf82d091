"""Moving ``ΔW`` into ``W`` and out again, explicitly: no merge hides in ``train()``/``eval()``.

``merge_lora`` computes ``W + Σ ΔW`` in float32 (:func:`~lightning_lora.layers.merged_block`),
checks every result for NaN/Inf before it writes any weight, and casts once; ``unmerge_lora``
subtracts again (exact in fp32; in bf16 within a rounding of ``|W| + |ΔW|``, see the README).
Every merge is noted on the module owning the weight (:mod:`~lightning_lora.provenance`), where
it outlives the LoRA layers, so the model knows which adapters its weights hold.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .errors import LoRAStateError
from .layers import first_nonfinite
from .provenance import forget_merge, record_merge
from .state import AdaptedWeight, require_adapted


def merge_lora(model: nn.Module, adapter_names: str | Iterable[str] | None = None, safe: bool = True) -> None:
    """``W ← W + ΔW`` for the active adapters (or ``adapter_names``), computed in float32 and
    cast once to ``W``'s dtype. With ``safe``, every result is checked for NaN/Inf before any
    weight is written, so a poisoned adapter leaves the whole model untouched."""
    plan = _merge_plan(require_adapted(model, "merge"), adapter_names)
    if safe:
        bad = first_nonfinite(t.layer.merged_region(t.weight, names).to(t.weight.dtype) for t, names in plan)
        if bad is not None:
            target, names = plan[bad]
            raise LoRAStateError(
                f"merging adapter(s) {names} into {target.name!r} gives NaN or Inf in "
                f"{target.weight.dtype}; no weight was changed. Check the adapter's "
                f"tensors (lightning-lora inspect) or train with a lower learning rate."
            )
    for target, names in plan:
        record_merge(model, target, names)
        target.layer.merge(target.weight, names)


def _merge_plan(
    targets: list[AdaptedWeight], adapter_names: str | Iterable[str] | None
) -> list[tuple[AdaptedWeight, list[str]]]:
    """Which adapters to merge into which weight; refuses one that is merged already."""
    wanted = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    plan = []
    for target in targets:
        layer = target.layer
        names = layer.active_adapters if wanted is None else [n for n in wanted if n in layer.lora_A]
        done = [n for n in names if n in layer.merged_adapters]
        if done:
            raise LoRAStateError(
                f"adapter {done[0]!r} is already merged into {target.name!r}; merging twice would "
                f"add ΔW twice. Call unmerge_lora(model) first."
            )
        if names:
            plan.append((target, list(names)))
    if not plan:
        raise LoRAStateError("nothing to merge: no active adapter (see set_adapter).")
    return plan


def unmerge_lora(model: nn.Module) -> None:
    """``W ← W − ΔW`` for every merged adapter (exact in fp32; in bf16 within a rounding of
    ``|W| + |ΔW|``, see the README)."""
    targets = require_adapted(model, "unmerge")
    if not any(t.layer.merged_adapters for t in targets):
        raise LoRAStateError("nothing to unmerge: no adapter is merged (see merge_lora).")
    for target in targets:
        forget_merge(model, target, target.layer.unmerge(target.weight))
