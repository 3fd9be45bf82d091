"""Loading an adapter directory into a model: all of it, or nothing.

The file is read and checked on its own first (:func:`~lightning_lora.io.read_adapter`); then
the adapter is injected at exactly the weights the file has tensors for (so PEFT's and our target
dialects need not agree), every shape is checked, and only then are tensors copied. Any error
rolls the model back to exactly what it was.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .adapter_file import AdapterFile, read_adapter
from .adapters import adapter_names, check_adapter_name, delete_adapter
from .errors import AdapterFileError, LoRAError, LoRAStateError
from .inject import inject_lora, unload_lora
from .peft_format import config_for_file
from .provenance import merge_records, update_digest
from .roots import fit_file
from .state import adapted_weights, has_lora, lora_state


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", root: str | None = None
) -> list[str]:
    """Inject adapter ``adapter_name`` into ``model`` and fill it from directory ``path``.

    The file's names may be ``model``'s own or relative to a submodule (a file saved with
    ``root=...``, or one from a LightningModule loaded into the bare Hugging Face model): they
    are tried as written, under the root recorded at save, then under the one prefix that fits
    them all (:func:`~lightning_lora.roots.fit_file`, which warns naming it). ``root`` says it
    instead: the submodule the names are relative to (``""``: ``model`` itself).

    The adapted weights are exactly the ones the file has tensors for, so PEFT's and our target
    dialects need not agree. As with :func:`~lightning_lora.inject.inject_lora`, the loaded
    adapter becomes the only active (and only trainable) one; switch with ``set_adapter``.
    The file's trainable-module tensors are written into the model's modules, which every
    adapter shares (a warning says so when that changes another adapter's head).

    Every tensor must fit: a shape mismatch names the weight and both shapes, a module the
    model lacks is named. On any error the model is left exactly as it was.
    Returns the adapted weights' names.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise LoRAStateError(
            f"the model already has an adapter named {adapter_name!r}; load this one under another "
            f"name (load_adapter(model, path, adapter_name='second')) or delete_adapter(model, {adapter_name!r}) first."
        )
    file = fit_file(model, read_adapter(path), root)
    check_not_merged_already(model, file)
    had_lora = has_lora(model)
    active = {t.path: list(t.layer.active_adapters) for t in adapted_weights(model)}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        config = config_for_file(model, file)
        names = inject_lora(model, config, adapter_name=adapter_name)
        _fill(model, adapter_name, file)
        _load_trainable(model, adapter_name, file, warn_shared=had_lora)
    except Exception as err:
        _roll_back(model, adapter_name, had_lora, active, flags)
        if isinstance(err, LoRAError) and not isinstance(err, AdapterFileError):
            raise AdapterFileError(f"adapter {str(path)!r} does not fit this model: {err}") from None
        raise
    return names


def check_not_merged_already(model: nn.Module, file: AdapterFile) -> None:
    """Refuse an adapter whose ``ΔW`` this model's weights hold already (their merge record
    names its digest); warn when the file was trained on weights holding merges this model's do
    not record (it was saved after a merge, e.g. by a second ``fit`` of a merged model)."""
    records = merge_records(model)
    for name in sorted(set(records) & set(file.pairs)):
        if update_digest(*file.update(name), file.magnitudes.get(name)) in {r.digest for r in records[name]}:
            raise LoRAStateError(
                f"adapter {str(file.path)!r} is merged into {name!r} of this model already (merge_lora or "
                f"unload_lora(merge=True) put its ΔW into the weight): loading it again would add ΔW twice. "
                f"Use the model as it is, or load the adapter into a freshly built base model."
            )
    trained_on = file.extras.get("merged_into_base") or {}
    lacking = sorted(
        n for n, digests in trained_on.items() if not set(digests) <= {r.digest for r in records.get(n, [])}
    )
    if lacking:
        warnings.warn(
            f"adapter {str(file.path)!r} was trained on weights into which other adapter(s) had been merged "
            f"(e.g. at {lacking[0]!r}); this model's weights record no such merge. Unless they hold it anyway "
            f"(merged by `lightning-lora merge`, say), its outputs differ from the trained model's: load and "
            f"merge_lora those adapters first.",
            stacklevel=3,
        )


