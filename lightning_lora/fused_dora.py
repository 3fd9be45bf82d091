"""DoRA's fast path: the reference formula of :meth:`~lightning_lora.layers.LoRALinear.dora_output`
in one autograd Function that never makes a pass over the ``(N, d_out)`` activations to scale
them, and keeps only the output for the magnitude's gradient.

With ``x: (N, d_in)``, a frozen ``W: (d_out, d_in)`` and bias ``b``, ``A: (r, d_in)``,
``B: (d_out, r)``, ``s = alpha / r``, the magnitude ``m: (d_out,)``, the row norms
``n = ‖W + s·B A‖`` (a constant, as in the paper's §4.3 and PEFT) and ``c = m / n``::

    y = c ⊙ x (W + s·B A)ᵀ + b  =  x (c⊙W)ᵀ + s · (x Aᵀ)(c⊙B)ᵀ + b

so the per-row scale rides on the weights (``c⊙W`` is a weight-sized temporary, freed at once;
at LLM batch sizes a weight is several times smaller than the activations it would scale)::

    forward   a = x Aᵀ                        (N, r)
              y = s · a (c⊙B)ᵀ + b;  y += x (c⊙W)ᵀ
    backward  dm = Σ_rows dy ⊙ (y − b) / m    = Σ_rows dy ⊙ x (W + s·B A)ᵀ / n, from the saved y
              g  = s · dy (c⊙B)               (N, r)
              dB = c ⊙ (s · dyᵀ a);  dA = gᵀ x;  dx = g A + dy (c⊙W)

Saved for backward: ``x`` and ``a`` (as LoRA's fast path), and the output ``y``, which the next
layer often keeps anyway (a SiLU, a product): the reference path keeps ``x (W + s·B A)ᵀ``
beside ``y``, PEFT two ``(N, d_out)`` tensors. Reading the unscaled product back from ``y``
divides by ``m``: a magnitude of exactly zero gives that row a NaN gradient (loud, never
silent), where the reference path gives a finite one.

The norms come from the ``r``-sized factors instead of forming ``W + s·B A``::

    ‖Wᵢ + s·(B A)ᵢ‖² = ‖Wᵢ‖² + Bᵢ · (2s · (W Aᵀ)ᵢ + s² · (B A Aᵀ)ᵢ)

``‖Wᵢ‖²`` is cached per weight (recomputed when the weight's storage or version changes, e.g.
after a merge), ``W Aᵀ`` is one ``(d_out, r)`` GEMM: no ``d_out × d_in`` float32 temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fused


@torch.no_grad()
def row_norms(weight: Tensor, A: Tensor, B: Tensor, scale: float, cache: dict) -> Tensor:
    """``‖W + s·B A‖`` per row, ``(d_out,)`` float32, from ``W Aᵀ`` and ``A Aᵀ`` (see the module
    docstring); ``cache`` keeps ``‖Wᵢ‖²`` for this ``weight`` between calls."""
    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    if cache.get("key") != key:
        wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
        cache["key"], cache["w2"] = key, torch.linalg.vector_norm(weight, dim=1, dtype=wide).float().square()
    Af, Bf = A.float(), B.float()
    t = (weight @ A.to(weight.dtype).t()).float()  # W Aᵀ: (d_out, r)
    t = torch.addmm(t, Bf, Af @ Af.t(), beta=2 * scale, alpha=scale * scale)  # 2s·W Aᵀ + s²·B A Aᵀ
    return (cache["w2"] + (t * Bf).sum(1)).clamp_min_(0).sqrt_()


class DoRALinearFunction(torch.autograd.Function):
    """``y = (m / n) ⊙ x (W + s·B A)ᵀ + b`` with frozen ``W``, ``b`` and constant ``n``;
    gradients for ``x``, ``A``, ``B`` and ``m``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        scaling: float,
        magnitude: Tensor,
        norm: Tensor,
    ) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        c = (magnitude.float() / norm).to(x.dtype).unsqueeze(1)  # (d_out, 1)
        a = x2 @ A.t()
        cB = B * c
        if bias is None:
            y = a.new_empty(a.shape[0], B.shape[0]).addmm_(a, cB.t(), beta=0, alpha=scaling)
        else:
            y = torch.addmm(bias, a, cB.t(), alpha=scaling)
        y.addmm_(x2, (weight * c).t())  # c⊙W: a temporary of W's size, gone after this GEMM
        ctx.save_for_backward(x2, a, weight, bias, A, B, magnitude, c, y)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, a, weight, bias, A, B, magnitude, c, y = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, _, _, need_A, need_B, _, need_m, _ = ctx.needs_input_grad
        dm = None
        if need_m:  # Σ dy ⊙ (y − b) / m, accumulated in fp32
            num = (dy2 * y).sum(0, dtype=torch.float32)
            if bias is not None:
                num -= bias.float() * dy2.sum(0, dtype=torch.float32)
            dm = (num / magnitude.float()).to(magnitude.dtype)
        g = a.new_empty(a.shape).addmm_(dy2, B * c, beta=0, alpha=s) if (need_A or need_x) else None
        dA = g.t() @ x2 if need_A else None
        dB = (dy2.t() @ a).mul_(c * s) if need_B else None
        dx = None
        if need_x:
            dx2 = g @ A
            dx2.addmm_(dy2, weight * c)
            dx = dx2.view(ctx.x_shape)
        return dx, None, None, dA, dB, None, dm, None


def fast_forward(
    base: nn.Module, x: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, scaling: float, cache: dict
) -> Tensor | None:
    """``y`` through :class:`DoRALinearFunction` when it applies (a plain frozen ``nn.Linear``,
    one dtype, or autocast's dtype after casting once as autocast would), else ``None``."""
    if fused.fits(base, x, A, B) and magnitude.dtype == x.dtype:
        W, b, dtype = base.weight, base.bias, None
    else:
        dtype = fused.autocast_dtype(base, x, A, B)
        if dtype is None or magnitude.dtype not in fused.AUTOCAST_ELIGIBLE:
            return None
        W, b = base.weight.to(dtype), None if base.bias is None else base.bias.to(dtype)
    norm = row_norms(base.weight, A, B, scaling, cache)  # from the stored tensors, as the reference
    if dtype is not None:
        x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return DoRALinearFunction.apply(x, W, b, A, B, scaling, magnitude, norm)
