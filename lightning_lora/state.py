"""What LoRA a model holds: the injection record on its root, and a walk over its adapted weights.

Every function that asks "which weights are adapted, by which adapters?" walks the module tree
through :func:`adapted_weights`; nothing keeps a second list that could go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import LoRAConfig
from .errors import LoRAStateError
from .layers import LoRALayer, LoRAParametrization, LoRAWrapper
from .names import weight_name

STATE_ATTR = "_lightning_lora"
"""Attribute of the root module holding its :class:`LoRAState` (in ``__dict__``: not a module,
parameter or buffer, so it never reaches a state dict)."""


@dataclass
class LoRAState:
    """What injection must remember to be undone exactly; kept on the root module.

    ``configs``: the config of each adapter. ``requires_grad``: every parameter's flag before
    the first injection. ``param_order``: the parameter names of each module whose weight was
    parametrized, in their original order (parametrize moves the weight to the end)."""

    configs: dict[str, LoRAConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    param_order: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptedWeight:
    """One adapted weight: its ``name`` (:mod:`lightning_lora.names`), the module ``path`` of its
    LoRA layer, the layer, and the host weight tensor that merging writes into."""

    name: str
    path: str
    layer: LoRALayer
    weight: Tensor


def lora_state(model: nn.Module) -> LoRAState | None:
    """The injection record of ``model``, or ``None`` if nothing was injected."""
    return model.__dict__.get(STATE_ATTR)


def lora_config(model: nn.Module, adapter_name: str = "default") -> LoRAConfig:
    """The config adapter ``adapter_name`` was injected (or loaded) with."""
    state = lora_state(model)
    if state is None or adapter_name not in state.configs:
        known = sorted(state.configs) if state else []
        raise LoRAStateError(f"model has no adapter named {adapter_name!r} (adapters: {known})")
    return state.configs[adapter_name]


def adapted_weights(model: nn.Module) -> Iterator[AdaptedWeight]:
    """Every adapted weight of ``model``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, LoRAWrapper):
            yield AdaptedWeight(path, path, module, module.base_layer.weight)
        elif parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for i, layer in enumerate(chain):
                    if isinstance(layer, LoRAParametrization):
                        name = weight_name(path, tensor_name, layer.label)
                        where = f"{path}.parametrizations.{tensor_name}.{i}".lstrip(".")
                        yield AdaptedWeight(name, where, layer, chain.original)


lora_layers = adapted_weights  # the name before 0.2: what it yields are weights, not layers


def has_lora(model: nn.Module) -> bool:
    return next(adapted_weights(model), None) is not None


def require_adapted(model: nn.Module, action: str) -> list[AdaptedWeight]:
    """The adapted weights, or an error saying that ``action`` needs some."""
    targets = list(adapted_weights(model))
    if not targets:
        raise LoRAStateError(f"cannot {action}: the model has no LoRA layers; call inject_lora first.")
    return targets
