"""Optimizers over a model whose base is frozen: keep only what trains, and say so when that
leaves nothing.

Plain PyTorch (no Lightning), so any training loop can use it: build the optimizer over
``model.parameters()`` as usual, freeze the base (``inject_lora`` does), then strip.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import LoRAStateError


def strip_frozen_parameters(optimizers: Iterable[torch.optim.Optimizer], module: nn.Module) -> None:
    """Keep in every param group only parameters with ``requires_grad`` (LoRA's and the
    trainable modules'), keeping the optimizers' types, hyper-parameters and schedulers.

    Raises if a group or an optimizer ends up empty (a group that held only frozen weights,
    say LayerNorm parameters excluded from weight decay), or if a trainable parameter is in no
    optimizer (it would silently never train).
    """
    names = {id(p): n for n, p in module.named_parameters()}
    covered: set[int] = set()
    for index, optimizer in enumerate(optimizers):
        kind = type(optimizer).__name__
        groups = optimizer.param_groups
        # `_MockOptimizer` is the placeholder Lightning (checked against 2.6) puts in place when
        # configure_optimizers returns None: compared by name, so this module stays torch-only.
        if kind == "_MockOptimizer" or not groups:
            raise LoRAStateError(
                "configure_optimizers returned no optimizer; return one over self.parameters(), "
                "or pass LoRACallback(optimizer=...)."
            )
        for g, group in enumerate(groups):
            kept = [p for p in group["params"] if p.requires_grad]
            if not kept:
                example = next((names.get(id(p), "?") for p in group["params"]), "nothing")
                raise LoRAStateError(
                    f"param group {g} of optimizer {index} ({kind}) holds only frozen parameters "
                    f"(e.g. {example!r}), so it is empty once LoRA freezes the base. Drop that group "
                    f"from configure_optimizers, add its modules to trainable_modules, or pass "
                    f"LoRACallback(optimizer=...) to build the optimizer over the LoRA parameters."
                )
            group["params"] = kept
            covered.update(id(p) for p in kept)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise LoRAStateError(
            f"{len(missing)} trainable parameter(s) are in no optimizer and would never train "
            f"(e.g. {missing[:3]}). Build the optimizer over self.parameters() (frozen ones are "
            f"removed for you), or pass LoRACallback(optimizer=...)."
        )
