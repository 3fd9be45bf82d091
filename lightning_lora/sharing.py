"""Weights that several modules share: tied embeddings and other aliasing.

A merge writes ``W + ΔW`` into a weight *tensor*. If another module holds the same tensor (a
language model's ``lm_head`` tied to its input embedding, two layers given one ``nn.Parameter``),
that module moves too, and the merged model is no longer the trained one. Exact handling would
need one adapter shared by every holder (an embedding adapter tied to the output layer's);
until then lightning-lora refuses such a target at injection, naming both modules
(:func:`refuse_shared_targets`), and ``merge_lora`` refuses a merge into a tensor some other
module holds (aliasing made after injection) with :func:`tensor_holders` / :func:`other_holders`.

A module object registered under several names is *not* aliasing: it is one module, its adapter
is applied wherever it is used (:func:`module_places` finds every place to put it).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from .errors import LoRATargetError
from .layers import LoRAWrapper
from .names import WRAPPED_CHILD


def _tensor_key(t: Tensor) -> object:
    """The memory a tensor reads: the same ``Parameter`` under two names, or two tensors viewing
    the same region. Meta tensors have no memory: only the object counts."""
    if t.device.type == "meta":
        return id(t)
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _owner_path(path: str, modules: dict[str, nn.Module]) -> str:
    """The module a tensor belongs to, seen through LoRA's own carriers and through wrappers:
    the base layer of a LoRA wrapper (``LoRALinear``, ``LoRAConv``, ...), the ``parametrizations.<tensor>`` list of a parametrized
    module, and a module that FSDP, checkpointing or compile wraps all stand for the module
    that holds them."""
    if ".parametrizations." in f".{path}":
        path = f".{path}".split(".parametrizations.")[0].lstrip(".")
    while path:
        parent, _, child = path.rpartition(".")
        if child in WRAPPED_CHILD or (child == "base_layer" and isinstance(modules.get(parent), LoRAWrapper)):
            path = parent
        else:
            break
    return path


def tensor_holders(model: nn.Module) -> dict[object, dict[int, str]]:
    """For every parameter's memory, the distinct modules holding it: ``{module id: name}``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    holders: dict[object, dict[int, str]] = {}
    for path, module in modules.items():
        for p in module._parameters.values():
            if p is None:
                continue
            owner = _owner_path(path, modules)
            holders.setdefault(_tensor_key(p), {}).setdefault(id(modules[owner]), owner)
    return holders


def other_holders(holders: dict[object, dict[int, str]], weight: Tensor, module: nn.Module) -> list[str]:
    """Names of the modules other than ``module`` that hold ``weight``."""
    return [name for mid, name in holders.get(_tensor_key(weight), {}).items() if mid != id(module)]


def _fix(name: str) -> str:
    return (
        f"Leave it out of target_modules (target_modules='all-linear' leaves out a tied output layer), or untie "
        f"the weight before injecting, e.g. `model.get_submodule({name!r}).weight = "
        f"nn.Parameter(model.get_submodule({name!r}).weight.detach().clone())` (for a Hugging Face "
        f"model also set config.tie_word_embeddings=False so a reload does not tie it again)."
    )


def refuse_shared_targets(model: nn.Module, targets: Iterable[tuple[str, nn.Module, Tensor]]) -> None:
    """Raise :class:`LoRATargetError` if a weight about to be adapted (``(name, owning module,
    tensor)``) is held by another module too: merging it would move that module as well."""
    holders = tensor_holders(model)
    for name, module, weight in targets:
        others = other_holders(holders, weight, module)
        if others:
            tied = " (tied embeddings)" if _is_embedding(model, [name, *others]) else ""
            raise LoRATargetError(
                f"cannot adapt {name!r}: its weight is the same tensor as {others[0]!r}'s{tied}, so merging ΔW "
                f"into it would change {others[0]!r} too and the merged model would differ from the trained one. "
                + _fix(name)
            )


def _is_embedding(model: nn.Module, names: list[str]) -> bool:
    modules = [model.get_submodule(n) for n in names if n]
    return any(isinstance(getattr(m, "base_layer", m), (nn.Embedding, nn.EmbeddingBag)) for m in modules)


def output_layers(model: nn.Module) -> set[int]:
    """Ids of the modules ``target_modules="all-linear"`` leaves out, as PEFT does: a model's
    output layer. Found without importing transformers: what any submodule's
    ``get_output_embeddings()`` returns (Hugging Face's ``lm_head``), and any ``nn.Linear`` whose
    weight is an embedding's weight (a tied output layer of any model, e.g. a ``Linear`` or a
    transformers ``Conv1D``)."""
    found: set[int] = set()
    embeddings = {_tensor_key(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            try:
                out = get()
            except (NotImplementedError, AttributeError):  # transformers raises these for some heads
                out = None
            if isinstance(out, nn.Module):
                found.add(id(out))
        weight = getattr(module, "weight", None)
        base = module.base_layer if isinstance(module, LoRAWrapper) else module
        tied = isinstance(weight, Tensor) and _tensor_key(weight) in embeddings
        if tied and not isinstance(base, (nn.Embedding, nn.EmbeddingBag)):
            found.add(id(module))
    return found


def module_places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every module (by id), each ``(parent, attribute)`` under which ``model`` holds it:
    more than one when a module is registered under several names (its adapter must go in at
    every one). One walk for the whole model."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                places.setdefault(id(child), []).append((parent, attr))
    return places
