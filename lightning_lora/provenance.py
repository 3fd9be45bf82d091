"""Which weights an adapter belongs on, so that ``ΔW`` is never added twice.

Two records, because a merged model can travel two ways:

* **The merge record, on the model object.** Merging adapter ``name`` into a weight appends a
  :class:`MergeRecord` (the adapter's name and a digest of its ``A``, ``B`` and scale) to the
  ``__dict__`` of the module that owns the weight: the ``nn.Linear`` itself (which
  ``unload_lora`` gives back), or the ``nn.MultiheadAttention``. It survives unloading, deep
  copies and wrappers, and :func:`merge_records` finds it from any root. ``unmerge_lora``
  removes it.
* **The base fingerprint, in what is saved.** A model object that never saw lightning-lora can
  hold merged weights too (``load_state_dict`` of a merged model's state dict). Its weights are
  the only witness: :func:`base_fingerprint` samples every adapted weight at 64 fixed positions
  while the adapter trains, and :func:`check_base` compares a model's weights against it
  (after rounding both to the coarser of the two dtypes, so a base cast to bf16 still counts as
  the same) and says when the difference is this adapter's ``ΔW``.

Neither lives in the state dict itself: a buffer would break ``load_state_dict(strict=True)``
into a model that never saw lightning-lora, and a state dict's ``_metadata`` reaches no code of
ours when such a model loads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .dtensors import is_dtensor
from .errors import LoRAStateError
from .layers import LoRAWrapper
from .names import parse_file_key, parse_weight_name, weight_name
from .params import adapter_entries
from .state import AdaptedWeight, adapted_weights

MERGED_ATTR = "_lightning_lora_merged"
SAMPLES = 64


@dataclass(frozen=True)
class MergeRecord:
    """Adapter ``adapter`` (content ``digest``) was merged into ``tensor`` (rows ``label``) of the
    module holding this record."""

    tensor: str
    label: str
    adapter: str
    digest: str


def update_digest(A: Tensor, B: Tensor, scale: float, magnitude: Tensor | None = None) -> str:
    """A short hash of ``(A, B, scale)`` and a DoRA adapter's magnitude: equal for the same
    adapter in memory and in its file."""
    h = hashlib.sha256(f"{tuple(A.shape)}{tuple(B.shape)}{A.dtype}{float(scale)!r}".encode())
    for t in (A, B) if magnitude is None else (A, B, magnitude):
        # a copy: numpy would pin the storage, which FSDP frees (resizes) after gathering
        h.update(t.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _owner(model: nn.Module, target: AdaptedWeight) -> nn.Module:
    if isinstance(target.layer, LoRAWrapper):
        return target.layer.base_layer
    return model.get_submodule(parse_weight_name(target.name).module)


def record_merge(model: nn.Module, target: AdaptedWeight, names: Iterable[str]) -> None:
    """Note on the weight's owner that adapters ``names`` are now inside ``target.weight``."""
    parsed = parse_weight_name(target.name)
    records = _owner(model, target).__dict__.setdefault(MERGED_ATTR, [])
    for name in names:
        digest = update_digest(*target.layer.update(name), target.layer.magnitude(name))
        records.append(MergeRecord(parsed.tensor, parsed.label, name, digest))


def forget_merge(model: nn.Module, target: AdaptedWeight, names: Iterable[str]) -> None:
    """Undo :func:`record_merge` for adapters ``names`` (after ``unmerge``)."""
    parsed, names = parse_weight_name(target.name), set(names)
    owner = _owner(model, target)
    kept = [
        r
        for r in owner.__dict__.get(MERGED_ATTR, [])
        if not (r.adapter in names and (r.tensor, r.label) == (parsed.tensor, parsed.label))
    ]
    if kept:
        owner.__dict__[MERGED_ATTR] = kept
    else:
        owner.__dict__.pop(MERGED_ATTR, None)


def merge_records(model: nn.Module) -> dict[str, list[MergeRecord]]:
    """Every merge the weights of ``model`` hold, by adapted-weight name (:mod:`~lightning_lora.names`)."""
    wrapped = {id(m.base_layer): path for path, m in model.named_modules() if isinstance(m, LoRAWrapper)}
    found: dict[str, list[MergeRecord]] = {}
    for path, module in model.named_modules():
        path = wrapped.get(id(module), path)  # a wrapped Linear goes by its LoRALinear's name
        for record in module.__dict__.get(MERGED_ATTR, []):
            found.setdefault(weight_name(path, record.tensor, record.label), []).append(record)
    return found


# -------------------------------------------------------------------------------- fingerprint


