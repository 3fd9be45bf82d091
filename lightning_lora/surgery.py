"""Module surgery: putting LoRA layers into a module tree and taking them out again.

Two carriers (see :mod:`lightning_lora.layers`): a module is swapped for the wrapper its type
calls for (:data:`~lightning_lora.layer_types.LAYER_TYPES`: a :class:`LoRALinear` for an
``nn.Linear``, a ``LoRAConv`` for an ``nn.Conv2d``, ...); a weight that its owner reads directly
(the fused q/k/v of an ``nn.MultiheadAttention``, its ``out_proj``, the Linears of
``nn.TransformerEncoderLayer``, whose inference fast path never calls them) gets a
:class:`LoRAParametrization`. Taking them out gives
back the original modules, parameter order and ``requires_grad`` flags, from the
:class:`~lightning_lora.state.LoRAState` recorded at the first injection.

A module registered under several names is swapped at every one, so its adapter runs wherever
the module does. Parametrized modules get a class of their own before their parametrizations
change: torch shares the generated ``Parametrized*`` class between a module and its
``copy.deepcopy``, so removing a property from it on one copy would break the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import quantized
from .config import LoRAConfig
from .errors import LoRAStateError, LoRATargetError
from .layer_types import READS_CHILD_WEIGHTS, layer_type
from .layers import LoRALayer, LoRAParametrization, LoRAWrapper
from .names import block_rows, weight_name
from .state import STATE_ATTR, LoRAState, lora_state
from .targets import Selected


def adapt(
    target: Selected,
    config: LoRAConfig,
    adapter_name: str,
    state: LoRAState,
    places: dict[int, list[tuple[nn.Module, str]]] | None = None,
) -> None:
    """Give the selected module adapter ``adapter_name``: a new LoRA layer, or a new adapter in
    the layer it already has. A new wrapper replaces the module under every
    ``(parent, attribute)`` that ``places`` (:func:`~lightning_lora.sharing.module_places`)
    lists for it; without ``places``, under ``target.name`` only."""
    module, parent = target.module, target.parent
    if isinstance(module, LoRAWrapper):
        _add(module, config, adapter_name, target.name, module.weight, module.base_layer)
    elif isinstance(module, nn.MultiheadAttention):
        _adapt_mha(module, target.name, config, adapter_name, state, target.with_out_proj)
    elif isinstance(module, nn.Linear) and isinstance(parent, READS_CHILD_WEIGHTS):
        _parametrize(module, "weight", None, "", config, adapter_name, state, target.name)
    else:
        kind = layer_type(module)
        if kind is None or kind.wrapper is None:  # find_targets selects supported types only
            raise LoRATargetError(f"{target.name!r} ({type(module).__name__}) has no LoRA wrapper.")
        wrapped = kind.wrapper(module)
        _add(wrapped, config, adapter_name, target.name, module.weight, module)
        where = (places or {}).get(id(module)) or [(parent, target.name.rsplit(".", 1)[-1])]
        for holder, attr in where:
            setattr(holder, attr, wrapped)


def target_tensors(target: Selected, config: LoRAConfig) -> list[tuple[str, nn.Module, Tensor]]:
    """``(weight name, owning module, tensor)`` of every weight :func:`adapt` will give an
    adapter for ``target``: what a merge would later write into."""
    module = target.module
    if isinstance(module, LoRAWrapper):
        return [(target.name, module, module.base_layer.weight)]
    if not isinstance(module, nn.MultiheadAttention):
        return [(target.name, module, _original(module, "weight"))]
    found = []
    for proj in config.mha_projections:
        tensor = "in_proj_weight" if module._qkv_same_embed_dim else f"{proj}_proj_weight"
        found.append((weight_name(target.name, tensor, proj), module, _original(module, tensor)))
    if target.with_out_proj:
        found.append((f"{target.name}.out_proj", module.out_proj, _original(module.out_proj, "weight")))
    return found


def _original(module: nn.Module, tensor_name: str) -> Tensor:
    """The stored tensor behind ``module.<tensor_name>`` (under a parametrization: its original)."""
    if parametrize.is_parametrized(module, tensor_name):
        return getattr(module.parametrizations, tensor_name).original
    return getattr(module, tensor_name)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class, so that adding or
    removing a parametrization (a property on that class) cannot reach a deep copy of it."""
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _adapter_dtype(config: LoRAConfig, weight: Tensor, base: nn.Module | None) -> torch.dtype:
    """``adapter_dtype``, else the dtype the base computes in: its weight's, or a quantized
    layer's compute dtype (bf16 for a 4-bit base computing in bf16: QLoRA's choice)."""
    if config.adapter_dtype is not None:
        return getattr(torch, config.adapter_dtype)
    if base is not None and quantized.is_quantized(base):
        return quantized.compute_dtype(base)
    if not weight.is_floating_point():
        raise LoRATargetError(
            f"cannot follow a {weight.dtype} base weight for the adapter dtype; set adapter_dtype='float32'."
        )
    return weight.dtype


