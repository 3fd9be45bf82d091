"""Putting LoRA into a model and taking it out again: plain functions over any ``nn.Module``.

``inject_lora`` replaces each targeted ``nn.Linear`` by a :class:`~lightning_lora.layers.LoRALinear`
and parametrizes the weights of each targeted ``nn.MultiheadAttention``; it freezes every other
parameter. ``merge_lora`` / ``unmerge_lora`` move ``ΔW`` in and out of ``W``; ``unload_lora`` gives
the original module types back, so the state dict has the original keys. Nothing here changes
weights unless called: there is no merge hidden in ``train()`` / ``eval()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import LoRAConfig
from .errors import LoRAStateError, LoRATargetError
from .layers import LoRALayer, LoRALinear, LoRAParametrization
from .targets import find_targets, resolve_modules

# Parents that read their Linear children's ``.weight`` directly instead of calling them:
# MultiheadAttention (out_proj) and TransformerEncoderLayer's inference fast path (linear1,
# linear2). Their Linears are adapted through a weight parametrization, never a wrapper.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
_STATE_ATTR = "_lightning_lora"


@dataclass
class LoRAState:
    """What injection must remember to be undone exactly; kept on the root module."""

    configs: dict[str, LoRAConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    param_order: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class LoRATarget:
    """One adapted weight: its display ``name``, the module ``path`` of its LoRA layer, the
    layer, and the host weight tensor that merging writes into."""

    name: str
    path: str
    layer: LoRALayer
    weight: Tensor


def lora_state(model: nn.Module) -> LoRAState | None:
    """The injection record of ``model``, or ``None`` if nothing was injected."""
    return model.__dict__.get(_STATE_ATTR)


def lora_config(model: nn.Module, adapter_name: str = "default") -> LoRAConfig:
    """The config adapter ``adapter_name`` was injected (or loaded) with."""
    state = lora_state(model)
    if state is None or adapter_name not in state.configs:
        known = sorted(state.configs) if state else []
        raise LoRAStateError(f"model has no adapter named {adapter_name!r} (adapters: {known})")
    return state.configs[adapter_name]


# --------------------------------------------------------------------------------- injecting


def _adapter_dtype(config: LoRAConfig, weight: Tensor) -> torch.dtype:
    if config.adapter_dtype is not None:
        return getattr(torch, config.adapter_dtype)
    if not weight.is_floating_point():
        raise LoRATargetError(
            f"cannot follow a {weight.dtype} base weight for the adapter dtype; set adapter_dtype='float32'."
        )
    return weight.dtype


def _add(layer: LoRALayer, config: LoRAConfig, name: str, weight: Tensor) -> None:
    layer.add_adapter(
        name,
        r=config.r,
        scaling=config.scaling,
        dropout=config.dropout,
        init=config.init,
        dtype=_adapter_dtype(config, weight),
        device=weight.device,
    )


def _parametrize(
    module: nn.Module,
    tensor_name: str,
    rows: tuple[int, int] | None,
    label: str,
    config: LoRAConfig,
    adapter_name: str,
    state: LoRAState,
    path: str,
) -> None:
    if config.dropout > 0:
        raise LoRATargetError(
            f"dropout={config.dropout} cannot apply to {path}.{tensor_name}: adapters of "
            f"nn.MultiheadAttention act on its weights, not on its input. Set dropout=0.0, or "
            f"exclude the attention modules."
        )
    if parametrize.is_parametrized(module, tensor_name):
        chain = getattr(module.parametrizations, tensor_name)
        weight = chain.original
        for existing in chain:
            if isinstance(existing, LoRAParametrization) and existing.label == label:
                _add(existing, config, adapter_name, weight)
                return
    else:
        weight = getattr(module, tensor_name)
        state.param_order.setdefault(path, list(module._parameters))
    d_out = weight.shape[0] if rows is None else rows[1] - rows[0]
    layer = LoRAParametrization(d_out, weight.shape[1], rows=rows, label=label)
    _add(layer, config, adapter_name, weight)
    parametrize.register_parametrization(module, tensor_name, layer)


def _adapt_mha(
    mha: nn.MultiheadAttention,
    path: str,
    config: LoRAConfig,
    adapter_name: str,
    state: LoRAState,
    with_out_proj: bool,
) -> None:
    E = mha.embed_dim
    for i, proj in enumerate("qkv"):
        if proj not in config.mha_projections:
            continue
        if mha._qkv_same_embed_dim:
            rows = (i * E, (i + 1) * E)
            _parametrize(mha, "in_proj_weight", rows, proj, config, adapter_name, state, path)
        else:
            _parametrize(mha, f"{proj}_proj_weight", None, proj, config, adapter_name, state, path)
    if with_out_proj:
        _parametrize(mha.out_proj, "weight", None, "", config, adapter_name, state, f"{path}.out_proj")


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

    Raises :class:`LoRATargetError` for patterns that match nothing or unsupported layers,
    :class:`LoRAStateError` if ``adapter_name`` is already injected.
    """
    check_adapter_name(adapter_name)
    config = LoRAConfig.build(config, **config_fields)
    targets = find_targets(model, config)
    already = [t.name for t in lora_layers(model) if adapter_name in t.layer.lora_A]
    if already:
        raise LoRAStateError(
            f"adapter {adapter_name!r} is already injected into {len(set(already))} module(s) "
            f"(e.g. {already[0]!r}). Call unload_lora(model) first, or give the new adapter "
            f"another name: inject_lora(model, config, adapter_name='second')."
        )
    state = lora_state(model)
    if state is None:
        state = LoRAState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[_STATE_ATTR] = state
    for t in targets:
        if isinstance(t.module, LoRALinear):
            _add(t.module, config, adapter_name, t.module.weight)
        elif isinstance(t.module, nn.MultiheadAttention):
            _adapt_mha(t.module, t.name, config, adapter_name, state, t.with_out_proj)
        elif isinstance(t.parent, _READS_CHILD_WEIGHTS):
            _parametrize(t.module, "weight", None, "", config, adapter_name, state, t.name)
        else:
            wrapped = LoRALinear(t.module)
            _add(wrapped, config, adapter_name, t.module.weight)
            setattr(t.parent, t.name.rsplit(".", 1)[-1], wrapped)
    state.configs[adapter_name] = config
    set_adapter(model, adapter_name)
    mark_only_lora_as_trainable(model, adapter_name, config.trainable_modules)
    return [t.name for t in lora_layers(model) if adapter_name in t.layer.lora_A]


