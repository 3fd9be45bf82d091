"""Rank advice from a trained adapter: how many directions each ``ΔW`` really uses, the smallest
per-layer ranks that keep a given share of it, and the adapter cut down to those ranks.

For one adapted weight with singular values ``σ₁ ≥ … ≥ σ_r`` of ``ΔW = s · B A`` (computed from
the ``r × r`` core, :func:`~lightning_lora.analysis.delta_singular_values`; ``ΔW`` is never
formed), the best rank-``k`` approximation keeps ``Σ_{i≤k} σᵢ² / Σ σᵢ²`` of the update's energy
``‖ΔW‖²_F`` (Eckart–Young). :func:`suggest_ranks` picks, per weight, the smallest ``k`` that
keeps a share ``energy`` — or, given a ``budget`` of trainable parameters, the largest singular
values across all weights that fit in it. :mod:`lightning_lora.resize` cuts an adapter down to
those ranks.

The suggestion is a measurement of one trained adapter, not a guarantee: whether a model
retrained at the suggested ranks matches is what ``experiments/rank_advisor`` tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapter_file import AdapterFile, read_adapter
from .analysis import delta_singular_values, effective_rank
from .errors import LoRAConfigError, LoRAStateError
from .state import adapted_weights
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
