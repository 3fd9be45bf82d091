"""LoRA when a strategy has wrapped or sharded the model: saving and merging the adapter.

Training itself needs nothing from here. LoRA is injected before any strategy wraps the model
(the callback does it at ``setup``), so:

* **DDP** registers only parameters with ``requires_grad`` in its reducer: the adapters. Only
  their gradients are all-reduced, every LoRA parameter gets a gradient each step, and
  ``find_unused_parameters`` stays off. The module tree is untouched, so ``save_adapter`` and
  ``unload_lora`` work as on one device.
* **FSDP** (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) with
  ``use_orig_params=True`` trains frozen and LoRA parameters side by side in one flat parameter.
  Between steps each rank holds only a 1-D shard of every parameter, and the module names
  gain ``_fsdp_wrapped_module.`` segments. Reading the adapter then needs the full parameters
  (a collective every rank joins) and the bare module names; merging must write into the full
  parameters and leave the module tree as FSDP built it.

  A cost to know: a flat parameter requires grad if any parameter in it does, so within a unit
  that holds adapters autograd also computes ``dW`` for the frozen weights (FSDP then drops it),
  and the LoRA layers take their reference path (their weight "requires grad"). On 2×H200 this
  made FSDP 1.33× slower than DDP per step (``experiments/benchmark/RESULTS.md``); giving frozen
  Linears units of their own avoids the waste but was slower still (one all-gather per Linear).
  Prefer DDP while the model fits on one GPU.

* **FSDP2** (``fully_shard``, Lightning's ``ModelParallelStrategy``) keeps the module tree and
  its names and makes every parameter a ``DTensor`` sharded on its first dimension, one per
  parameter: frozen weights and adapters never share a tensor, so autograd computes gradients
  for the adapters only and the LoRA layers keep their fast path (inside a forward FSDP2 hands
  them plain, gathered weights). LoRA must be injected before ``fully_shard`` (the callback does,
  under ``ModelParallelStrategy``), so the adapters are sharded and reduced with the rest.
  Reading the adapter gathers its DTensors (:mod:`lightning_lora.dtensors`); merging gathers the
  weights, merges, and scatters the result back into the shards.

* **DeepSpeed** (Lightning's ``DeepSpeedStrategy``): ZeRO-1/2 leave the model whole (inside a
  ``DeepSpeedEngine``, which :func:`unwrap` strips); ZeRO-3 partitions every parameter (empty
  ``data``, a ``ds_id``), and reading or merging gathers them with DeepSpeed's
  ``GatheredParameters``. DeepSpeed's optimizer holds the parameters that require grad only.
  ``DeepSpeedStrategy(exclude_frozen_parameters=True)`` keeps the frozen base out of checkpoints.

:func:`save_adapter_gathered` and :func:`merge_gathered` do both, and reduce to
``save_adapter`` / ``unload_lora`` when nothing is sharded. Call them on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dtensors import copy_whole_, is_dtensor, whole
from .inject import unload_lora
from .io import save_adapter
from .layers import AdapterParameters, LoRALayer
from .merge import merge_lora
from .names import WRAPPED_CHILD
from .roots import served_name_or_path
from .state import STATE_ATTR


def _fsdp_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module ``module`` wraps, or ``None`` if it is no wrapper."""
    for name in WRAPPED_CHILD:
        inner = module._modules.get(name)
        if inner is not None:
            return inner
    if isinstance(module, nn.parallel.DistributedDataParallel) or type(module).__name__ == "DeepSpeedEngine":
        return module.module
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """Strip wrappers from the top of ``module`` (DDP, FSDP, compile, checkpointing)."""
    inner = _wrapped(module)
    while inner is not None:
        module, inner = inner, _wrapped(inner)
    return module


