"""An adapter cut down to smaller ranks: each ``ΔW`` replaced by its best approximation.

For ``ΔW = s · B A`` with ``s·B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (QR) and ``R_b R_aᵀ = U Σ Vᵀ``
(the ``r × r`` core's SVD), the best rank-``k`` approximation (Eckart–Young) is
``B_k A_k`` with ``B_k = Q_b U_k Σ_k^½`` and ``A_k = Σ_k^½ (Q_a V_k)ᵀ``, at scale 1. The ranks
come from :func:`~lightning_lora.advisor.suggest_ranks` (an energy share or a parameter budget)
or are given. :func:`resize_adapter` does it in a model (then ``save_adapter`` writes exact
``rank_pattern``/``alpha_pattern`` entries); :func:`resize_adapter_file` from one adapter
directory to another, with no model, recording the energy each weight kept.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import torch
from torch import Tensor, nn

from .adapter_file import AdapterFile, read_adapter
from .advisor import RankSuggestion, spectra, suggest_ranks
from .base_init import changes_base
from .config import AdapterSpec
from .errors import AdapterFileError, LoRAConfigError, LoRAStateError
from .io import write_adapter_files
from .names import FILE_PREFIX, file_key, parse_weight_name
from .peft_format import MATH_KEYS
from .state import adapted_weights, lora_config

_DORA = (
    "{what} is a DoRA adapter: its weight is m ⊙ (W + s·B A) / ‖W + s·B A‖, so the share of ‖s·B A‖² a "
    "truncation keeps does not say how far its outputs move; resizing DoRA adapters is not implemented."
)


def truncate(A: Tensor, B: Tensor, scale: float, k: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``k`` approximation of ``ΔW = scale · B A`` as ``(A_k (k, d_in), B_k
    (d_out, k))`` with scale 1, in float32, and the share of ``‖ΔW‖²`` it keeps."""
    q_b, r_b = torch.linalg.qr(B.detach().float() * scale)
    q_a, r_a = torch.linalg.qr(A.detach().float().T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(k, sigma.numel())
    root = sigma[:k].sqrt()
    B_k = (q_b @ u[:, :k]) * root
    A_k = root[:, None] * (vh[:k] @ q_a.T)
    total = float(sigma.pow(2).sum())
    return A_k, B_k, 1.0 if total == 0 else float(sigma[:k].pow(2).sum()) / total


def resize_adapter(
    model: nn.Module,
    ranks: int | dict[str, int] | None = None,
    energy: float | None = None,
    budget: int | None = None,
    adapter_name: str = "default",
) -> RankSuggestion:
    """Replace adapter ``adapter_name`` of every weight by its best approximation at a smaller
    rank: ``ranks`` (one for all, or per weight name), else :func:`suggest_ranks` with ``energy``
    or ``budget``. The new adapters have scale 1 (``alpha = r``, or ``√r`` with rsLoRA), so
    :func:`~lightning_lora.io.save_adapter` writes them with exact ``rank_pattern`` /
    ``alpha_pattern`` entries; their forward equals ``W + ΔW_k``. Refused on a merged adapter."""
    config = lora_config(model, adapter_name)
    suggestion = _suggestion(model, ranks, energy, budget, adapter_name)
    wanted = suggestion.ranks
    targets = [t for t in adapted_weights(model) if adapter_name in t.layer.specs and t.name in wanted]
    if config.use_dora:
        raise LoRAStateError(_DORA.format(what=f"adapter {adapter_name!r}"))
    if changes_base(config.init):
        raise LoRAStateError(
            f"adapter {adapter_name!r} was initialised with init={config.init!r}, so its B A holds W's principal part, "
            f"not a change of the model: save it (converted to plain LoRA) and resize that file instead."
        )
    merged = [t.name for t in targets if adapter_name in t.layer.merged_adapters]
    if merged:
        raise LoRAStateError(f"adapter {adapter_name!r} is merged into {merged[0]!r}; unmerge_lora(model) first.")
    for t in targets:
        layer, spec = t.layer, t.layer.specs[adapter_name]
        A_k, B_k, _ = truncate(*layer.update(adapter_name), wanted[t.name])
        k = A_k.shape[0]
        alpha = _unit_alpha(k, config.use_rslora)
        new = AdapterSpec(r=k, alpha=alpha, dropout=spec.dropout, init=spec.init, use_rslora=config.use_rslora)
        old_A, active = layer.lora_A[adapter_name], list(layer.active_adapters)
        requires_grad = old_A.requires_grad
        layer.delete_adapter(adapter_name)
        layer.add_adapter(adapter_name, new, old_A.dtype, old_A.device)
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(A_k.reshape(layer.lora_A[adapter_name].shape))
            layer.lora_B[adapter_name].copy_(B_k.reshape(layer.lora_B[adapter_name].shape))
        layer.lora_A[adapter_name].requires_grad_(requires_grad)
        layer.lora_B[adapter_name].requires_grad_(requires_grad)
        layer.set_active(active)
    return suggestion


def _suggestion(
    source: nn.Module | AdapterFile,
    ranks: int | dict[str, int] | None,
    energy: float | None,
    budget: int | None,
    adapter_name: str = "default",
) -> RankSuggestion:
    """The ranks to cut to: given (one for all, or per weight; never above the trained rank),
    else suggested from ``energy`` (default 0.9) or ``budget``."""
    if ranks is None:
        return suggest_ranks(source, energy if energy is not None else 0.9, budget, adapter_name)
    found = spectra(source, adapter_name)
    wanted = {s.name: ranks for s in found} if isinstance(ranks, int) else dict(ranks)
    unknown = sorted(set(wanted) - {s.name for s in found})
    bad = {n: k for n, k in wanted.items() if isinstance(k, bool) or not isinstance(k, int) or k < 1}
    if unknown or bad:
        what = f"names weights that are not adapted: {unknown[:3]}" if unknown else f"must be positive ints, got {bad}"
        raise LoRAConfigError(f"ranks={ranks!r} {what}.")
    chosen = {s.name: min(wanted.get(s.name, s.r), s.r) for s in found}
    return RankSuggestion(
        ranks=chosen,
        kept={s.name: s.kept(chosen[s.name]) for s in found},
        params=sum(s.params(chosen[s.name]) for s in found),
        params_before=sum(s.params(s.r) for s in found),
        rule="given ranks",
        spectra=found,
    )


def resize_adapter_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    ranks: int | dict[str, int] | None = None,
    energy: float | None = None,
    budget: int | None = None,
) -> RankSuggestion:
    """Write the adapter of directory ``path`` cut down to smaller ranks into directory
    ``output`` (a normal adapter in PEFT's format, no model needed): ``ranks`` (one for all, or
    per weight), else :func:`~lightning_lora.advisor.suggest_ranks` with ``energy`` or
    ``budget``. Weights get scale 1 (``alpha = r``, or ``√r`` with rsLoRA), exact
    ``rank_pattern``/``alpha_pattern`` entries, and the metadata records, per weight, the share
    of ``‖ΔW‖²`` kept (``resized.energy_kept``). Trainable-module tensors are copied as they are."""
    file = read_adapter(path)
    if file.magnitudes:
        raise AdapterFileError(_DORA.format(what=str(path)))
    blocks = [n for n in file.pairs if parse_weight_name(n).label]
    if blocks:
        raise AdapterFileError(
            f"{path} adapts blocks of nn.MultiheadAttention ({blocks[0]!r}), which this file-to-file resize does "
            f"not rewrite; resize them in a model: load_adapter(model, path), resize_adapter(model, ...), "
            f"save_adapter(model, output)."
        )
    suggestion = _suggestion(file, ranks, energy, budget)
    rslora = file.config.get("use_rslora") is True
    tensors, new_ranks = {}, {}
    for name, (A, B) in file.pairs.items():
        A_k, B_k, _ = truncate(*file.update(name), suggestion.ranks[name])
        k = new_ranks[name] = A_k.shape[0]
        embedding = name in file.embedding
        tensors[file_key(name, "A", embedding)] = A_k.reshape(k, *A.shape[1:]).to(A.dtype).contiguous()
        tensors[file_key(name, "B", embedding)] = B_k.reshape(B.shape[0], k, *B.shape[2:]).to(B.dtype).contiguous()
    tensors.update({FILE_PREFIX + key: t.contiguous() for key, t in file.trainable.items()})
    r = Counter(new_ranks.values()).most_common(1)[0][0]
    config = {
        **file.config,
        "r": r,
        "lora_alpha": _unit_alpha(r, rslora),
        "rank_pattern": {n: k for n, k in new_ranks.items() if k != r},
        "alpha_pattern": {n: _unit_alpha(k, rslora) for n, k in new_ranks.items() if k != r},
    }
    extras = {
        **file.extras,
        "config": {k: config.get(k) for k in MATH_KEYS},
        "resized": {"from": str(path), "rule": suggestion.rule, "energy_kept": suggestion.kept},
    }
    write_adapter_files(output, config, tensors, extras)
    return suggestion


def _unit_alpha(k: int, rslora: bool) -> float:
    """The ``alpha`` that makes the scale 1 at rank ``k``: the truncated ``B_k A_k`` is ``ΔW_k``."""
    return math.sqrt(k) if rslora else float(k)