def _positions(shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """``SAMPLES`` positions spread evenly over a ``(d_out, d_in)`` weight, as (rows, cols)."""
    numel = shape[0] * shape[1]
    flat = torch.linspace(0, numel - 1, min(SAMPLES, numel), dtype=torch.float64).round().long()
    return (flat // shape[1]).to(device), (flat % shape[1]).to(device)


def _sampled(target: AdaptedWeight) -> Tensor | None:
    if is_dtensor(target.weight):  # FSDP2's shard: sampling it would be a collective; left out as FSDP1's
        return None
    region = target.layer.region(target.weight)
    if (
        region.device.type == "meta"
        or not region.is_floating_point()
        or tuple(region.shape) != (target.layer.d_out, target.layer.d_in)  # a shard (FSDP), a packed weight
    ):
        return None
    rows, cols = _positions(region.shape, region.device)
    return region.detach()[rows, cols].float().cpu()


def base_fingerprint(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, Any]]:
    """``{weight name: {"dtype": str, "values": (≤64,) float32}}``: each adapted weight of
    ``adapter_name`` sampled at fixed positions, as it is now (weights holding a merged adapter,
    and sharded or packed ones, are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for target in adapted_weights(model):
        if (adapter_name is not None and adapter_name not in target.layer.lora_A) or target.layer.merged_adapters:
            continue
        values = _sampled(target)
        if values is not None:
            out[target.name] = {"dtype": str(target.weight.dtype).removeprefix("torch."), "values": values}
    return out


def check_base(
    model: nn.Module,
    fingerprint: Mapping[str, Mapping[str, Any]],
    adapter_name: str,
    state_dict: Mapping[str, Tensor] | None = None,
) -> None:
    """Refuse (:class:`LoRAStateError`) if the adapted weights of ``model`` are not the ones
    ``fingerprint`` was taken from. ``state_dict`` (e.g. the checkpoint being restored) supplies
    the adapter's ``A``/``B`` to tell whether the difference is exactly its ``ΔW``; without it,
    the model's own are used."""
    differing = []
    for target in adapted_weights(model):
        saved = fingerprint.get(target.name)
        current = _sampled(target)
        if saved is None or current is None or target.layer.merged_adapters or current.shape != saved["values"].shape:
            continue
        coarse = _coarser(getattr(torch, saved["dtype"]), target.weight.dtype)
        a, b = current.to(coarse).float(), saved["values"].float().to(coarse).float()
        tolerance = 0 if saved["dtype"] == str(target.weight.dtype).removeprefix("torch.") else 1
        if not _close(a, b, coarse, ulps=tolerance):
            differing.append((target, current, saved["values"].float(), coarse))
    if not differing:
        return
    target, current, saved, coarse = differing[0]
    delta = _delta_at(model, target, adapter_name, state_dict)
    count = f"{len(differing)} of the adapted weights differ (first: {target.name!r})"
    if delta is not None and delta[0].abs().max() > 0 and _close(current, saved + delta[0], coarse, 2, delta[1]):
        raise LoRAStateError(
            f"this model's weights already hold this adapter's ΔW: {count}, by exactly ΔW. Restoring the adapter "
            f"onto them would add ΔW twice (W + 2ΔW). The model was merged (merge_on_fit_end=True, merge_lora, or "
            f"a merged state dict loaded into it): evaluate it as it is (ckpt_path=None), or build the base model "
            f"afresh, as for training, and restore into that."
        )
    raise LoRAStateError(
        f"this model's base weights are not the ones this adapter was trained on: {count} at the sampled "
        f"positions (largest difference {float((current - saved).abs().max()):.3g}). An adapter-only checkpoint "
        f"restores the adapter alone, onto the base as the model is built: build it exactly as for training "
        f"(same pretrained weights, no adapter merged into them)."
    )


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _close(a: Tensor, b: Tensor, dtype: torch.dtype, ulps: int, terms: Tensor | float = 0.0) -> bool:
    """``a == b`` within ``ulps`` roundings of ``dtype`` (of the larger, plus ``terms``: the size
    of the products a float32 ``B A`` summed, whose rounding a merge carries)."""
    if ulps == 0:
        return torch.equal(a, b)
    bound = ulps * torch.finfo(dtype).eps * (torch.maximum(a.abs(), b.abs()) + terms) + torch.finfo(dtype).tiny
    return bool(((a - b).abs() <= bound).all())


def _delta_at(
    model: nn.Module, target: AdaptedWeight, adapter_name: str, state_dict: Mapping[str, Tensor] | None
) -> tuple[Tensor, Tensor] | None:
    """``ΔW`` of ``adapter_name`` in ``target`` at the sampled positions (float64 → float32), and
    ``scale · Σ|B||A|`` there (how large the summed products are)."""
    if adapter_name not in target.layer.lora_A:
        return None
    halves = {}
    for entry in adapter_entries(model, adapter_name, include_trainable=False):
        parsed = parse_file_key(entry.file_key)
        if parsed is not None and parsed.name == target.name and parsed.part in ("A", "B"):
            source = state_dict.get(entry.state_key) if state_dict is not None else None
            halves[parsed[1]] = (source if source is not None else entry.tensor).detach().double().cpu()
    if set(halves) != {"A", "B"}:
        return None
    rows, cols = _positions(torch.Size((target.layer.d_out, target.layer.d_in)), torch.device("cpu"))
    scale = target.layer.specs[adapter_name].scale
    products = scale * halves["B"][rows] * halves["A"][:, cols].T
    return products.sum(dim=1).float(), products.abs().sum(dim=1).float()
