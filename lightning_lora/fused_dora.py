"""DoRA's fast path: the reference formula of :meth:`~lightning_lora.layers.LoRALinear.dora_output`
in one autograd Function, with fewer passes over the ``(N, d_out)`` activations and no
weight-sized temporary.

With ``x: (N, d_in)``, a frozen ``W: (d_out, d_in)`` and bias ``b``, ``A: (r, d_in)``,
``B: (d_out, r)``, ``s = alpha / r``, the magnitude ``m: (d_out,)`` and the row norms
``n = ‖W + s·B A‖`` (a constant, as in the paper's §4.3 and PEFT)::

    forward   a = x Aᵀ                          (N, r)
              z = s · a Bᵀ;  z += x Wᵀ           (N, d_out)   x (W + s·B A)ᵀ, as LoRA's fast path
              y = c ⊙ z + b,  c = m / n          in place: z is not kept
    backward  dz = c ⊙ dy
              dm = Σ_rows dy ⊙ (y − b) / m      = Σ_rows dy ⊙ z / n, read back from the saved y
              dA, dB, dx from dz exactly as LoRA's fast path from dy

Saved for backward: ``x`` and ``a`` (as LoRA's fast path), and the output ``y`` itself, which
the next layer often keeps anyway (a SiLU, a product): the reference path keeps ``z`` beside
``y``, PEFT two ``(N, d_out)`` tensors. Reading ``z`` back as ``(y − b) / c`` needs ``m ≠ 0``;
a magnitude of exactly zero gives that row a NaN gradient (loud, never silent), where the
reference path gives a finite one.

The norms come from the ``r``-sized factors instead of forming ``W + s·B A``::

    ‖Wᵢ + s·(B A)ᵢ‖² = ‖Wᵢ‖² + 2s · Bᵢ·(W Aᵀ)ᵢ + s² · Bᵢ (A Aᵀ) Bᵢᵀ

``‖Wᵢ‖²`` is cached per weight (recomputed when the weight's storage or version changes, e.g.
after a merge), ``W Aᵀ`` is one ``(d_out, r)`` GEMM: no ``d_out × d_in`` temporary per step.
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
    Bf = B.float()
    cross = ((weight @ A.to(weight.dtype).t()).float() * Bf).sum(1)  # Bᵢ · (W Aᵀ)ᵢ
    Af = A.float()
    quad = ((Bf @ (Af @ Af.t())) * Bf).sum(1)  # Bᵢ (A Aᵀ) Bᵢᵀ
    return (cache["w2"] + (2 * scale) * cross + (scale * scale) * quad).clamp_min_(0).sqrt_()


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
        a = x2 @ A.t()
        z = a.new_empty(a.shape[0], B.shape[0]).addmm_(a, B.t(), beta=0, alpha=scaling)
        z.addmm_(x2, weight.t())
        c = (magnitude.float() / norm).to(z.dtype)
        y = z.mul_(c) if bias is None else torch.addcmul(bias, z, c)  # z dies here, or is freed
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
        dz = dy2 * c
        g = a.new_empty(a.shape).addmm_(dz, B, beta=0, alpha=s) if (need_A or need_x) else None
        dA = g.t() @ x2 if need_A else None
        dB = B.new_empty(B.shape).addmm_(dz.t(), a, beta=0, alpha=s) if need_B else None
        dx = None
        if need_x:
            dx2 = g @ A
            dx2.addmm_(dz, weight)
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
