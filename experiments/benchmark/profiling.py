"""Where a training step's device time goes: kernels per step from torch.profiler, by name and
by kind (GEMM, element-wise, ...), and the CPU ops' self time. Used by ``gpu_benchmark.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_benchmark import Bench


def _kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "cublas", "matmul", "splitk", "addmm")):
        return "gemm"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in n for k in ("reduce", "triton_red", "triton_per", "softmax", "norm", "nll", "cross_entropy")):
        return "reduction"
    if any(
        k in n for k in ("elementwise", "vectorized", "unrolled", "triton_poi", "copy", "cat", "fill", "mul", "add")
    ):
        return "elementwise"
    return "other"


def profile_kernels(bench: Bench, step: Callable[[], object], steps: int = 3) -> dict:
    """Device time per kernel name and category, per step, over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if bench.cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        bench.sync()
    kernels: dict[str, list[float]] = {}
    cpu_ops: dict[str, float] = {}
    for evt in prof.key_averages():
        if bench.cuda and str(evt.device_type) == "DeviceType.CPU" and evt.self_cpu_time_total > 0:
            cpu_ops[evt.key] = evt.self_cpu_time_total / steps
        if bench.cuda:
            if str(evt.device_type) != "DeviceType.CUDA":
                continue
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        entry = kernels.setdefault(evt.key, [0.0, 0])
        entry[0] += us / steps
        entry[1] += evt.count / steps
    categories: dict[str, float] = {}
    for key, (us, _) in kernels.items():
        cat = _kernel_category(key)
        categories[cat] = categories.get(cat, 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        "total_us": sum(v[0] for v in kernels.values()),
        "categories_us": categories,
        "kernels": {k: {"us": v[0], "count": v[1]} for k, v in top},
        "cpu_self_us": sum(cpu_ops.values()),
        "cpu_top": dict(sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:15]),
    }
