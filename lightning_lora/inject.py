"""Putting LoRA into a model and taking it out again: plain functions over any ``nn.Module``.

``inject_lora`` gives each module ``config`` selects an adapter (a
:class:`~lightning_lora.layers.LoRALinear` in place of an ``nn.Linear``, a weight
parametrization where the owner reads the weight directly) and freezes every other parameter.
``unload_lora`` gives the original module types back, so the state dict has the original keys.
Nothing here changes weights unless called: there is no merge hidden in ``train()`` / ``eval()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import adapter_names, check_adapter_name, set_adapter
from .config import LoRAConfig
from .errors import LoRAStateError
from .merge import merge_plan, merge_quantized, refuse_nonfinite, refuse_tied, unmerge_lora
from .params import mark_only_lora_as_trainable
from .provenance import record_merge
from .quantized import is_packed
from .shared_inputs import group_siblings
from .sharing import module_places, refuse_shared_targets
from .state import STATE_ATTR, LoRAState, adapted_weights, lora_state, require_adapted
from .surgery import adapt, strip_lora, target_tensors
from .targets import find_targets


def inject_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    *,
    adapter_name: str = "default",
    **config_fields: Any,
) -> list[str]:
    """Add a LoRA adapter to the modules ``config`` selects; freeze everything else.

    Trainable afterwards: the new adapter's ``A``/``B`` and the ``trainable_modules``. The new
    adapter becomes the only active one. Returns the adapted weights' names (a Linear by its
    module name; ``...self_attn.in_proj_weight[q]`` for a block of a fused projection).

    Raises :class:`LoRATargetError` for patterns that match nothing or unsupported layers, and
    for a weight another module shares (a tied ``lm_head``: a merge would move both);
    :class:`LoRAStateError` if ``adapter_name`` is already injected. Nothing changes when it raises.
    """
    check_adapter_name(adapter_name)
    config = LoRAConfig.build(config, **config_fields)
    targets = find_targets(model, config)
    already = [t.name for t in adapted_weights(model) if adapter_name in t.layer.lora_A]
    if already:
        raise LoRAStateError(
            f"adapter {adapter_name!r} is already injected into {len(set(already))} module(s) "
            f"(e.g. {already[0]!r}). Call unload_lora(model) first, or give the new adapter "
            f"another name: inject_lora(model, config, adapter_name='second')."
        )
    refuse_shared_targets(model, [t for target in targets for t in target_tensors(target, config)])
    state = lora_state(model)
    if state is None:
        state = LoRAState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
    places = module_places(model)
    for target in targets:
        adapt(target, config, adapter_name, state, places)
    state.configs[adapter_name] = config
    set_adapter(model, adapter_name)
    mark_only_lora_as_trainable(model, adapter_name, config.trainable_modules)
    group_siblings(model)
    return [t.name for t in adapted_weights(model) if adapter_name in t.layer.lora_A]


def unload_lora(model: nn.Module, merge: bool = True, requantize: bool = False) -> nn.Module:
    """Remove LoRA: with ``merge`` the active adapters stay in ``W`` (a plain, fast model);
    without, ``W`` is restored and every adapter discarded. The original module types,
    state-dict keys (in their order) and ``requires_grad`` flags come back.

    A quantized base (bitsandbytes 4/8-bit) cannot hold ``ΔW`` in its packed weight: merging
    gives a dense ``nn.Linear`` in its compute dtype instead, or with ``requantize`` the same
    quantized type holding ``Q(W + ΔW)`` (:func:`~lightning_lora.merge.merge_quantized`)."""
    targets = require_adapted(model, "unload")
    refuse_residual_left(targets, merge)
    if merge:
        dense = [t for t in targets if not is_packed(t.weight)]
        pending = [n for n in adapter_names(model) if any(n in t.layer.unmerged_active() for t in dense)]
        plan = merge_plan(dense, pending) if pending else []
        refuse_tied(model, plan)  # before anything changes: all or nothing
        refuse_nonfinite(plan)
        merge_quantized(model, requantize)
        for target, names in plan:
            record_merge(model, target, names)
            target.layer.merge(target.weight, names)
    elif any(t.layer.merged_adapters for t in targets):
        unmerge_lora(model)
    strip_lora(model)
    return model


def refuse_residual_left(targets: list, merge: bool) -> None:
    """Refuse an unload that would drop an adapter whose init moved W's principal part into it
    (PiSSA, OLoRA): the model would silently keep the residual weight, not the pretrained one.
    Unloading with ``merge`` keeps it when it is active (and merged or about to be)."""
    for t in targets:
        for name in t.layer.initial:
            kept = merge and (name in t.layer.merged_adapters or name in t.layer.unmerged_active())
            if not kept:
                raise LoRAStateError(
                    f"unload_lora(merge={merge}) would drop adapter {name!r} of {t.name!r}, initialised with "
                    f"init={t.layer.specs[name].init!r}: W there is the residual W − s·B₀A₀, not the pretrained "
                    f"weight. Activate it and unload with merge=True, or save it first (the saved file converts it to "
                    f"plain LoRA for the original base) and rebuild the base model."
                )
