"""Initialisations that move part of the frozen weight into the adapter: PiSSA and OLoRA, as PEFT
defines them.

For a weight ``W: (d_out, d_in)`` (in float32) and scale ``s``:

* ``"pissa"`` (Meng et al. 2024): the top-``r`` singular triplets ``W ≈ U_r S_r V_rᵀ``;
  ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``. ``"pissa_niter_K"`` takes them from
  ``torch.svd_lowrank`` with ``K`` subspace iterations (fast, randomised).
* ``"olora"`` (Büyükakyüz 2024): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``.

Then ``W ← W − s·B A`` (the residual), so the model computes the same function at step 0, and
training starts from the principal directions instead of from zero. Because ``W`` changed, the
adapter alone no longer describes a change of the original model: ``ΔW_trained = s·(B A − B₀ A₀)``.
The layer keeps ``A₀``/``B₀`` so that :func:`~lightning_lora.io.save_adapter` can write PEFT's
conversion to a plain LoRA adapter for the *original* base: rank ``2r``,
``A' = [A; A₀]``, ``B' = [B, −B₀]``, ``alpha' = 2·alpha`` (``√2·alpha`` with rsLoRA), so the scale
is unchanged (PEFT's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from . import quantized

BASE_INIT_RE = re.compile(r"pissa|pissa_niter_[1-9][0-9]*|olora")
"""The ``init`` values that change the base weights (PEFT's spellings)."""

DENSE = (torch.float32, torch.float16, torch.bfloat16)


def changes_base(init: str) -> bool:
    """Whether ``init`` moves part of ``W`` into the adapter."""
    return BASE_INIT_RE.fullmatch(init) is not None


@torch.no_grad()
def principal_factors(weight: Tensor, r: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """``(A (r, d_in), B (d_out, r))`` in float32 from the ``(d_out, d_in)`` ``weight``, as PEFT's
    ``pissa_init`` / ``olora_init`` compute them."""
    w = weight.float()
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r] / scale, Vh[:r]
    else:  # pissa_niter_K
        U, S, V = torch.svd_lowrank(w, r, niter=int(init.rsplit("_", 1)[1]))
        S, Vh = S / scale, V.t()
    root = torch.diag(torch.sqrt(S))
    return root @ Vh, U @ root


def refusal(base: nn.Module, transposed: bool, init: str) -> str | None:
    """Why ``init`` cannot run on ``base`` (a module about to be wrapped), or ``None``."""
    if quantized.is_quantized(base):
        return (
            f"init={init!r} rewrites the base weight, which a quantized {type(base).__name__} stores packed; "
            "initialise on the dense base and quantize the residual afterwards, as PEFT recommends"
        )
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or weight.dtype not in DENSE:
        return f"init={init!r} needs a float32, float16 or bfloat16 weight"
    if init == "olora" and transposed:
        return "OLoRA is implemented for nn.Linear weights (stored (d_out, d_in)) only, as in PEFT"
    return None
