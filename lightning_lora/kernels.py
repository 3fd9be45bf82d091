"""Triton kernels for the fast path on CUDA, and the per-shape choice between them and cuBLAS.

The fast path (:mod:`lightning_lora.fused`) composes cuBLAS GEMMs: the low-rank term is its own
skinny GEMM that writes the output, and the frozen GEMM adds into it (``beta = 1``). Three
kernels here do the same work in fewer passes over the activations (LoRAFusion, Zhu et al. 2026,
fuses the first two the same way)::

    gemm_lowrank   y  = x Wᵀ + b + s · a Bᵀ      one GEMM: the accumulator starts at s · a Bᵀ
                   dx = dy W + g A               (a = x Aᵀ, g = s · dy B), then the K-loop of
                                                 the frozen GEMM; y (dx) is written once
    lowrank_grads  g  = s · dy B,  dB = s · dyᵀ a    one pass over dy for both

``x: (M, d_in)``, ``W: (d_out, d_in)``, ``A: (r, d_in)``, ``B: (d_out, r)``. The kernels
accumulate in fp32, like cuBLAS; ``lowrank_grads`` adds partial sums with atomics, so its sums
are not bit-reproducible: under ``torch.use_deterministic_algorithms(True)`` (Lightning's
``deterministic=True``) cuBLAS runs instead.

A Triton GEMM only pays where it keeps up with cuBLAS on the frozen part of the work, which
depends on the GPU and the shape. Hence :func:`set_triton_kernels`: ``"auto"`` (default) times
the kernel against the cuBLAS composition the first time a shape is met and keeps the faster;
``"always"`` / ``"never"`` force the choice. Triton is optional: without it, or off CUDA, the
cuBLAS composition runs. With ``TRITON_INTERPRET=1`` set before this module is imported,
``"always"`` runs the kernels on CPU tensors through Triton's interpreter, which is how CI tests
their logic. Under ``torch.compile`` the kernels are :func:`torch.library.triton_op` custom ops,
so Inductor keeps them in its graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs need not have Triton; the cuBLAS composition runs then
    triton = None

KERNEL_MODES = ("auto", "always", "never")
MAX_RANK = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_mode = "auto"
_choices: dict[tuple, bool] = {}  # (kind, shape, dtype, device) -> the kernel was faster


def set_triton_kernels(mode: str) -> None:
    """``"auto"``: per shape, whichever of the Triton kernel and cuBLAS measured faster;
    ``"always"``: the kernels wherever they apply; ``"never"``: cuBLAS only."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"triton kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


def triton_kernel_mode() -> str:
    return _mode


@contextmanager
def triton_kernels(mode: str) -> Iterator[None]:
    """``with triton_kernels("never"): ...`` runs the block with another mode, then restores it."""
    before = _mode
    set_triton_kernels(mode)
    try:
        yield
    finally:
        set_triton_kernels(before)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def applicable(*tensors: Tensor) -> bool:
    """The kernels handle fp16/bf16 tensors on CUDA (or on CPU under the interpreter, when
    forced) with ``r ≤ MAX_RANK``; fp32 keeps cuBLAS, whose fp32 GEMMs do not round to TF32."""
    if triton is None or _mode == "never":
        return False
    first = tensors[0]
    if first.dtype not in KERNEL_DTYPES or any(t.dtype != first.dtype for t in tensors):
        return False
    if first.is_cuda:
        return True
    return _mode == "always" and interpreting() and first.device.type == "cpu"


