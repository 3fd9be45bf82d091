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
depends on the GPU and the shape. On the H200 these kernels do not: one adapted layer's forward
and backward is slower with them than with the cuBLAS composition at every benchmark shape, the
GEMM's K-loop being slower than cuBLAS's own (``experiments/benchmark/NOTES.md``). So they are
off by default, and :func:`set_triton_kernels` turns them on: ``"auto"`` times each kernel
against the cuBLAS composition the first time a shape is met and keeps the faster; ``"always"``
runs them wherever they apply; ``"never"`` (default) keeps cuBLAS. Triton is optional: without
it, or off CUDA, the cuBLAS composition runs.

With ``TRITON_INTERPRET=1`` set before this module is imported, ``"always"`` runs the kernels on
CPU tensors through Triton's interpreter, which is how CI tests their logic. Under
``torch.compile`` the kernels are :func:`torch.library.triton_op` custom ops, so Inductor keeps
them in its graph; compile with static shapes (a symbolic size fails inside Triton's autotuner,
as ``torch.library.opcheck``'s dynamic-shape test shows).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import Tensor

from .switches import Switch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs need not have Triton; the cuBLAS composition runs then
    triton = None

T = TypeVar("T")
KERNEL_MODES = ("auto", "always", "never")
MAX_RANK = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Off by default: measured slower than cuBLAS on the H200 (experiments/benchmark/RESULTS.md).
_mode: Switch[str] = Switch("triton kernel mode", "never", KERNEL_MODES)
_choices: dict[tuple, bool] = {}  # (kind, shapes, dtype, device) -> the kernel was faster


def set_triton_kernels(mode: str) -> None:
    """``"never"`` (default): cuBLAS only; ``"auto"``: per shape, whichever of the Triton
    kernel and cuBLAS measured faster (timed once, on the first call); ``"always"``: the
    kernels wherever they apply."""
    _mode.set(mode)


def triton_kernel_mode() -> str:
    return _mode.value


def triton_kernels(mode: str) -> AbstractContextManager[None]:
    """``with triton_kernels("never"): ...`` runs the block with another mode, then restores it."""
    return _mode.using(mode)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def applicable(rank: int, *tensors: Tensor) -> bool:
    """The kernels handle fp16/bf16 tensors on CUDA (or on CPU under the interpreter, when
    forced) with ``rank ≤ MAX_RANK`` (larger ranks overflow their tiles), at least one row, and
    fewer than 2³¹ elements each (their offsets are 32-bit); fp32 keeps cuBLAS, whose fp32 GEMMs
    do not round to TF32."""
    if triton is None or _mode.value == "never" or (torch.compiler.is_compiling() and not CUSTOM_OPS):
        return False
    first = tensors[0]
    if first.dtype not in KERNEL_DTYPES or any(t.dtype != first.dtype for t in tensors):
        return False
    if rank > MAX_RANK or any(t.numel() == 0 or t.numel() >= 2**31 for t in tensors):
        return False
    if first.is_cuda:
        return True
    return _mode.value == "always" and interpreting() and first.device.type == "cpu"


def run(kind: str, rank: int, tensors: tuple[Tensor, ...], triton: Callable[[], T], cublas: Callable[[], T]) -> T:
    """``triton()`` where the kernels apply to ``tensors`` (an adapter of rank ``rank``) and the
    mode picks them, else ``cublas()``; the two compute the same thing. Under ``"auto"`` both are
    timed once per (kind, the tensors' shapes, dtype, device) on CUDA and the faster is
    remembered; under ``torch.compile`` nothing is timed, and the kernels run only when forced."""
    if applicable(rank, *tensors) and _chosen(kind, tensors, triton, cublas):
        return triton()
    return cublas()


def _chosen(kind: str, tensors: tuple[Tensor, ...], fused: Callable[[], object], unfused: Callable[[], object]) -> bool:
    if _mode.value == "always":
        return True
    first = tensors[0]
    if _mode.value == "never" or torch.compiler.is_compiling() or first.device.type != "cuda":
        return False
    key = (kind, tuple(t.shape for t in tensors), first.dtype, str(first.device))
    if key not in _choices:
        _choices[key] = _time(fused) < _time(unfused)
    return _choices[key]


def _time(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# fmt: off
if triton is not None:

    @triton.jit
    def _gemm_lowrank(
        x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
        M, N, K, R,
        sxm, sw, sam, sb, sym,
        scaling,
        W_ROWS_N: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``y[M, N] = x[M, K] · w[K, N] + scaling · a[M, R] · b[R, N] (+ bias[N])``. Rows of
        ``x``, ``a`` and ``y`` are contiguous; ``W_ROWS_N``: ``w`` and ``b`` are stored as
        ``(N, K)`` and ``(N, R)`` rows (the forward's ``Wᵀ``, ``Bᵀ`` views), else as ``(K, N)``
        and ``(R, N)`` rows (the dgrad's ``W``, ``A``). Unit strides are compile-time facts,
        so loads vectorize."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row blocks share each column block of w while it is in L2.
        group = pid // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
        om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = om % M  # rows and columns past the edge wrap around: loads need no mask,
        rn = on % N  # and the store drops them
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :], mask=rr[None, :] < R, other=0.0)
        if W_ROWS_N:
            b = tl.load(b_ptr + rn[None, :] * sb + rr[:, None], mask=rr[:, None] < R, other=0.0)
            w_tile = w_ptr + rn[None, :] * sw + rk[:, None]
            w_step = BLOCK_K
        else:
            b = tl.load(b_ptr + rr[:, None] * sb + rn[None, :], mask=rr[:, None] < R, other=0.0)
            w_tile = w_ptr + rk[:, None] * sw + rn[None, :]
            w_step = BLOCK_K * sw
        # The accumulator starts at the low-rank term: one K = R step, no read of y afterwards.
        # (scaling may arrive as fp64 from a compiled graph: the product is cast back to fp32)
        acc = (tl.dot(a, b, out_dtype=tl.float32) * scaling).to(tl.float32)
        x_tile = x_ptr + rm[:, None] * sxm + rk[None, :]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                xs = tl.load(x_tile)
                ws = tl.load(w_tile)
            else:
                left = K - k * BLOCK_K
                xs = tl.load(x_tile, mask=rk[None, :] < left, other=0.0)
                ws = tl.load(w_tile, mask=rk[:, None] < left, other=0.0)
            acc = tl.dot(xs, ws, acc)
            x_tile += BLOCK_K
            w_tile += w_step
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        out = y_ptr + om[:, None] * sym + on[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(om[:, None] < M) & (on[None, :] < N))

    @triton.jit
    def _lowrank_grads(
        dy_ptr, b_ptr, a_ptr, g_ptr, db_ptr,
        M, N, R,
        sdm, sbn, sam,
        scaling,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """``g[M, R] += scaling · dy[M, N] · b[N, R]`` and ``db[N, R] += scaling · dyᵀ · a[M, R]``
        into fp32 buffers (rows contiguous): each program reads its rows of ``dy`` over its share
        of the columns once, for both products."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = om % M
        rr = tl.arange(0, BLOCK_R)
        # Rows past the edge (wrapped) get a = 0, so they add nothing to db.
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :], mask=(om[:, None] < M) & (rr[None, :] < R), other=0.0)
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        col_blocks = tl.cdiv(N, BLOCK_N)
        per_split = tl.cdiv(col_blocks, tl.num_programs(1))
        first = pid_s * per_split
        last = tl.minimum(first + per_split, col_blocks)
        for nb in range(first, last):
            on = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            rn = on % N
            dy = tl.load(dy_ptr + rm[:, None] * sdm + rn[None, :])
            # Columns past the edge get b = 0, so they add nothing to g.
            b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :], mask=(on[:, None] < N) & (rr[None, :] < R), other=0.0)
            g = tl.dot(dy, b, g)
            db = (tl.dot(tl.trans(dy), a, out_dtype=tl.float32) * scaling).to(tl.float32)
            tl.atomic_add(db_ptr + on[:, None] * R + rr[None, :], db, mask=(on[:, None] < N) & (rr[None, :] < R))
        tl.atomic_add(g_ptr + om[:, None] * R + rr[None, :], (g * scaling).to(tl.float32), mask=(om[:, None] < M) & (rr[None, :] < R))
# fmt: on


# Hopper-class tiles for bf16/fp16: (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) for the GEMM and
# (BLOCK_M, BLOCK_N, warps) for the one-pass gradients; autotuning picks one per shape.
_GEMM_CONFIGS = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 5, 8),
    (128, 128, 32, 4, 4),
    (64, 256, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 32, 3, 4),  # fits shared memory at any rank up to MAX_RANK
]
_GRADS_CONFIGS = [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 128, 4)]
_INTERPRETED = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


@functools.cache
def _gemm_kernel() -> Any:
    """The autotuned GEMM on a GPU; the bare kernel (given one small tile) under the interpreter."""
    if interpreting():
        return _gemm_lowrank
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in _GEMM_CONFIGS
    ]
    even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gemm_lowrank)
    return triton.autotune(configs=configs, key=["M", "N", "K", "R", "W_ROWS_N"])(even_k)


@functools.cache
def _grads_kernel() -> Any:
    """Autotuned like the GEMM; its fp32 outputs are zeroed before each trial, since atomics add."""
    if interpreting():
        return _lowrank_grads
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in _GRADS_CONFIGS]
    return triton.autotune(configs=configs, key=["M", "N", "R"], reset_to_zero=["g_ptr", "db_ptr"])(_lowrank_grads)


def _launcher(kernel: Any, traced: bool) -> Any:
    """Inside the custom op (``traced``) a kernel is called through ``wrap_triton`` so that
    tracing sees it; in eager it is launched directly."""
    return torch.library.wrap_triton(kernel) if traced else kernel


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    x, a = _rows_contiguous(x), _rows_contiguous(a)
    bias = None if bias is None else bias.contiguous()  # the kernel reads it with unit stride
    M, K = x.shape
    N, R = w.shape[1], a.shape[1]
    # w = Wᵀ of a row-major W: stored as (N, K) rows. bool(): a traced stride gives a SymBool,
    # which a constexpr cannot take.
    rows_n = bool(w.stride(0) == 1)
    if not rows_n:
        w = _rows_contiguous(w)
    # b must be stored like w: (N, R) rows with w's (N, K) rows, (R, N) rows with (K, N).
    b = (b if b.stride(0) == 1 else b.t().contiguous().t()) if rows_n else _rows_contiguous(b)
    out = x.new_empty(*lead, N)  # allocated in its shape: a view would upset FSDP2's hooks
    y = out.view(M, N)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    fixed = dict(_INTERPRETED, EVEN_K=K % _INTERPRETED["BLOCK_K"] == 0) if interpreting() else {}
    _launcher(_gemm_kernel(), traced)[grid](
        x, w, a, b, y if bias is None else bias, y,
        M, N, K, R,
        x.stride(0), w.stride(1) if rows_n else w.stride(0), a.stride(0), b.stride(1) if rows_n else b.stride(0),
        y.stride(0),
        scaling,
        W_ROWS_N=rows_n, HAS_BIAS=bias is not None, BLOCK_R=_rank_block(R), **fixed,
    )  # fmt: skip
    return out


def _lowrank_grads_impl(
    dy: Tensor, B: Tensor, a: Tensor, scaling: float, traced: bool = False
) -> tuple[Tensor, Tensor]:
    dy, B, a = _rows_contiguous(dy), _rows_contiguous(B), _rows_contiguous(a)
    M, N = dy.shape
    R = B.shape[1]
    g = torch.zeros(M, R, device=dy.device, dtype=torch.float32)
    db = torch.zeros(N, R, device=dy.device, dtype=torch.float32)
    # Columns are split across programs until there are about four per SM (one when interpreting).
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 1

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        row_blocks, col_blocks = triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])
        splits = max(1, min(col_blocks, triton.cdiv(4 * sms, row_blocks)))
        return (row_blocks, triton.cdiv(col_blocks, triton.cdiv(col_blocks, splits)))

    fixed = {"BLOCK_M": 32, "BLOCK_N": 32} if interpreting() else {}
    _launcher(_grads_kernel(), traced)[grid](
        dy, B, a, g, db,
        M, N, R,
        dy.stride(0), B.stride(0), a.stride(0),
        scaling,
        BLOCK_R=_rank_block(R), **fixed,
    )  # fmt: skip
    return g.to(dy.dtype), db.to(B.dtype)


# torch.library.triton_op came with torch 2.6; without it the kernels run in eager mode only.
CUSTOM_OPS = triton is not None and hasattr(torch.library, "triton_op")
if CUSTOM_OPS:
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