def _add(
    layer: LoRALayer,
    config: LoRAConfig,
    name: str,
    adapted: str,
    weight: Tensor,
    base: nn.Module | None = None,
    module: str | None = None,
) -> None:
    """Adapter ``name`` on ``layer``, with the hyper-parameters ``config`` gives the adapted weight
    ``adapted`` (of module ``module``: its rank/alpha patterns), in the adapter dtype."""
    dtype = _adapter_dtype(config, weight, base)
    layer.add_adapter(name, config.spec_for(adapted, module), dtype=dtype, device=weight.device)


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
                _add(existing, config, adapter_name, weight_name(path, tensor_name, label), weight, module=path)
                return
    else:
        weight = getattr(module, tensor_name)
        # register_parametrization moves the tensor to the end of ``_parameters`` (torch 2.13):
        # remember the order so unloading gives back the original state-dict key order.
        state.param_order.setdefault(path, list(module._parameters))
    d_out = weight.shape[0] if rows is None else rows[1] - rows[0]
    layer = LoRAParametrization(d_out, weight.shape[1], rows=rows, label=label)
    _add(layer, config, adapter_name, weight_name(path, tensor_name, label), weight, module=path)
    _own_class(module)  # registering adds a property to the class: keep it off deep copies
    parametrize.register_parametrization(module, tensor_name, layer)


def _adapt_mha(
    mha: nn.MultiheadAttention,
    path: str,
    config: LoRAConfig,
    adapter_name: str,
    state: LoRAState,
    with_out_proj: bool,
) -> None:
    # ``_qkv_same_embed_dim`` (torch 2.13): whether q/k/v live fused in ``in_proj_weight`` or
    # apart in ``q/k/v_proj_weight``; MHA's own forward branches on it the same way.
    fused = mha._qkv_same_embed_dim
    for proj in config.mha_projections:
        if fused:
            rows = block_rows(proj, 3 * mha.embed_dim)
            _parametrize(mha, "in_proj_weight", rows, proj, config, adapter_name, state, path)
        else:
            _parametrize(mha, f"{proj}_proj_weight", None, proj, config, adapter_name, state, path)
    if with_out_proj:
        _parametrize(mha.out_proj, "weight", None, "", config, adapter_name, state, f"{path}.out_proj")


def strip_lora(model: nn.Module) -> None:
    """Remove every LoRA layer and the injection record; restore the ``requires_grad`` flags.
    ``W`` is left as it is: merge or unmerge first (``unload_lora`` does)."""
    state = lora_state(model) or LoRAState()
    _remove_layers(model, state, empty_only=False)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    model.__dict__.pop(STATE_ATTR, None)


def remove_empty_layers(model: nn.Module) -> None:
    """Give back the original module (or plain weight) wherever no adapter is left, e.g. after
    deleting the only adapter of some modules while others keep theirs."""
    _remove_layers(model, lora_state(model) or LoRAState(), empty_only=True)


def _remove_layers(model: nn.Module, state: LoRAState, empty_only: bool) -> None:
    """Swap every LoRA wrapper back for its base layer and remove LoRA's parametrizations (with
    ``empty_only``: only those that hold no adapter), restoring the parameters' order."""
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, module in list(parent._modules.items()):
            if isinstance(module, LoRAWrapper) and not (empty_only and module.adapter_names):
                setattr(parent, child_name, module.base_layer)
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
            _own_class(module)  # removing deletes a property from the class: keep it off deep copies
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        for key in state.param_order.get(path, []):  # see _parametrize
            if key in module._parameters:
                module._parameters[key] = module._parameters.pop(key)