def chosen(kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fused, unfused) -> bool:
    """Whether to run the kernel for this call. ``fused`` and ``unfused`` are zero-argument
    callables doing the same work; under ``"auto"`` both are timed once per (kind, shape, dtype,
    device) on CUDA and the faster is remembered. Under ``torch.compile`` nothing is timed: the
    kernels run only when forced."""
    if _mode == "always":
        return True
    if _mode == "never" or torch.compiler.is_compiling() or device.type != "cuda":
        return False
    key = (kind, shape, dtype, str(device))
    if key not in _choices:
        _choices[key] = _time(fused) < _time(unfused)
    return _choices[key]


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# fmt: off
if triton is not None:

    @triton.jit
    def _gemm_lowrank(
        x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
        M, N, K, R,
        sxm, sxk, swk, swn, sam, sar, sbr, sbn, sym, syn,
        scaling,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``y[M, N] = x[M, K] · w[K, N] + scaling · a[M, R] · b[R, N] (+ bias[N])``; any
        strides, so ``w = Wᵀ`` (forward) or ``W`` (dgrad) are views, never copies."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row blocks share each column block of w while it is in L2.
        group = pid // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        # The accumulator starts at the low-rank term: one K = R step, no read of y afterwards.
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, out_dtype=tl.float32) * scaling
        rk = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + rm[:, None] * sxm + rk[None, :] * sxk
        w_tile = w_ptr + rk[:, None] * swk + rn[None, :] * swn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            left = K - k * BLOCK_K
            xs = tl.load(x_tile, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0)
            ws = tl.load(w_tile, mask=(rk[:, None] < left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(xs, ws, acc)
            x_tile += BLOCK_K * sxk
            w_tile += BLOCK_K * swk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + rm[:, None] * sym + rn[None, :] * syn
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _lowrank_grads(
        dy_ptr, b_ptr, a_ptr, g_ptr, db_ptr,
        M, N, R, blocks_per_split,
        sdm, sdn, sbn, sbr, sam, sar,
        scaling,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """``g[M, R] += scaling · dy[M, N] · b[N, R]`` and ``db[N, R] += scaling · dyᵀ · a[M, R]``
        into fp32 buffers: each program reads its rows of dy over one split of the columns once,
        for both products."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        first = pid_s * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))
        for nb in range(first, last):
            rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + rm[:, None] * sdm + rn[None, :] * sdn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
            g = tl.dot(dy, b, g)
            db = tl.dot(tl.trans(dy), a, out_dtype=tl.float32) * scaling
            tl.atomic_add(db_ptr + rn[:, None] * R + rr[None, :], db, mask=(rn[:, None] < N) & (rr[None, :] < R))
        tl.atomic_add(g_ptr + rm[:, None] * R + rr[None, :], g * scaling, mask=(rm[:, None] < M) & (rr[None, :] < R))
# fmt: on


# Hopper-class tiles for bf16/fp16 GEMMs; autotuning picks one per (M, N, K).
_GEMM_CONFIGS = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 3, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
_tuned: dict[str, Any] = {}


def _gemm_kernel() -> tuple[Any, dict[str, int]]:
    """The autotuned GEMM on a GPU; one small fixed tile under the interpreter."""
    if interpreting():
        return _gemm_lowrank, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
    if "gemm" not in _tuned:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in _GEMM_CONFIGS
        ]
        _tuned["gemm"] = triton.autotune(configs=configs, key=["M", "N", "K", "R"])(_gemm_lowrank)
    return _tuned["gemm"], {}


def _grads_tiles(M: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: 64 rows a program, so even 8k tokens give 128 programs
    before the column split."""
    if interpreting():
        return 32, 32, 4
    return 64, 128, 4


def _launcher(kernel: Any, traced: bool) -> Any:
    """Inside the custom op (``traced``) a kernel is called through ``wrap_triton`` so that
    tracing sees it; in eager it is launched directly."""
    return torch.library.wrap_triton(kernel) if traced else kernel


def _gemm_lowrank_impl(
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Tensor | None,
    scaling: float,
    lead: list[int],
    traced: bool = False,
) -> Tensor:
    M, K = x.shape
    N = w.shape[1]
    out = x.new_empty(*lead, N)  # allocated in its shape: a view would upset FSDP2's hooks
    y = out.view(M, N)
    kernel, fixed = _gemm_kernel()

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _launcher(kernel, traced)[grid](
        x, w, a, b, y if bias is None else bias, y,
        M, N, K, a.shape[1],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, BLOCK_R=_rank_block(a.shape[1]), **fixed,
    )  # fmt: skip
    return out


def _lowrank_grads_impl(
    dy: Tensor, B: Tensor, a: Tensor, scaling: float, traced: bool = False
) -> tuple[Tensor, Tensor]:
    M, N = dy.shape
    R = B.shape[1]
    g = torch.zeros(M, R, device=dy.device, dtype=torch.float32)
    db = torch.zeros(N, R, device=dy.device, dtype=torch.float32)
    block_m, block_n, warps = _grads_tiles(M)
    row_blocks = triton.cdiv(M, block_m)
    col_blocks = triton.cdiv(N, block_n)
    # Split the columns until there are about four programs per SM (one when interpreting).
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 1
    splits = max(1, min(col_blocks, (4 * sms + row_blocks - 1) // row_blocks))
    per_split = triton.cdiv(col_blocks, splits)
    splits = triton.cdiv(col_blocks, per_split)
    _launcher(_lowrank_grads, traced)[(row_blocks, splits)](
        dy, B, a, g, db,
        M, N, R, per_split,
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), a.stride(0), a.stride(1),
        scaling,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_rank_block(R), num_warps=warps,
    )  # fmt: skip
    return g.to(dy.dtype), db.to(B.dtype)


if triton is not None:
    # Under torch.compile these custom ops keep the kernels in Inductor's graph; their fake
    # (shape-only) versions come from tracing the same functions.
    @torch.library.triton_op("lightning_lora::gemm_lowrank", mutates_args=())
    def _gemm_lowrank_op(
        x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, scaling: float, lead: list[int]
    ) -> Tensor:
        return _gemm_lowrank_impl(x, w, a, b, bias, scaling, lead, traced=True)

    @torch.library.triton_op("lightning_lora::lowrank_grads", mutates_args=())
    def _lowrank_grads_op(dy: Tensor, B: Tensor, a: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        return _lowrank_grads_impl(dy, B, a, scaling, traced=True)


def gemm_lowrank(
    x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, scaling: float, lead: list[int] | None = None
) -> Tensor:
    """``x · w + scaling · a · b (+ bias)`` for 2-D ``x (M, K)``, ``w (K, N)``, ``a (M, r)``,
    ``b (r, N)``, in one Triton GEMM; ``w`` and ``b`` may be transposed views. The result has
    shape ``(*lead, N)`` (default ``(M, N)``) and is allocated so, not a view."""
    lead = [x.shape[0]] if lead is None else list(lead)
    if torch.compiler.is_compiling():
        return _gemm_lowrank_op(x, w, a, b, bias, scaling, lead)
    return _gemm_lowrank_impl(x, w, a, b, bias, scaling, lead)


def lowrank_grads(dy: Tensor, B: Tensor, a: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``(scaling · dy B, scaling · dyᵀ a)``, i.e. ``(g, dB)``, from one pass over ``dy (M, N)``;
    ``B (N, r)``, ``a (M, r)``."""
    if torch.compiler.is_compiling():
        return _lowrank_grads_op(dy, B, a, scaling)
    return _lowrank_grads_impl(dy, B, a, scaling)


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()