def check_adapter_name(name: Any) -> None:
    """An adapter name becomes a key of ``nn.ParameterDict`` and part of state-dict keys: it
    must be a non-empty string without dots that is not an attribute of ``nn.ParameterDict``."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ParameterDict, name):
        why = (
            "it is an attribute of nn.ParameterDict, which holds the adapters"
            if isinstance(name, str) and name and "." not in name
            else "adapter names are non-empty strings without dots (they become state-dict keys)"
        )
        raise LoRAStateError(f"adapter_name={name!r} cannot be used: {why}. Choose another, e.g. 'task_a'.")


# ------------------------------------------------------------------------ walking LoRA layers


def lora_layers(model: nn.Module) -> Iterator[LoRATarget]:
    """Every adapted weight of ``model``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield LoRATarget(path, path, module, module.base_layer.weight)
        elif parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for i, layer in enumerate(chain):
                    if not isinstance(layer, LoRAParametrization):
                        continue
                    if tensor_name == "weight":
                        name = path
                    else:
                        name = f"{path}.{tensor_name}" + (f"[{layer.label}]" if layer.rows else "")
                    prefix = f"{path}.parametrizations.{tensor_name}.{i}"
                    yield LoRATarget(name, prefix.lstrip("."), layer, chain.original)


def has_lora(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def _require_layers(model: nn.Module, action: str) -> list[LoRATarget]:
    targets = list(lora_layers(model))
    if not targets:
        raise LoRAStateError(f"cannot {action}: the model has no LoRA layers; call inject_lora first.")
    return targets


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in order of first appearance."""
    names: list[str] = []
    for target in lora_layers(model):
        names.extend(n for n in target.layer.adapter_names if n not in names)
    return names


def set_adapter(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make ``names`` the active adapter(s) of every layer that has them (the others go
    inactive). Several names add their updates. No weights are loaded or changed."""
    names = [names] if isinstance(names, str) else list(names)
    present = adapter_names(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise LoRAStateError(f"no adapter named {missing} in the model; adapters: {present}")
    for target in lora_layers(model):
        target.layer.set_active([n for n in names if n in target.layer.lora_A])


def lora_parameters(model: nn.Module, adapter_name: str | Iterable[str] | None = None) -> list[nn.Parameter]:
    """The ``A``/``B`` parameters of ``adapter_name`` (default: every adapter), in model order."""
    wanted = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for target in lora_layers(model):
        for name in target.layer.adapter_names:
            if wanted is not None and name not in wanted:
                continue
            for p in (target.layer.lora_A[name], target.layer.lora_B[name]):
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
    """``requires_grad`` on the given adapters' ``A``/``B`` and the named modules, off elsewhere."""
    keep = {id(p) for p in lora_parameters(model, adapter_name)}
    for module_name in resolve_modules(model, list(trainable_modules), "trainable_modules"):
        keep.update(id(p) for p in model.get_submodule(module_name).parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def lora_state_dict(
    model: nn.Module, adapter_name: str | None = None, include_trainable: bool = True
) -> dict[str, Tensor]:
    """The adapter's tensors under their ``model.state_dict()`` keys: ``A``/``B`` of
    ``adapter_name`` (default: all) and, with ``include_trainable``, the full state of the
    ``trainable_modules``. Small enough to save every step; enough to restore training."""
    ids = {id(p) for p in lora_parameters(model, adapter_name)}
    out = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
    if include_trainable:
        for module_name in trainable_module_names(model, adapter_name):
            out.update(model.get_submodule(module_name).state_dict(prefix=f"{module_name}."))
    return out


# ---------------------------------------------------------------------------- merge / unload


def merge_lora(model: nn.Module, adapter_names: str | Iterable[str] | None = None, safe: bool = True) -> None:
    """``W ← W + ΔW`` for the active adapters (or ``adapter_names``), computed in float32 and
    cast once to ``W``'s dtype. With ``safe``, every result is checked for NaN/Inf before any
    weight is written, so a poisoned adapter leaves the whole model untouched."""
    targets = _require_layers(model, "merge")
    wanted = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    plan = []
    for target in targets:
        names = target.layer.active_adapters if wanted is None else [n for n in wanted if n in target.layer.lora_A]
        done = [n for n in names if n in target.layer.merged_adapters]
        if done:
            raise LoRAStateError(
                f"adapter {done[0]!r} is already merged into {target.name!r}; merging twice would "
                f"add ΔW twice. Call unmerge_lora(model) first."
            )
        if names:
            plan.append((target, names))
    if not plan:
        raise LoRAStateError("nothing to merge: no active adapter (see set_adapter).")
    if safe:
        # One flag per weight, read back in one synchronisation rather than one per layer.
        finite = [torch.isfinite(t.layer.merged_region(t.weight, n).to(t.weight.dtype)).all() for t, n in plan]
        bad = [i for i, ok in enumerate(torch.stack(finite).tolist()) if not ok]
        if bad:
            target, names = plan[bad[0]]
            raise LoRAStateError(
                f"merging adapter(s) {names} into {target.name!r} gives NaN or Inf in "
                f"{target.weight.dtype}; no weight was changed. Check the adapter's "
                f"tensors (lightning-lora inspect) or train with a lower learning rate."
            )
    for target, names in plan:
        target.layer.merge(target.weight, names)


def unmerge_lora(model: nn.Module) -> None:
    """``W ← W − ΔW`` for every merged adapter (exact in fp32; in bf16 within a rounding of
    ``|W| + |ΔW|``, see the README)."""
    targets = _require_layers(model, "unmerge")
    if not any(t.layer.merged_adapters for t in targets):
        raise LoRAStateError("nothing to unmerge: no adapter is merged (see merge_lora).")
    for target in targets:
        target.layer.unmerge(target.weight)


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove LoRA: with ``merge`` the active adapters stay in ``W`` (a plain, fast model);
    without, ``W`` is restored and every adapter discarded. The original module types,
    state-dict keys (in their order) and ``requires_grad`` flags come back."""
    targets = _require_layers(model, "unload")
    if merge:
        pending = any(t.layer.unmerged_active() for t in targets)
        if pending:
            names = [n for n in adapter_names(model) if any(n in t.layer.unmerged_active() for t in targets)]
            merge_lora(model, names)
    elif any(t.layer.merged_adapters for t in targets):
        unmerge_lora(model)
    state = lora_state(model) or LoRAState()
    _remove_layers(model, state, empty_only=False)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    model.__dict__.pop(_STATE_ATTR, None)
    return model


def remove_empty_layers(model: nn.Module) -> None:
    """Give back the original module (or plain weight) wherever no adapter is left, e.g. after
    deleting the only adapter of some modules while others keep theirs."""
    _remove_layers(model, lora_state(model) or LoRAState(), empty_only=True)


def _remove_layers(model: nn.Module, state: LoRAState, empty_only: bool) -> None:
    """Swap every LoRALinear back for its base layer and remove LoRA's parametrizations (with
    ``empty_only``: only those that hold no adapter), restoring the parameters' order."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and not (empty_only and module.adapter_names):
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    for path, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations):
            chain = getattr(module.parametrizations, tensor_name)
            only_lora = all(isinstance(p, LoRAParametrization) for p in chain)
            if empty_only and (not only_lora or any(p.adapter_names for p in chain)):
                continue
            if not only_lora:
                raise LoRAStateError(
                    f"{path}.{tensor_name} carries parametrizations besides LoRA's; "
                    f"lightning-lora cannot remove its own without removing those."
                )
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        for key in state.param_order.get(path, []):
            if key in module._parameters:
                module._parameters[key] = module._parameters.pop(key)
