"""Which tensors are an adapter's: the ones that train, and the ones a save must keep.

An adapter consists of its ``A``/``B`` pairs (and, for DoRA, magnitudes ``m``: whatever each layer's
:meth:`~lightning_lora.layers.LoRALayer.adapter_parameters` lists) and the full state of its
``trainable_modules``. :func:`adapter_entries` lists them once, each with both of its keys (the model's state-dict key
and the adapter file's key), so ``lora_state_dict`` (checkpoints) and the adapter files cannot
disagree about what an adapter holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from .names import FILE_PREFIX, PARTS, file_key
from .state import adapted_weights, lora_state
from .targets import resolve_modules


@dataclass(frozen=True)
class AdapterEntry:
    """One tensor of an adapter: its key in ``model.state_dict()``, its key in an adapter file."""

    state_key: str
    file_key: str
    tensor: Tensor


def lora_parameters(model: nn.Module, adapter_name: str | Iterable[str] | None = None) -> list[nn.Parameter]:
    """The ``A``/``B`` (and DoRA ``m``) parameters of ``adapter_name`` (default: every adapter), in
    model order."""
    wanted = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for target in adapted_weights(model):
        for name in target.layer.adapter_names:
            if wanted is not None and name not in wanted:
                continue
            for p in target.layer.adapter_parameters(name).values():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def trainable_module_names(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Module names that the config(s) of ``model`` keep fully trainable."""
    state = lora_state(model)
    if state is None:
        return []
    configs = state.configs.values() if adapter_name is None else [state.configs[adapter_name]]
    names: list[str] = []
    for config in configs:
        for n in resolve_modules(model, config.trainable_modules, "trainable_modules"):
            if n not in names:
                names.append(n)
    return names


def mark_only_lora_as_trainable(
    model: nn.Module,
    adapter_name: str | Iterable[str] | None = None,
    trainable_modules: Iterable[str] = (),
) -> None:
    """``requires_grad`` on the given adapters' parameters and the named modules, off elsewhere:
    on ``B`` but not ``A`` for an adapter whose config has ``freeze_a`` (LoRA-FA)."""
    keep = {id(p) for p in lora_parameters(model, adapter_name)} - {id(p) for p in _frozen_a(model)}
    for module_name in resolve_modules(model, list(trainable_modules), "trainable_modules"):
        keep.update(id(p) for p in model.get_submodule(module_name).parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _frozen_a(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``A`` of every adapter configured with ``freeze_a``: drawn once, never trained."""
    state = lora_state(model)
    for target in adapted_weights(model):
        for name in target.layer.adapter_names:
            if state is not None and name in state.configs and state.configs[name].freeze_a:
                yield target.layer.adapter_parameters(name)["A"]


def adapter_entries(
    model: nn.Module, adapter_name: str | None = None, include_trainable: bool = True
) -> Iterator[AdapterEntry]:
    """Every tensor of adapter ``adapter_name`` (default: all adapters' ``A``/``B``, and DoRA's
    ``m``) and, with ``include_trainable``, of the ``trainable_modules``, in model order."""
    for target in adapted_weights(model):
        for name in target.layer.adapter_names:
            if adapter_name is None or name == adapter_name:
                for part, tensor in target.layer.adapter_parameters(name).items():
                    key = ".".join(filter(None, (target.path, PARTS[part], name)))
                    yield AdapterEntry(key, file_key(target.name, part, target.layer.embedding_keys), tensor)
    if include_trainable:
        for module_name in trainable_module_names(model, adapter_name):
            for key, tensor in model.get_submodule(module_name).state_dict(prefix=f"{module_name}.").items():
                yield AdapterEntry(key, FILE_PREFIX + key, tensor)


def lora_state_dict(
    model: nn.Module, adapter_name: str | None = None, include_trainable: bool = True
) -> dict[str, Tensor]:
    """The adapter's tensors under their ``model.state_dict()`` keys: ``A``/``B`` (and DoRA's
    ``m``) of ``adapter_name`` (default: all) and, with ``include_trainable``, the full state of the
    ``trainable_modules``. Small enough to save every step; enough to restore training."""
    return {e.state_key: e.tensor.detach() for e in adapter_entries(model, adapter_name, include_trainable)}
