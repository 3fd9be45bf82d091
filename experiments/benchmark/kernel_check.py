"""The Triton kernels of :mod:`lightning_lora.kernels` on a GPU, in bf16 and fp16 (CI checks their
logic on CPU in fp16 through Triton's interpreter): each kernel against the cuBLAS composition it
replaces, for tile-unaligned shapes and ranks 1 to 128; ``torch.library.opcheck`` on both custom
ops; and an adapted block compiled with ``fullgraph=True`` through the custom ops against eager.

    python experiments/benchmark/kernel_check.py --out OUT     # writes OUT/kernel_check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from lightning_lora import inject_lora, kernels
from lightning_lora.fused import fast_path

SHAPES = [(8192, 2048, 2048), (8191, 2048, 5632), (1000, 5632, 2048), (77, 4096, 1024), (8192, 4096, 14336)]
RANKS = [1, 3, 16, 64, 128]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check_kernels(dtype: torch.dtype) -> list[dict]:
    """Relative error of each kernel against fp32 math, beside cuBLAS's own error in ``dtype``."""
    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for (M, d_in, d_out), r in [(s, 16) for s in SHAPES] + [(SHAPES[1], r) for r in RANKS]:
        x = torch.randn(M, d_in, device="cuda", generator=g).to(dtype)
        W = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
        A = (torch.randn(r, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
        B = (torch.randn(d_out, r, device="cuda", generator=g) / r**0.5).to(dtype)
        bias = torch.randn(d_out, device="cuda", generator=g).to(dtype)
        dy = torch.randn(M, d_out, device="cuda", generator=g).to(dtype)
        s = 2.0
        a = x @ A.t()
        exact_y = x.float() @ W.float().t() + s * a.float() @ B.float().t() + bias.float()
        cublas_y = torch.addmm(bias, a, B.t(), alpha=s).addmm_(x, W.t())
        y = kernels.gemm_lowrank(x, W.t(), a, B.t(), bias, s)
        gg, dB = kernels.lowrank_grads(dy, B, a, s)
        exact_g, exact_dB = s * dy.float() @ B.float(), s * dy.float().t() @ a.float()
        ga = gg @ A
        exact_dx = dy.float() @ W.float() + gg.float() @ A.float()
        dx = kernels.gemm_lowrank(dy, W, gg, A, None, 1.0)
        cublas_dx = ga.addmm_(dy, W)
        out.append(
            {
                "dtype": str(dtype), "M": M, "d_in": d_in, "d_out": d_out, "r": r,
                "y_rel": rel(y, exact_y), "y_rel_cublas": rel(cublas_y, exact_y),
                "g_rel": rel(gg, exact_g), "g_rel_cublas": rel((s * dy) @ B, exact_g),
                "dB_rel": rel(dB, exact_dB), "dB_rel_cublas": rel(s * dy.t() @ a, exact_dB),
                "dx_rel": rel(dx, exact_dx), "dx_rel_cublas": rel(cublas_dx, exact_dx),
            }
        )  # fmt: skip
        print(out[-1], flush=True)
    return out


def opchecks() -> dict:
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(300, 8, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(192, 8, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(300, 192, device="cuda", dtype=torch.bfloat16)
    done = {}
    for name, op, args in (
        ("gemm_lowrank", torch.ops.lightning_lora.gemm_lowrank, (x, W.t(), a, B.t(), None, 2.0, [300])),
        ("lowrank_grads", torch.ops.lightning_lora.lowrank_grads, (dy, B, a, 2.0)),
    ):
        # The atomics of lowrank_grads sum in any order, so bitwise-equal reruns are not expected.
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        done[name] = {
            k: str(v) for k, v in torch.library.opcheck(op, args, test_utils=utils, atol=1e-2, rtol=1e-2).items()
        }
    return done


class Block(nn.Module):
    def __init__(self, d: int = 1024, hidden: int = 2816) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def compiled_block() -> dict:
    """An adapted block compiled with fullgraph=True through the custom ops, against eager."""
    torch.manual_seed(0)
    block = Block().cuda().to(torch.bfloat16)
    inject_lora(block, r=16, alpha=32, target_modules=["up", "down"], init="gaussian")
    for p in block.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(fn):
        y = fn(x)
        y.float().pow(2).mean().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.requires_grad]
        x.grad = None
        block.zero_grad(set_to_none=True)
        return [y.detach(), *grads]

    torch._dynamo.reset()
    with fast_path("always"), kernels.triton_kernels("always"):
        eager = run(block)
        compiled = run(torch.compile(block, fullgraph=True))
        counters = dict(torch._dynamo.utils.counters["graph_break"])
    return {"graph_breaks": counters, "rel": [rel(c, e) for c, e in zip(compiled, eager, strict=True)]}


def few_tiles() -> None:
    """Two autotuning candidates per kernel, the largest and the smallest tile: every tile ×
    rank × layout × dtype would compile hundreds of variants; the benchmark times the full set."""
    kernels._GEMM_CONFIGS[:] = [kernels._GEMM_CONFIGS[0], kernels._GEMM_CONFIGS[-1]]
    kernels._GRADS_CONFIGS[:] = [kernels._GRADS_CONFIGS[0], kernels._GRADS_CONFIGS[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/kernel_check")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    few_tiles()
    for name, fn in (
        ("bf16", lambda: check_kernels(torch.bfloat16)),
        ("compiled", compiled_block),
        ("fp16", lambda: check_kernels(torch.float16)),
        ("opcheck", opchecks),
    ):
        try:
            result[name] = fn()
        except Exception as err:  # one failure must not hide the others
            import traceback

            traceback.print_exc()
            causes, cause = [], err
            while cause is not None and len(causes) < 6:  # Inductor wraps Triton's own message
                causes.append(f"{type(cause).__name__}: {cause}"[-1500:])
                cause = cause.__cause__ or cause.__context__
            result[name] = causes
        print(name, json.dumps(result[name])[:3000], flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)  # written after each part: a timeout keeps the rest
        (Path(args.out) / "kernel_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
