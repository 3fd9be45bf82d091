"""The fast path of :class:`~lightning_lora.layers.LoRALinear`: one autograd Function for the frozen
linear and its low-rank update together, in as few passes over the activations as cuBLAS allows.

The math is the reference formula (``layers.LoRALinear.reference_forward``); only the order of the
work changes. It is plain LoRA's: a DoRA adapter (``use_dora``) always takes the reference path. With ``x: (N, d_in)``, ``W: (d_out, d_in)``, ``A: (r, d_in)``, ``B: (d_out, r)`` and
``s = alpha / r``::

    forward   a  = x Aᵀ                  (N, r)      the only extra read of x
              y  = s · a Bᵀ [+ b]        (N, d_out)  a GEMM with K = r writes y ...
              y += x Wᵀ                  (N, d_out)  ... and the frozen GEMM adds into it (beta = 1)
    backward  g  = s · dy B              (N, r)
              dB = s · dyᵀ a             (d_out, r)
              dA = gᵀ x                  (r, d_in)
              dx = g A;  dx += dy W      (N, d_in)   the frozen GEMM again adds into the LoRA part

Saved for backward: ``x`` (by reference: the layer's input; not at all when ``A`` is frozen, as
with ``freeze_a``: only ``dA`` reads it), ``a`` (``N × r``, small), ``W``, ``A``, ``B``. Autograd
over the plain formula does the same GEMMs plus three passes over ``N × d`` tensors that this one
avoids: the add of the LoRA output into ``y``, the ``dy · s`` in backward, and the sum of the two
``dx`` parts. The scale ``s`` is the ``alpha`` of a GEMM
(with ``beta = 0`` into a fresh buffer), so it costs no kernel at all.

With dropout on the adapter's input, ``x_adapter = dropout(x)`` comes in as its own tensor (drawn
by the caller, exactly as the reference draws it): ``dA`` and the LoRA part of ``dx`` then use it,
and autograd applies the dropout mask and adds the two ``dx`` parts.

Under autocast (``precision="bf16-mixed"``) the inputs are cast once to autocast's dtype, as
autocast would cast them for a linear, and the Function runs on the cast tensors
(:func:`autocast_forward`).

On CUDA, :mod:`lightning_lora.kernels` can run each step's pair of GEMMs as one Triton kernel
(``y``; ``dx``; ``g`` with ``dB``). They are off by default: on the H200 cuBLAS's composition
above is faster at every shape measured.

Under ``torch.compile`` the reference formula is used by default: Inductor fuses its element-wise
work into neighbouring kernels itself, while an in-place ``addmm_`` would become an out-of-place
``addmm`` (a copy of ``y``). ``set_fast_path("always")`` forces the Function everywhere (to
measure it), ``"never"`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from . import kernels, quantized
from .switches import Switch

FAST_PATH_MODES = ("auto", "always", "never")
FastForward = Callable[[Tensor, Tensor, Tensor, float, "Tensor | None"], Tensor]
_mode: Switch[str] = Switch("fast path mode", "auto", FAST_PATH_MODES)


def set_fast_path(mode: str) -> None:
    """``"auto"`` (default): the Function in eager mode, the reference formula under
    ``torch.compile``; ``"always"``: the Function in both; ``"never"``: the reference formula."""
    _mode.set(mode)


def fast_path_mode() -> str:
    return _mode.value


def fast_path(mode: str) -> AbstractContextManager[None]:
    """``with fast_path("never"): ...`` runs the block with another mode, then restores it."""
    return _mode.using(mode)


def fast_path_wanted() -> bool:
    """Whether the current mode asks for the Function here (eager, or forced under compile)."""
    if _mode.value == "never":
        return False
    return _mode.value == "always" or not torch.compiler.is_compiling()


def plain_frozen_linear(base: nn.Module) -> bool:
    """The fast path computes ``x Wᵀ + b`` itself, so the base must be a plain, frozen,
    hook-free ``nn.Linear`` (a subclass or a wrapper such as FSDP's keeps its own forward)."""
    # A module's own hooks live in ``_forward_hooks`` / ``_forward_pre_hooks`` (torch 2.13); the
    # fast path would skip them, so a hooked base takes the reference path.
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    return not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def fits(base: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> bool:
    """A plain frozen ``nn.Linear``, every tensor in one dtype, outside autocast."""
    if not plain_frozen_linear(base) or not (x.dtype == base.weight.dtype == A.dtype == B.dtype):
        return False
    return not torch.is_autocast_enabled(x.device.type)


AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(base: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> torch.dtype | None:
    """Under autocast, the dtype autocast would run this layer's GEMMs in (``None`` outside it,
    or for tensors autocast leaves alone, float64 say: the reference path then runs)."""
    if not torch.is_autocast_enabled(x.device.type) or not plain_frozen_linear(base):
        return None
    if any(t.dtype not in AUTOCAST_ELIGIBLE for t in (x, base.weight, A, B)):
        return None
    return torch.get_autocast_dtype(x.device.type)


def autocast_forward(base: nn.Linear, dtype: torch.dtype) -> FastForward:
    """The fast path under autocast: cast ``x``, ``W``, ``b``, ``A`` and ``B`` to ``dtype`` once,
    as autocast casts a linear's inputs (no-ops for tensors already in it), then run the
    Function with autocast off. The casts of ``A``/``B`` are differentiable, so their gradients
    reach the stored (e.g. fp32) adapters as under autocast's own casts."""

    def run(x: Tensor, A: Tensor, B: Tensor, s: float, xa: Tensor | None) -> Tensor:
        bias = None if base.bias is None else base.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            x_adapter = None if xa is None else xa.to(dtype)
            return lora_linear(x.to(dtype), base.weight.to(dtype), bias, A.to(dtype), B.to(dtype), s, x_adapter)

    return run


class LoRALinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · x_a Aᵀ Bᵀ`` with a frozen ``W`` and ``b``; ``x_a`` is ``x`` or
    ``dropout(x)``. Gradients for ``x``, ``A``, ``B`` (and ``x_adapter``); none for ``W``, ``b``.

    ``weight`` is the frozen ``(d_out, d_in)`` tensor, or ``None`` with ``quantized_base`` a
    bitsandbytes 4/8-bit layer (QLoRA): the base then computes ``x Wᵀ + b`` itself, and its
    ``W`` is dequantized for ``dx`` in backward, never saved, as bitsandbytes' own layers do.

    ``projected``, when given, is ``a = x Aᵀ`` computed already (with ``A = None``): sibling
    layers that read one input share that GEMM (:mod:`lightning_lora.shared_inputs`). The
    Function then returns ``g = s · dy B`` as ``projected``'s gradient, and ``dA`` and the LoRA
    part of ``dx`` are the sharing Function's work."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        scaling: float,
        x_adapter: Tensor | None,
        quantized_base: nn.Module | None = None,
        projected: Tensor | None = None,
    ) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if x_adapter is None else x_adapter.reshape(-1, x_adapter.shape[-1])
        a = xa2 @ A.t() if projected is None else projected.reshape(-1, projected.shape[-1])  # (N, r)
        if quantized_base is not None:
            # The base multiplies with its own kernel (bitsandbytes dequantizes and calls a GEMM
            # in one op); autograd is off in here, so it saves nothing. The LoRA part is added
            # in place, the scale in the GEMM's alpha.
            y2 = quantized_base(x2)
            y2.addmm_(a, B.t(), alpha=scaling)
            y = y2.view(*lead, y2.shape[-1])
        else:
            y = _forward_frozen_plus_lowrank(x2, weight, bias, a, B, scaling, lead)
        # The input is needed for dA only: with A frozen (LoRA-FA) backward keeps just a = x Aᵀ.
        saved_x = xa2 if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(saved_x, a, weight, A, B)  # weight is None over a quantized base
        ctx.scaling, ctx.quantized_base = scaling, quantized_base
        ctx.separate_adapter_input = x_adapter is not None
        ctx.x_shape, ctx.xa_shape = x.shape, (x_adapter.shape if x_adapter is not None else None)
        ctx.projected_shape = None if projected is None else projected.shape
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        xa2, a, weight, A, B = ctx.saved_tensors
        if ctx.quantized_base is not None:
            weight = quantized.dequantized(ctx.quantized_base, dy.dtype)
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, _, _, need_A, need_B, _, need_xa = ctx.needs_input_grad[:7]
        shared = ctx.projected_shape is not None
        need_a = shared and ctx.needs_input_grad[8]
        need_g = need_A or need_xa or need_a or (need_x and not shared)
        g, dB = _lowrank_grads(dy2, B, a, s, need_g, need_B)
        dA = g.t() @ xa2 if need_A else None
        dx = dxa = None
        if shared:  # the sharing Function adds g A to dx
            da = g.view(ctx.projected_shape) if need_a else None
            dx = (dy2 @ weight).view(ctx.x_shape) if need_x else None
            return (dx, None, None, None, dB, None, None, None, da)
        if ctx.separate_adapter_input:
            if need_x:
                dx = (dy2 @ weight).view(ctx.x_shape)
            if need_xa:
                dxa = (g @ A).view(ctx.xa_shape)
        elif need_x:
            dx = _dgrad_frozen_plus_lowrank(dy2, weight, g, A, ctx.x_shape)
        return (dx, None, None, dA, dB, None, dxa, None, None)[: len(ctx.needs_input_grad)]


def _forward_frozen_plus_lowrank(
    x2: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, B: Tensor, s: float, lead: torch.Size
) -> Tensor:
    """``y = x Wᵀ + b + s · a Bᵀ`` in shape ``(*lead, d_out)``: one Triton GEMM where
    :mod:`~lightning_lora.kernels` picks it, else two cuBLAS GEMMs."""

    def cublas() -> Tensor:
        # y = s · a Bᵀ (+ b): the scale rides in the GEMM's alpha (no kernel of its own);
        # beta = 0 means y's uninitialised contents are never read. y is allocated in its
        # final shape and filled through a 2-D view, so the output is no view itself (FSDP2
        # warns about a wrapped module returning a view: in-place ops on it lose its hook).
        y = a.new_empty(*lead, B.shape[0])
        y2 = y.view(-1, B.shape[0])
        if bias is None:
            y2.addmm_(a, B.t(), beta=0, alpha=s)
        else:
            torch.addmm(bias, a, B.t(), alpha=s, out=y2)
        y2.addmm_(x2, weight.t())  # the frozen GEMM accumulates into the LoRA part (beta = 1)
        return y

    def triton() -> Tensor:
        return kernels.gemm_lowrank(x2, weight.t(), a, B.t(), bias, s, list(lead))

    tensors = (x2, weight, a, B) if bias is None else (x2, weight, a, B, bias)
    return kernels.run("forward", B.shape[1], tensors, triton, cublas)


def _lowrank_grads(
    dy2: Tensor, B: Tensor, a: Tensor, s: float, need_g: bool, need_B: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(g, dB) = (s · dy B, s · dyᵀ a)``, each ``None`` where not needed; both from one
    Triton pass over ``dy`` where :mod:`~lightning_lora.kernels` picks it."""

    def cublas() -> tuple[Tensor | None, Tensor | None]:
        g = a.new_empty(a.shape).addmm_(dy2, B, beta=0, alpha=s) if need_g else None
        dB = B.new_empty(B.shape).addmm_(dy2.t(), a, beta=0, alpha=s) if need_B else None
        return g, dB

    def triton() -> tuple[Tensor, Tensor]:
        return kernels.lowrank_grads(dy2, B, a, s)

    # The kernel computes both, summing with atomics: not reproducible under deterministic mode.
    if not (need_g and need_B) or torch.are_deterministic_algorithms_enabled():
        return cublas()
    return kernels.run("grads", B.shape[1], (dy2, B, a), triton, cublas)


def _dgrad_frozen_plus_lowrank(dy2: Tensor, weight: Tensor, g: Tensor, A: Tensor, x_shape: torch.Size) -> Tensor:
    """``dx = dy W + g A`` in shape ``x_shape``: one Triton GEMM where
    :mod:`~lightning_lora.kernels` picks it, else two cuBLAS GEMMs."""

    def cublas() -> Tensor:
        dx2 = g @ A  # (N, d_in) LoRA part ...
        dx2.addmm_(dy2, weight)  # ... and the frozen GEMM adds the base part into it
        return dx2.view(x_shape)

    def triton() -> Tensor:
        return kernels.gemm_lowrank(dy2, weight, g, A, None, 1.0, list(x_shape[:-1]))

    return kernels.run("dgrad", A.shape[0], (dy2, weight, g, A), triton, cublas)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    x_adapter: Tensor | None = None,
) -> Tensor:
    """``x Wᵀ + b + scaling · x_adapter Aᵀ Bᵀ`` (``x_adapter`` defaults to ``x``) through
    :class:`LoRALinearFunction`. ``weight`` and ``bias`` must not require gradients; all tensors
    share one dtype."""
    return LoRALinearFunction.apply(x, weight, bias, A, B, scaling, x_adapter)


# Below this many rows the reference path is as fast (the base's kernel dominates, and
# bitsandbytes 0.50.2 switches to its own small-batch kernel at 256 rows on CUDA).
QUANTIZED_MIN_ROWS = 257


def fits_quantized(base: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> bool:
    """The fast path applies to a frozen bitsandbytes 4/8-bit base with no hooks of its own,
    for at least :data:`QUANTIZED_MIN_ROWS` rows computed in the base's compute dtype, with the
    adapter in the same dtype, outside autocast."""
    if not quantized.is_quantized(base) or base._forward_hooks or base._forward_pre_hooks:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if x.numel() < QUANTIZED_MIN_ROWS * x.shape[-1] or x.dtype != quantized.compute_dtype(base):
        return False
    return x.dtype == A.dtype == B.dtype and not torch.is_autocast_enabled(x.device.type)


def fast_forward(base: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> FastForward | None:
    """The fast path for this base and these tensors, as ``run(x, A, B, scale, x_adapter)``, or
    ``None`` when only the reference formula applies."""
    if fits(base, x, A, B):
        return lambda x, A, B, s, xa: lora_linear(x, base.weight, base.bias, A, B, s, xa)
    dtype = autocast_dtype(base, x, A, B)
    if dtype is not None:
        return autocast_forward(base, dtype)
    if fits_quantized(base, x, A, B):
        return lambda x, A, B, s, xa: LoRALinearFunction.apply(x, None, None, A, B, s, xa, base)
    return None
