"""LoRA+: ``B`` learns ``ratio ×`` faster than ``A``, in the optimizer the user already has.

Hayou et al. 2024 (LoRA+, §3) show that with equal learning rates for ``A (r, d_in)`` and
``B (d_out, r)`` feature learning is inefficient at large width, and that ``lr_B = λ · lr_A``
with ``λ ≈ 16`` trains faster and better. PEFT's ``create_loraplus_optimizer`` builds a new
optimizer for this; here the user's own optimizer is edited instead, so its type,
hyper-parameters and LR schedulers stay theirs:

* every param group that holds ``B`` matrices is split: its other parameters stay in it
  (``A``, trainable modules), and its ``B`` matrices move to a new group appended at the end,
  a copy of its hyper-parameters with every learning rate (``lr``, ``initial_lr``, ``max_lr``,
  ``min_lr``) multiplied by ``ratio``, named ``<group name or pgN>.lora_B`` so that Lightning's
  ``LearningRateMonitor`` logs it under that name;
* a group that holds only ``B`` matrices has its learning rates multiplied in place;
* LR schedulers built over the optimizer keep one entry per group: their per-group lists
  (``base_lrs``, ``lr_lambdas``, ``min_lrs``, ...) get an entry for each new group, learning
  rates scaled, so the schedule drives ``B`` as it drives ``A``, ``ratio ×`` higher.

Where this differs from PEFT's helper: only ``B`` matrices are scaled (PEFT also scales every
1-D trainable tensor, biases of a trained head included), and an embedding's ``B`` is a ``B``
like any other (PEFT gives embedding adapters their own ``loraplus_lr_embedding``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import LoRAConfigError, LoRAStateError
from .state import adapted_weights

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
"""Param-group keys that hold a learning rate: torch's schedulers write ``initial_lr`` (and
``OneCycleLR`` ``max_lr``/``min_lr``) into the groups."""


PER_GROUP = ("lr_lambdas", "base_momentums", "max_momentums")
"""torch schedulers' per-group lists that are not learning rates (copied for a new group as they are)."""


def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float ≥ 1 (the paper's regime: ``B`` faster than ``A``), else a teaching error."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 <= ratio < float("inf"):
        raise LoRAConfigError(
            f"loraplus_lr_ratio must be a number >= 1 (B's learning rate over A's; the paper uses 16), "
            f"got {ratio!r}. Leave it None for plain LoRA."
        )
    return float(ratio)


def lora_b_parameters(model: nn.Module) -> set[int]:
    """``id`` of every adapter's ``B`` in ``model``."""
    return {id(t.layer.lora_B[n]) for t in adapted_weights(model) for n in t.layer.adapter_names}


def apply_loraplus(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    ratio: float,
    schedulers: Iterable[Any] = (),
) -> list[str]:
    """Give ``model``'s ``B`` matrices ``ratio ×`` the learning rate of their group in
    ``optimizer`` (see the module docstring); ``schedulers`` are the LR schedulers already built
    over ``optimizer`` (Lightning's, or your own), kept in step. Returns the new groups' names.

    Call it once, before the first step: the optimizer's state must still be empty (a restored
    state then loads into the split groups, as it was saved)."""
    ratio = check_ratio(ratio)
    b_ids = lora_b_parameters(model)
    if not b_ids:
        raise LoRAStateError("LoRA+ found no LoRA B matrix in the model; inject LoRA first.")
    if optimizer.state:
        raise LoRAStateError(
            "LoRA+ must split the optimizer's param groups before its first step; this optimizer already holds state."
        )
    if any(g.get("name", "").endswith(".lora_B") for g in optimizer.param_groups):
        raise LoRAStateError("LoRA+ was already applied to this optimizer (it has '.lora_B' groups).")
    parents: list[int] = []  # for each appended group, the group it came from
    scaled_in_place: list[int] = []
    names: list[str] = []
    for index, group in enumerate(list(optimizer.param_groups)):
        b_params = [p for p in group["params"] if id(p) in b_ids]
        if not b_params:
            continue
        base_name = group.get("name") or f"pg{index + 1}"
        if len(b_params) == len(group["params"]):
            _scale_lrs(group, ratio)
            scaled_in_place.append(index)
            names.append(base_name)
            continue
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        new_group = {k: v for k, v in group.items() if k != "params"}
        _scale_lrs(new_group, ratio)
        new_group["name"] = f"{base_name}.lora_B"
        new_group["params"] = b_params
        optimizer.param_groups.append(new_group)
        parents.append(index)
        names.append(new_group["name"])
    if not names:
        raise LoRAStateError("LoRA+ found no B matrix of the model in the optimizer; is it built over the model?")
    for scheduler in schedulers:
        _extend_scheduler(scheduler, optimizer, parents, scaled_in_place, ratio)
    return names


def _scale_lrs(group: dict[str, Any], ratio: float) -> None:
    for key in LR_KEYS:
        value = group.get(key)
        if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
            group[key] = value * ratio


def _extend_scheduler(
    scheduler: Any, optimizer: torch.optim.Optimizer, parents: list[int], in_place: list[int], ratio: float
) -> None:
    """Give ``scheduler`` (and the schedulers it chains) an entry for each group appended to
    ``optimizer``: every per-group list copies its parent's entry, learning rates scaled."""
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(inner, optimizer, parents, in_place, ratio)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    n_before = len(optimizer.param_groups) - len(parents)
    for attr, value in vars(scheduler).items():
        is_lr = attr.endswith("lrs") or attr == "_last_lr"  # base_lrs, min_lrs, max_lrs (torch's names)
        if not (is_lr or attr in PER_GROUP) or not isinstance(value, list) or len(value) != n_before:
            continue
        if is_lr:
            for index in in_place:
                value[index] = value[index] * ratio
        value.extend(value[p] * ratio if is_lr else value[p] for p in parents)
