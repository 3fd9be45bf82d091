"""What did the adapters learn? Spectra of ΔW and subspace overlap between adapters.

Works on any model with LoRA layers (trained by the callback, loaded from files, or injected by
hand). The measures follow Hu et al. 2021, §7:

* the singular values of ``ΔW = (alpha/r) · B A`` per adapted weight, and its *effective rank*
  ``exp(H(p))``, ``p_i = σ_i / Σσ`` (Roy & Vetterli 2007): how many directions the update really
  uses, a number between 1 and ``r``;
* ``‖ΔW‖_F / ‖W‖_F``: how far training moved the weight (§7.3 finds ΔW small next to W);
* the normalised subspace similarity of two adapters' ``A`` matrices (§7.2)::

      φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j)   ∈ [0, 1]

  where ``Uⁱ`` holds the top-``i`` right-singular vectors of ``A`` (``A`` is ``r × d_in``, so
  these live in the input space). 1 means one subspace contains the other, 0 that they are
  orthogonal. The paper finds the top directions of an r=8 and an r=64 adapter shared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import quantized
from .layers import LoRALinear
from .state import adapted_weights


@dataclass(frozen=True)
class DeltaStats:
    """Spectrum and size of one adapted weight's ``ΔW``."""

    name: str
    r: int
    singular_values: list[float]
    effective_rank: float
    delta_norm: float
    weight_norm: float

    @property
    def relative_norm(self) -> float:
        """``‖ΔW‖_F / ‖W‖_F``."""
        return self.delta_norm / self.weight_norm if self.weight_norm else math.inf

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "relative_norm": self.relative_norm}


def effective_rank(singular_values: Tensor) -> float:
    """``exp(entropy(σ / Σσ))``: 1 for a single direction, ``k`` for ``k`` equal ones, 0 for ΔW = 0."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def delta_singular_values(A: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """Singular values of ``ΔW = scaling · B A`` (``A: r × d_in``, ``B: d_out × r``), largest
    first, without forming ``ΔW``: with ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (QR, orthonormal
    ``Q``), ``ΔW = Q_b (R_b R_aᵀ) Q_aᵀ`` has the spectrum of the small ``r × r`` core."""
    _, r_b = torch.linalg.qr(B.detach().float() * scaling)
    _, r_a = torch.linalg.qr(A.detach().float().T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def delta_stats(model: nn.Module, adapter_name: str = "default") -> list[DeltaStats]:
    """One :class:`DeltaStats` per weight adapted by ``adapter_name``, in model order."""
    out = []
    for target in adapted_weights(model):
        layer = target.layer
        if adapter_name not in layer.lora_A:
            continue
        sigma = delta_singular_values(*layer.update(adapter_name))
        if isinstance(layer, LoRALinear) and quantized.is_packed(target.weight):
            weight = quantized.dequantized(layer.base_layer)
        else:
            weight = layer.region(target.weight).detach().float()
        out.append(
            DeltaStats(
                name=target.name,
                r=layer.specs[adapter_name].r,
                singular_values=sigma.tolist(),
                effective_rank=effective_rank(sigma),
                delta_norm=float(sigma.norm()),
                weight_norm=float(weight.norm()),
            )
        )
    return out


def top_right_singular_vectors(A: Tensor, k: int) -> Tensor:
    """The top-``k`` right-singular vectors of ``A (r × d_in)`` as columns, ``(d_in × k)``."""
    if not 1 <= k <= min(A.shape):
        raise ValueError(f"k must be between 1 and min{tuple(A.shape)} = {min(A.shape)}, got {k}")
    _, _, vh = torch.linalg.svd(A.detach().double(), full_matrices=False)
    return vh[:k].T


def subspace_similarity(A1: Tensor, A2: Tensor, i: int, j: int) -> float:
    """φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) (Hu et al. 2021, §7.2), in [0, 1]."""
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must share d_in, got {tuple(A1.shape)} and {tuple(A2.shape)}")
    u1, u2 = top_right_singular_vectors(A1, i), top_right_singular_vectors(A2, j)
    return float((u1.T @ u2).pow(2).sum() / min(i, j))


def subspace_similarity_grid(A1: Tensor, A2: Tensor, max_i: int | None = None, max_j: int | None = None) -> Tensor:
    """φ for every ``i ≤ max_i``, ``j ≤ max_j`` (a ``max_i × max_j`` grid; entry ``[i-1, j-1]``),
    the paper's Figure 3 heat map. One SVD per matrix: prefix sums of the squared overlaps."""
    max_i = max_i or min(A1.shape)
    max_j = max_j or min(A2.shape)
    u1, u2 = top_right_singular_vectors(A1, max_i), top_right_singular_vectors(A2, max_j)
    overlap = (u1.T @ u2).pow(2)  # [a, b] = (u1_a · u2_b)²
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U₁ⁱᵀ U₂ʲ‖²_F
    i = torch.arange(1, max_i + 1, dtype=cumulative.dtype)[:, None]
    j = torch.arange(1, max_j + 1, dtype=cumulative.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def summary_metrics(stats: Iterable[DeltaStats], prefix: str = "lora_delta/") -> dict[str, float]:
    """Scalar summaries for loggers: mean effective rank and relative norm over weights."""
    stats = list(stats)
    if not stats:
        return {}
    return {
        f"{prefix}effective_rank_mean": sum(s.effective_rank for s in stats) / len(stats),
        f"{prefix}relative_norm_mean": sum(s.relative_norm for s in stats) / len(stats),
        f"{prefix}relative_norm_max": max(s.relative_norm for s in stats),
    }