class _View(nn.Module):
    """A container in :func:`unwrapped_view`: holds children, parameters and buffers of the
    module it mirrors, by reference. It has no ``forward``; it exists to be named and read.
    Filled through ``_parameters`` / ``_buffers`` / ``_modules`` (torch 2.13), because the public
    ``register_*`` methods would refuse FSDP's flat-parameter views and shared children."""


def unwrapped_view(model: nn.Module) -> nn.Module:
    """``model`` as if no wrapper had been applied inside it: the same leaf modules and
    parameters (not copies), with the bare names (``layers.0.self_attn.q_proj`` instead of
    ``layers.0._fsdp_wrapped_module.self_attn.q_proj``), and the LoRA record of the model.

    Subtrees without wrappers are returned as they are, so on an unwrapped model this is
    ``model`` itself. Meant for reading (naming, saving); never train or call the view.
    """
    model = unwrap(model)
    if isinstance(model, LoRALayer) or not any(_wrapped(m) is not None for m in model.modules()):
        return model  # a LoRA layer stays itself (its base layer may be wrapped: it reads through)
    view = _View()
    view._parameters.update(model._parameters)
    view._buffers.update(model._buffers)
    for name, child in model._modules.items():
        if child is not None:
            view._modules[name] = unwrapped_view(child)
    if STATE_ATTR in model.__dict__:
        view.__dict__[STATE_ATTR] = model.__dict__[STATE_ATTR]
    return view


def _fsdp2_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _zero3_partitioned(parameter: nn.Parameter) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned ``parameter`` (its data is then empty)."""
    return hasattr(parameter, "ds_id")


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP (1 or 2), any other ``DTensor`` layout, or DeepSpeed ZeRO-3 shards (part of)
    ``module``. (ZeRO-1/2 partition optimizer state and gradients only: the model is whole.)"""
    wrappers = tuple(c for c in (_fsdp_class(), _fsdp2_class()) if c is not None)
    return any(isinstance(m, wrappers) for m in module.modules()) or any(
        is_dtensor(p) or _zero3_partitioned(p) for p in module.parameters()
    )


ParameterFilter = Callable[[nn.Module, nn.Parameter], bool]


def _adapter_or_trainable(module: nn.Module, parameter: nn.Parameter) -> bool:
    """What an adapter file holds: adapters (trained or not) and the modules trained in full."""
    return isinstance(module, AdapterParameters) or parameter.requires_grad


def _parameters_where(
    root: nn.Module, test: Callable[[nn.Parameter], bool], select: ParameterFilter | None
) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """``(module, name, parameter)`` for each parameter under ``root`` that ``test`` and ``select`` accept."""
    return [
        (module, name, p)
        for module in root.modules()
        for name, p in module._parameters.items()
        if p is not None and test(p) and (select is None or select(module, p))
    ]


@contextmanager
def _whole_dtensors(root: nn.Module, writeback: bool, select: ParameterFilter | None) -> Iterator[None]:
    """FSDP2's :func:`full_parameters`: each selected DTensor parameter is replaced, under its
    own name, by a plain parameter holding its whole value (one per tensor, so tied weights stay
    tied); on exit the DTensors are put back, with the new values scattered into them if
    ``writeback`` and the block did not raise."""
    fsdp2 = _fsdp2_class()
    for module in root.modules():  # the state between steps: every parameter a sharded DTensor
        if fsdp2 is not None and isinstance(module, fsdp2):
            module.reshard()
    places = _parameters_where(root, is_dtensor, select)
    wholes: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module, name, p in places:
            if id(p) not in wholes:
                wholes[id(p)] = nn.Parameter(whole(p), requires_grad=p.requires_grad)
            module._parameters[name] = wholes[id(p)]
    failed = True
    try:
        yield
        failed = False
    finally:
        written: set[int] = set()
        for module, name, p in places:
            module._parameters[name] = p
            if writeback and not failed and id(p) not in written:
                copy_whole_(p, wholes[id(p)])
                written.add(id(p))


