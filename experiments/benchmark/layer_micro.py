"""One adapted projection at the benchmark's token count, timed by device time: frozen Linear vs
our reference path vs our fast path (Triton kernels or cuBLAS, :mod:`lightning_lora.kernels`); and q, k, v adapters on one input, each computing its own
``x Aᵀ`` or sharing it (:mod:`lightning_lora.shared_inputs`). Used by ``gpu_benchmark.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from profiling import profile_kernels

from lightning_lora.fused import fast_path
from lightning_lora.kernels import triton_kernels

if TYPE_CHECKING:
    from gpu_benchmark import Bench

R, ALPHA = 16, 32


def device_us(bench: Bench, fn: Callable[[], object], calls: int = 10) -> float:
    """Device time of one call (kernels only, from the profiler): a lone layer's wall time is
    dominated by Python and launch overhead, which in a model overlaps with other layers' work."""
    return profile_kernels(bench, fn, steps=calls)["total_us"]


def measure(bench: Bench, fn: Callable[[], object], reps: int, config: str, **fields: object) -> None:
    """One micro row: wall times over ``reps`` calls after 3 warm-up calls, and device time."""
    times, _ = bench.time_steps(fn, 3, reps)
    bench.record(group="micro", config=config, times=times, device_us=device_us(bench, fn), **fields)


def run_layer_micro(bench: Bench) -> None:
    """One adapted projection at the benchmark's token count: forward+backward and forward alone,
    frozen Linear vs our reference path vs our fast path (Triton kernels or cuBLAS, :mod:`lightning_lora.kernels`); and q/k/v on one input."""
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
        # "fast path" is the default (cuBLAS); "fast path, Triton" runs lightning_lora.kernels.
        variants = {
            "frozen Linear": (base, "never", "never"),
            "reference": (layer, "never", "never"),
            "fast path": (layer, "auto", "never"),
            "fast path, Triton": (layer, "auto", "always"),
        }
        for variant, (module, mode, kernel_mode) in variants.items():

            def train(module=module, x=x, dy=dy) -> None:
                module(x).backward(dy)
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            def infer(module=module, x=x) -> None:
                with torch.no_grad():
                    module(x)

            shape = f"{d_in}→{d_out}"
            with fast_path(mode), triton_kernels(kernel_mode):
                for what, fn in (("fwd+bwd", train), ("fwd", infer)):
                    measure(bench, fn, reps, f"{shape} {variant} {what}", d_in=d_in, d_out=d_out)

    if bench.shape.kv_heads not in (None, bench.shape.heads):
        return  # the rows below are q, k, v of one shape (no grouped-query attention)
    # q, k, v on one input: frozen; three fast-path layers each computing x Aᵀ; the same layers
    # sharing it (lightning_lora.shared_inputs: one GEMM for x [A_q; A_k; A_v]ᵀ and one for dA)
    from lightning_lora import inject_lora
    from lightning_lora.shared_inputs import sharing_inputs

    torch.manual_seed(0)
    attn = nn.ModuleDict(
        {p: nn.Linear(h, h, bias=False, device=bench.device, dtype=bench.dtype) for p in ("q", "k", "v")}
    )
    frozen_Ws = [attn[p].weight.detach() for p in ("q", "k", "v")]
    inject_lora(attn, r=R, alpha=ALPHA, target_modules=["q", "k", "v"], init="gaussian")
    x = torch.randn(tokens, h, device=bench.device, dtype=bench.dtype, requires_grad=True)
    dys = [torch.randn(tokens, h, device=bench.device, dtype=bench.dtype) for _ in range(3)]

    def adapted() -> None:
        torch.autograd.backward([attn[p](x) for p in ("q", "k", "v")], dys)
        x.grad = None
        attn.zero_grad(set_to_none=True)

    def frozen() -> None:
        torch.autograd.backward([F.linear(x, W) for W in frozen_Ws], dys)
        x.grad = None

    grads = {}
    for sharing in (False, True):  # the same gradients before the time means anything
        with sharing_inputs(sharing):
            torch.autograd.backward([attn[p](x) for p in ("q", "k", "v")], dys)
        grads[sharing] = [x.grad.float()] + [t.grad.float() for t in attn.parameters() if t.grad is not None]
        x.grad = None
        attn.zero_grad(set_to_none=True)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads[True], grads[False], strict=True))
    for variant, fn, sharing in (
        ("frozen", frozen, False),
        ("three fast-path layers", adapted, False),
        ("sharing x Aᵀ", adapted, True),
    ):
        with sharing_inputs(sharing):
            config = f"q,k,v {h}→{h} on one input: {variant} fwd+bwd"
            measure(bench, fn, reps, config, rel_diff_grads=rel if sharing else None)
