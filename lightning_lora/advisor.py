"""Rank advice from a trained adapter: how many directions each ``ΔW`` really uses, the smallest
per-layer ranks that keep a given share of it, and the adapter cut down to those ranks.

For one adapted weight with singular values ``σ₁ ≥ … ≥ σ_r`` of ``ΔW = s · B A`` (computed from
the ``r × r`` core, :func:`~lightning_lora.analysis.delta_singular_values`; ``ΔW`` is never
formed), the best rank-``k`` approximation keeps ``Σ_{i≤k} σᵢ² / Σ σᵢ²`` of the update's energy
``‖ΔW‖²_F`` (Eckart–Young). :func:`suggest_ranks` picks, per weight, the smallest ``k`` that
keeps a share ``energy`` — or, given a ``budget`` of trainable parameters, the largest singular
values across all weights that fit in it. :func:`resize_adapter` replaces each adapter by that
best approximation: ``B_k = Q_b U_k Σ_k^½``, ``A_k = Σ_k^½ (Q_a V_k)ᵀ`` with scale 1, where
``s·B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (QR) and ``R_b R_aᵀ = U Σ Vᵀ``.

The suggestion is a measurement of one trained adapter, not a guarantee: whether a model
retrained at the suggested ranks matches is what ``experiments/rank_advisor`` tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapter_file import AdapterFile, read_adapter
from .analysis import delta_singular_values, effective_rank
from .config import AdapterSpec
from .errors import LoRAConfigError, LoRAStateError
from .state import adapted_weights, lora_config
from .tables import render_table

ENERGIES = (0.9, 0.95, 0.99)
"""The shares of ``‖ΔW‖²`` the tables report a rank for."""


@dataclass(frozen=True)
class WeightSpectrum:
    """The spectrum of one adapted weight's ``ΔW``: its name, trained rank, ``(d_out, d_in)``
    and singular values, largest first."""

    name: str
    r: int
    shape: tuple[int, int]
    singular_values: tuple[float, ...]

    @property
    def energy(self) -> float:
        """``‖ΔW‖²_F = Σ σᵢ²``."""
        return sum(s * s for s in self.singular_values)

    def kept(self, k: int) -> float:
        """Share of the energy the best rank-``k`` approximation keeps (1 for ``ΔW = 0``)."""
        total = self.energy
        return 1.0 if total == 0 else sum(s * s for s in self.singular_values[:k]) / total

    def rank_for(self, energy: float) -> int:
        """The smallest rank whose best approximation keeps ``energy`` of ``‖ΔW‖²`` (at least 1:
        an adapter of rank 0 does not exist; a zero ``ΔW`` gets 1)."""
        for k in range(1, len(self.singular_values) + 1):
            if self.kept(k) >= energy - 1e-12:
                return k
        return len(self.singular_values)

    def params(self, k: int) -> int:
        """Trainable parameters of a rank-``k`` adapter of this weight: ``k · (d_in + d_out)``."""
        return k * (self.shape[0] + self.shape[1])

    @property
    def effective_rank(self) -> float:
        return effective_rank(torch.tensor(self.singular_values))


@dataclass(frozen=True)
class RankSuggestion:
    """Per-weight ranks, what they cost and keep, and the ``rank_pattern`` that trains them."""

    ranks: dict[str, int]
    kept: dict[str, float]
    params: int
    params_before: int
    rule: str
    spectra: list[WeightSpectrum] = field(repr=False, default_factory=list)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """Every weight's rank under its exact name (PEFT's ``rank_pattern``; our
        ``LoRAConfig.rank_pattern`` reads the same)."""
        return dict(self.ranks)

    def table(self) -> str:
        """One row per weight: trained rank, effective rank, the ranks for 90/95/99% of the
        energy, the suggested rank, the energy it keeps and its parameters."""
        rows = [("weight", "r", "eff. rank", *(f"r@{e:.0%}" for e in ENERGIES), "suggested", "kept", "params")]
        for s in self.spectra:
            k = self.ranks[s.name]
            rows.append(
                (
                    s.name,
                    str(s.r),
                    f"{s.effective_rank:.1f}",
                    *(str(s.rank_for(e)) for e in ENERGIES),
                    str(k),
                    f"{self.kept[s.name]:.1%}",
                    f"{s.params(k):,}",
                )
            )
        lines = render_table(rows, rule=True)
        lines.append(
            f"{self.rule}: {self.params:,} parameters in A/B instead of {self.params_before:,} "
            f"({self.params / max(self.params_before, 1):.1%})"
        )
        return "\n".join(lines)


Source = nn.Module | AdapterFile | str | os.PathLike


def spectra(source: Source, adapter_name: str = "default") -> list[WeightSpectrum]:
    """The :class:`WeightSpectrum` of every weight adapter ``adapter_name`` adapts in a model, or
    of every weight in an adapter directory (or an :class:`~lightning_lora.io.AdapterFile`)."""
    out = []
    for name, (A, B, scale) in _updates(source, adapter_name):
        sigma = delta_singular_values(A, B, scale)
        out.append(WeightSpectrum(name, A.shape[0], (B.shape[0], A.shape[1]), tuple(sigma.tolist())))
    if not out:
        raise LoRAStateError(f"no weight is adapted by adapter {adapter_name!r}: nothing to advise on.")
    return out


def _updates(source: Source, adapter_name: str) -> Iterable[tuple[str, tuple[Tensor, Tensor, float]]]:
    if isinstance(source, nn.Module):
        return [
            (t.name, t.layer.update(adapter_name)) for t in adapted_weights(source) if adapter_name in t.layer.specs
        ]
    file = source if isinstance(source, AdapterFile) else read_adapter(source)
    return [(name, file.update(name)) for name in file.pairs]


def suggest_ranks(
    source: Source, energy: float | None = 0.9, budget: int | None = None, adapter_name: str = "default"
) -> RankSuggestion:
    """Per-weight ranks from one trained adapter (a model, or an adapter directory).

    ``energy``: for each weight, the smallest rank whose best approximation keeps that share of
    ``‖ΔW‖²_F``. ``budget`` (instead): at most that many parameters in ``A``/``B``, spent on the
    largest singular values across all weights, in order, until the next does not fit (every
    weight keeps at least rank 1, so the budget must cover ``Σ (d_in + d_out)``); a rank never
    exceeds the trained one."""
    found = spectra(source, adapter_name)
    before = sum(s.params(s.r) for s in found)
    if budget is not None:
        ranks, rule = _within_budget(found, budget), f"budget {budget:,} parameters"
    else:
        if energy is None or not 0 < energy <= 1:
            raise LoRAConfigError(f"energy must be a share in (0, 1], e.g. 0.9, got {energy!r}.")
        ranks, rule = {s.name: s.rank_for(energy) for s in found}, f"{energy:.0%} of each ‖ΔW‖²"
    return RankSuggestion(
        ranks=ranks,
        kept={s.name: s.kept(ranks[s.name]) for s in found},
        params=sum(s.params(ranks[s.name]) for s in found),
        params_before=before,
        rule=rule,
        spectra=found,
    )


def _within_budget(found: list[WeightSpectrum], budget: int) -> dict[str, int]:
    """Rank 1 everywhere, then the next singular values in order of σ² across weights, each
    costing its weight's ``d_in + d_out``, until the next one no longer fits in the budget."""
    ranks = {s.name: 1 for s in found}
    spent = sum(s.params(1) for s in found)
    if spent > budget:
        raise LoRAConfigError(
            f"budget={budget:,} parameters cannot give each of the {len(found)} weights rank 1, which "
            f"needs {spent:,}; raise the budget or adapt fewer weights."
        )
    candidates = sorted(
        ((sigma * sigma, s, k) for s in found for k, sigma in enumerate(s.singular_values[1:], start=2)),
        key=lambda c: -c[0],
    )
    for _, s, k in candidates:  # σ of one weight come largest first, so k is always the next rank
        cost = s.shape[0] + s.shape[1]
        if spent + cost > budget:
            break  # what is kept is exactly the largest singular values: no smaller one jumps the queue
        ranks[s.name], spent = k, spent + cost
    return ranks


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
    if ranks is None:
        suggestion = suggest_ranks(model, energy if energy is not None else 0.9, budget, adapter_name)
    else:
        found = spectra(model, adapter_name)
        wanted = {s.name: ranks for s in found} if isinstance(ranks, int) else dict(ranks)
        unknown = sorted(set(wanted) - {s.name for s in found})
        bad = {n: k for n, k in wanted.items() if isinstance(k, bool) or not isinstance(k, int) or k < 1}
        if unknown or bad:
            what = (
                f"names weights adapter {adapter_name!r} does not adapt: {unknown[:3]}"
                if unknown
                else f"must be positive ints, got {bad}"
            )
            raise LoRAConfigError(f"resize_adapter(ranks=...) {what}.")
        chosen = {s.name: min(wanted.get(s.name, s.r), s.r) for s in found}
        suggestion = RankSuggestion(
            ranks=chosen,
            kept={s.name: s.kept(chosen[s.name]) for s in found},
            params=sum(s.params(chosen[s.name]) for s in found),
            params_before=sum(s.params(s.r) for s in found),
            rule="given ranks",
            spectra=found,
        )
    wanted = suggestion.ranks
    targets = [t for t in adapted_weights(model) if adapter_name in t.layer.specs and t.name in wanted]
    merged = [t.name for t in targets if adapter_name in t.layer.merged_adapters]
    if merged:
        raise LoRAStateError(f"adapter {adapter_name!r} is merged into {merged[0]!r}; unmerge_lora(model) first.")
    for t in targets:
        layer, spec = t.layer, t.layer.specs[adapter_name]
        A_k, B_k, _ = truncate(*layer.update(adapter_name), wanted[t.name])
        k = A_k.shape[0]
        alpha = math.sqrt(k) if config.use_rslora else float(k)  # scale 1: B_k A_k is ΔW_k itself
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
