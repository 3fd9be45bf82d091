"""One adapted projection at the benchmark's token count, timed by device time: frozen Linear vs
our reference path vs our fast path; and an experiment, q, k, v adapters on one input with their
A's stacked (not library code). Used by ``gpu_benchmark.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from profiling import profile_kernels

from lightning_lora.fused import fast_path

if TYPE_CHECKING:
    from gpu_benchmark import Bench

R, ALPHA = 16, 32


class SharedInputLoRA(torch.autograd.Function):
    """Experiment, not library code: q, k, v adapters on one input with their A's stacked, so
    x is read once for ``x A_catᵀ`` and once for ``dA_cat`` instead of three times each.
    ``apply(x, A_cat, scaling, W_q, W_k, W_v, B_q, B_k, B_v)`` → ``(y_q, y_k, y_v)``."""

    @staticmethod
    def forward(ctx, x, A_cat, scaling, *WB):
        n = len(WB) // 2
        Ws, Bs = WB[:n], WB[n:]
        r = A_cat.shape[0] // n
        a = x @ A_cat.t()
        ys = []
        for i, (W, B) in enumerate(zip(Ws, Bs, strict=True)):
            y = a[:, i * r : (i + 1) * r] @ (B * scaling).t()
            ys.append(y.addmm_(x, W.t()))
        ctx.save_for_backward(x, a, A_cat, *WB)
        ctx.n, ctx.r, ctx.scaling = n, r, scaling
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x, a, A_cat, *WB = ctx.saved_tensors
        n, r, s = ctx.n, ctx.r, ctx.scaling
        Ws, Bs = WB[:n], WB[n:]
        g = torch.cat([dy @ (B * s) for dy, B in zip(dys, Bs, strict=True)], dim=1)
        dA = g.t() @ x
        dB = [(dy.t() @ a[:, i * r : (i + 1) * r]).mul_(s) for i, dy in enumerate(dys)]
        dx = g @ A_cat
        for dy, W in zip(dys, Ws, strict=True):
            dx.addmm_(dy, W)
        return (dx, dA, None, *([None] * n), *dB)


def device_us(bench: Bench, fn: Callable[[], object], calls: int = 10) -> float:
    """Device time of one call (kernels only, from the profiler): a lone layer's wall time is
    dominated by Python and launch overhead, which in a model overlaps with other layers' work."""
    return profile_kernels(bench, fn, steps=calls)["total_us"]


def run_layer_micro(bench: Bench) -> None:
    """One adapted projection at the benchmark's token count: forward+backward and forward alone,
    frozen Linear vs our reference path vs our fast path; and q/k/v on one input."""
    from torch import nn

    from lightning_lora import AdapterSpec, LoRALinear

    tokens = bench.shape.batch * bench.shape.seq
    h, i = bench.shape.hidden, bench.shape.intermediate
    reps = 30 if bench.cuda else 3
    for d_in, d_out in ((h, h), (h, i), (i, h)):
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device=bench.device, dtype=bench.dtype).requires_grad_(False)
        layer = LoRALinear(base)
        layer.add_adapter(
            "default", AdapterSpec(r=R, alpha=ALPHA, init="gaussian"), dtype=bench.dtype, device=bench.device
        )
        layer.set_active(["default"])
        x = torch.randn(tokens, d_in, device=bench.device, dtype=bench.dtype, requires_grad=True)
        dy = torch.randn(tokens, d_out, device=bench.device, dtype=bench.dtype)
        variants = {"frozen Linear": (base, "never"), "reference": (layer, "never"), "fast path": (layer, "auto")}
        for variant, (module, mode) in variants.items():

            def train(module=module, x=x, dy=dy) -> None:
                module(x).backward(dy)
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            def infer(module=module, x=x) -> None:
                with torch.no_grad():
                    module(x)

            shape = f"{d_in}→{d_out}"
            with fast_path(mode):
                for what, fn in (("fwd+bwd", train), ("fwd", infer)):
                    times, _ = bench.time_steps(fn, 3, reps)
                    bench.record(
                        group="micro",
                        config=f"{shape} {variant} {what}",
                        times=times,
                        device_us=device_us(bench, fn),
                        d_in=d_in,
                        d_out=d_out,
                    )

    if bench.shape.kv_heads not in (None, bench.shape.heads):
        return  # the experiment below assumes q, k, v of one shape (no grouped-query attention)
    # q, k, v on one input: three fast-path layers vs stacked A's
    torch.manual_seed(0)
    Ws = [torch.randn(h, h, device=bench.device, dtype=bench.dtype) * 0.02 for _ in range(3)]
    As = [(torch.randn(R, h, device=bench.device, dtype=bench.dtype) * 0.02).requires_grad_() for _ in range(3)]
    Bs = [(torch.randn(h, R, device=bench.device, dtype=bench.dtype) * 0.02).requires_grad_() for _ in range(3)]
    A_cat = torch.cat([a.detach() for a in As]).requires_grad_()
    x = torch.randn(tokens, h, device=bench.device, dtype=bench.dtype, requires_grad=True)
    dys = [torch.randn(tokens, h, device=bench.device, dtype=bench.dtype) for _ in range(3)]
    from lightning_lora.fused import lora_linear

    def three() -> None:
        ys = [lora_linear(x, W, None, A, B, ALPHA / R) for W, A, B in zip(Ws, As, Bs, strict=True)]
        torch.autograd.backward(ys, dys)
        x.grad = None

    def stacked() -> None:
        ys = SharedInputLoRA.apply(x, A_cat, ALPHA / R, *Ws, *Bs)
        torch.autograd.backward(ys, dys)
        x.grad = None

    def frozen() -> None:
        ys = [F.linear(x, W) for W in Ws]
        torch.autograd.backward(ys, dys)
        x.grad = None

    # the experiment must compute the same gradients before its time means anything
    grads = []
    for fn in (three, stacked):
        for p in (*As, *Bs, A_cat):
            p.grad = None
        x.grad = None
        ys = [lora_linear(x, W, None, A, B, ALPHA / R) for W, A, B in zip(Ws, As, Bs, strict=True)]
        ys = ys if fn is three else SharedInputLoRA.apply(x, A_cat, ALPHA / R, *Ws, *Bs)
        torch.autograd.backward(ys, dys)
        dA = torch.cat([a.grad for a in As]) if fn is three else A_cat.grad
        grads.append((x.grad.float(), dA.float(), torch.cat([b.grad for b in Bs]).float()))
    stacked_rel_diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads, strict=True))
    for p in (*As, *Bs, A_cat):
        p.grad = None

    for variant, fn in (("frozen", frozen), ("three fast-path layers", three), ("stacked A (experiment)", stacked)):
        times, _ = bench.time_steps(fn, 3, reps)
        bench.record(
            group="micro",
            config=f"q,k,v {h}→{h} on one input: {variant} fwd+bwd",
            times=times,
            device_us=device_us(bench, fn),
            rel_diff_grads=stacked_rel_diff if fn is stacked else None,
        )