def _fill(model: nn.Module, adapter_name: str, file: AdapterFile) -> None:
    """Copy the file's A/B (and DoRA magnitudes) into the freshly injected adapter, checking every
    shape first."""
    layers = {t.name: t for t in adapted_weights(model) if adapter_name in t.layer.lora_A}
    missing = sorted(set(layers) - set(file.pairs))
    extra = sorted(set(file.pairs) - set(layers))
    if missing or extra:
        what = f"lacks weights for {missing[:3]}" if missing else f"has weights for {extra[:3]}, not adapted here"
        raise AdapterFileError(f"adapter {str(file.path)!r} {what} (its target_modules select other modules).")
    for name, target in layers.items():
        A, B = file.pairs[name]
        layer, r = target.layer, file.rank(name)
        if (name in file.embedding) != layer.embedding_keys:
            keys = ("lora_embedding_A/B", "lora_A/B")
            has, needs = keys if name in file.embedding else keys[::-1]
            raise AdapterFileError(
                f"adapter {str(file.path)!r} does not fit {name!r}: the file has {has} tensors for it, but it is of type "
                f"{type(getattr(layer, 'base_layer', layer)).__name__} here, which needs {needs}. Was it trained on "
                f"another base model?"
            )
        a_shape, b_shape = layer.adapter_shapes(r)
        if tuple(A.shape) != a_shape or tuple(B.shape) != b_shape:
            raise AdapterFileError(
                f"adapter {str(file.path)!r} does not fit {name!r}: the file has lora_A "
                f"{tuple(A.shape)} and lora_B {tuple(B.shape)}, this model's {layer.d_out}×{layer.d_in} "
                f"weight needs {a_shape} and {b_shape}. Was it trained on another base model?"
            )
    for name, target in layers.items():
        layer = target.layer
        spec = file.spec(name, layer.specs[adapter_name])  # rank_pattern / alpha_pattern entries
        if spec.r != layer.specs[adapter_name].r:  # re-create at the file's rank
            A0, active = layer.lora_A[adapter_name], layer.active_adapters
            layer.delete_adapter(adapter_name)
            layer.add_adapter(adapter_name, spec, A0.dtype, A0.device)
            layer.set_active(active)
        layer.specs[adapter_name] = spec
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(file.pairs[name][0])
            layer.lora_B[adapter_name].copy_(file.pairs[name][1])
            if name in file.magnitudes:  # the file's use_dora made this adapter DoRA (read_adapter checked the shape)
                layer.lora_magnitude_vector[adapter_name].copy_(file.magnitudes[name])


def _load_trainable(model: nn.Module, adapter_name: str, file: AdapterFile, warn_shared: bool) -> None:
    if not file.trainable:
        return
    own = model.state_dict()
    unknown = sorted(k for k in file.trainable if k not in own)
    if unknown:
        raise AdapterFileError(
            f"adapter {str(file.path)!r} has trainable-module tensors {unknown[:3]} this model lacks."
        )
    for key, tensor in file.trainable.items():
        if own[key].shape != tensor.shape:
            raise AdapterFileError(
                f"adapter {str(file.path)!r}: {key!r} has shape {tuple(tensor.shape)} in the file "
                f"and {tuple(own[key].shape)} in the model."
            )
    others = [n for n in adapter_names(model) if n != adapter_name]
    if (
        warn_shared
        and others
        and any(not torch.equal(own[k].cpu(), v.to(own[k].dtype)) for k, v in file.trainable.items())
    ):
        modules = sorted({k.rsplit(".", 1)[0] for k in file.trainable})
        warnings.warn(
            f"adapter {adapter_name!r} replaces the weights of {modules}, which adapters {others} use too: "
            f"trainable modules are part of the model, not of one adapter, so set_adapter({others[0]!r}) "
            f"will run adapter {others[0]!r} with the {modules[0]} of adapter {adapter_name!r}.",
            stacklevel=3,
        )
    model.load_state_dict(dict(file.trainable), strict=False)


def _roll_back(
    model: nn.Module, adapter_name: str, had_lora: bool, active: dict[str, list[str]], flags: dict[int, bool]
) -> None:
    """Undo a partial load: remove what was injected, restore active adapters and flags."""
    if not had_lora:
        if has_lora(model):
            unload_lora(model, merge=False)
        return
    if adapter_name in adapter_names(model):
        delete_adapter(model, adapter_name)
    state = lora_state(model)
    if state is not None:
        state.configs.pop(adapter_name, None)
    for t in adapted_weights(model):
        t.layer.set_active(active.get(t.path, []))
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), p.requires_grad))