@contextmanager
def full_parameters(root: nn.Module, writeback: bool = False, select: ParameterFilter | None = None) -> Iterator[None]:
    """Inside the block every parameter under ``root`` is whole on every rank (a collective:
    every rank must enter). ``writeback=True`` writes changes back into the shards on exit.
    ``root`` is the outermost wrapped module, e.g. Lightning's ``trainer.strategy.model``;
    a no-op when nothing is sharded. Under FSDP2 and ZeRO-3 ``select(module, parameter)`` limits
    the gather to the parameters it accepts (FSDP1 gathers whole units). ZeRO-3 writes back into
    the partitions of the model, not into the optimizer's fp32 master copy: merge after training,
    never before more steps on the same engine."""
    fsdp = _fsdp_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in root.modules()):
        with fsdp.summon_full_params(root, writeback=writeback, recurse=True):
            yield
    elif any(_zero3_partitioned(p) for p in root.parameters()):
        import deepspeed

        params = [p for _, _, p in _parameters_where(root, _zero3_partitioned, select)]
        # modifier_rank=0: rank 0's values are re-partitioned on exit (every rank computed the same)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None):
            yield
    elif is_sharded(root):
        with _whole_dtensors(root, writeback, select):
            yield
    else:
        yield


def save_adapter_gathered(
    root: nn.Module,
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_global_zero: bool = True,
    adapter_root: str | None = None,
) -> Path | None:
    """``save_adapter`` for a model a strategy may have sharded. Every rank calls it (the
    gather is collective); the rank with ``is_global_zero`` writes. ``root`` is the outermost
    wrapper (``trainer.strategy.model``), ``model`` the module LoRA was injected into (the
    LightningModule). The file has the bare module names, as from an unwrapped model, relative
    to ``adapter_root`` (a submodule name, resolved before wrapping:
    :func:`~lightning_lora.roots.default_adapter_root`; ``None``: full names)."""
    base = served_name_or_path(model, adapter_root)  # read from the real module: a view has no config
    with full_parameters(root, writeback=False, select=_adapter_or_trainable):
        if is_global_zero:
            return save_adapter(unwrapped_view(model), path, adapter_name, base, root=adapter_root)
    return None


def merge_gathered(root: nn.Module, model: nn.Module, adapter_names: str | Iterable[str] | None = None) -> bool:
    """Merge ``ΔW`` into ``W`` on every rank, sharded or not; every rank calls it.

    Unsharded: ``unload_lora(model, merge=True)`` (plain modules back); returns ``True``.
    Sharded: the full weights are gathered, merged (fp32, NaN-checked, as ``merge_lora``) and
    written back into the shards; the LoRA layers stay in place, marked merged, so the forward
    runs the base layers only (FSDP owns the parameter layout, so modules cannot be swapped
    back). Returns ``False``: the layers are still there."""
    if not is_sharded(root):
        unload_lora(unwrap(model), merge=True)
        return True
    with full_parameters(root, writeback=True):
        merge_lora(unwrapped_view(model), adapter_names)
    return False


def frozen_linear_policy(block_types: Iterable[type[nn.Module]]) -> Any:
    """An FSDP (1) auto-wrap policy: a unit per block of ``block_types`` and one per frozen
    ``nn.Linear`` (the base layers inside LoRA layers), so no flat parameter mixes frozen weights
    with adapters and autograd computes no gradient for frozen weights. Measured slower than
    plain per-block units on 2×H200 (one all-gather per Linear, and the LoRA layers lose their
    fast path: ``experiments/benchmark/RESULTS.md``); it can still pay when memory, not time, is
    short. Use with ``FSDPStrategy(auto_wrap_policy=frozen_linear_policy({MyBlock}))``."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    blocks = tuple(block_types)

    def wrap(module: nn.Module) -> bool:
        if isinstance(module, blocks):
            return True
        return type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters())

    return CustomPolicy(wrap)
