"""Restoring a LoRA checkpoint through Lightning: what must happen before the weights load.

A Lightning checkpoint written with :class:`~lightning_lora.LoRACallback` holds the LoRA
tensors (by default only them and the trainable modules: an *adapter-only* checkpoint) and a
record under :data:`~lightning_lora.names.CHECKPOINT_KEY`: whether it is adapter-only, its keys,
adapter names, config, and a fingerprint of the base weights it was trained on
(:func:`~lightning_lora.provenance.base_fingerprint`). Restoring it needs, before
``load_state_dict``: LoRA layers to load into (a model built fresh has none), and the assurance
that the model's weights are that base — not weights that already hold this ``ΔW`` (a model
merged at fit end, or its merged state dict loaded into a new object), which would compute
``W + 2ΔW``. After the load, every LoRA tensor must have arrived.

Lightning (checked against 2.6.6) runs no callback hook between ``configure_model`` and the
model's ``load_state_dict``, and calls module hooks through ``getattr(pl_module, name)``, so
:func:`chain_module_hook` puts a step in front of the module's own ``on_load_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from .adapters import adapter_names
from .config import LoRAConfig
from .errors import LoRAStateError
from .names import CHECKPOINT_KEY
from .params import lora_state_dict
from .provenance import base_fingerprint, check_base, merge_records

_HOOKS = ("configure_model", "on_load_checkpoint")


def chain_module_hook(
    pl_module: pl.LightningModule, name: str, extra: Callable[..., None], first: bool = False
) -> None:
    """Run ``extra`` with the arguments of the module's hook ``name`` right after (``first``:
    before) it, until :func:`release_module_hooks`. An instance attribute shadows the method."""
    own = getattr(pl_module, name)

    def chained(*args: Any) -> None:
        if first:
            extra(*args)
        own(*args)
        if not first:
            extra(*args)

    pl_module.__dict__[name] = chained  # bypasses nn.Module.__setattr__: a plain attribute


def release_module_hooks(pl_module: pl.LightningModule) -> None:
    """Give the module its own hooks back."""
    for name in _HOOKS:
        pl_module.__dict__.pop(name, None)


def is_lora_checkpoint(checkpoint: dict[str, Any]) -> bool:
    return any(".lora_A." in key or ".lora_embedding_A." in key for key in checkpoint.get("state_dict", {}))


def is_adapter_only(checkpoint: dict[str, Any]) -> bool:
    return bool((checkpoint.get(CHECKPOINT_KEY) or {}).get("adapter_only"))


def refuse_merged(pl_module: nn.Module) -> None:
    """Refuse to restore an adapter onto weights that already hold a merged adapter (a record on
    the model object, :mod:`~lightning_lora.provenance`): ``ΔW`` would be added twice."""
    merged = merge_records(pl_module)
    if merged:
        first = next(iter(merged))
        raise LoRAStateError(
            f"cannot restore a LoRA checkpoint into this model: its weights already hold a merged adapter "
            f"({len(merged)} weight(s), e.g. {first!r}: merged at the end of fit, or by merge_lora), so loading "
            f"the checkpoint's adapter would add ΔW twice. Evaluate the merged model with ckpt_path=None, use a "
            f"freshly built model, or set merge_on_fit_end=False."
        )


def check_fingerprint(pl_module: nn.Module, checkpoint: dict[str, Any], adapter_name: str) -> None:
    """For an adapter-only checkpoint, refuse weights other than the base it was trained on (its
    fingerprint), e.g. a merged state dict loaded into a new model object."""
    fingerprint = (checkpoint.get(CHECKPOINT_KEY) or {}).get("base_fingerprint")
    if fingerprint and is_adapter_only(checkpoint):
        check_base(pl_module, fingerprint, adapter_name, checkpoint["state_dict"])


def check_adapter_restored(pl_module: nn.Module, checkpoint: dict[str, Any], config: dict[str, Any]) -> None:
    """Every LoRA and trainable tensor of the model came from the adapter-only checkpoint, and
    nothing in it was left over: otherwise it was written with another config."""
    saved = set(checkpoint["state_dict"])
    lacking = sorted(set(lora_state_dict(pl_module)) - saved)
    surplus = sorted(saved - set(pl_module.state_dict()))
    if not lacking and not surplus:
        return
    what = f"lacks {len(lacking)} of this model's LoRA/trainable tensors (e.g. {lacking[:2]})" if lacking else ""
    kind = "LoRA tensors" if all(".lora_" in k for k in surplus) else "tensors"
    more = f"holds {kind} this model has no place for (e.g. {surplus[:2]})" if surplus else ""
    marker = checkpoint[CHECKPOINT_KEY]
    raise LoRAStateError(
        f"this adapter-only checkpoint {' and '.join(w for w in (what, more) if w)}: it was written "
        f"with another LoRA config, {marker.get('config')} (adapters {marker.get('adapter_names')}), "
        f"this callback has {config}. Build LoRACallback with the checkpoint's config "
        f"(checkpoint['{CHECKPOINT_KEY}']['config']) to restore it."
    )


def mark_checkpoint(
    pl_module: nn.Module, checkpoint: dict[str, Any], adapter_name: str, config: LoRAConfig, full: bool
) -> None:
    """Keep only the LoRA weights and trainable modules in ``checkpoint["state_dict"]`` (unless
    ``full``), and record what it holds and the base it belongs on under ``CHECKPOINT_KEY``."""
    adapter_keys = [k for k in lora_state_dict(pl_module) if k in checkpoint["state_dict"]]
    if not full:
        keep = set(adapter_keys)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint[CHECKPOINT_KEY] = {
        "adapter_only": not full,
        "adapter_keys": adapter_keys,
        "adapter_names": adapter_names(pl_module),
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "base_fingerprint": base_fingerprint(pl_module, adapter_name),
    }
