"""Forward + backward of a stack of one adapted layer type on CPU (1 thread): the frozen stack,
ours and PEFT, r=8. The input requires grad, as inside a network, so every configuration also
computes dx. Conv and embedding adapters take our reference path (the fused fast path is for
nn.Linear); this checks that they cost no more than PEFT's.

    python experiments/benchmark/layer_types_cpu.py
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_lora import inject_lora

Case = tuple[nn.Module, Callable[[nn.Module], Tensor], list[str]]


def conv2d() -> Case:
    model = nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)])
    x = torch.randn(16, 64, 32, 32, requires_grad=True)
    return model, lambda m: m(x), [str(i) for i in range(4)]


def embedding() -> Case:
    model = nn.Sequential(nn.Embedding(32000, 256))
    ids = torch.randint(0, 32000, (32, 128))
    return model, lambda m: m(ids), ["0"]


def conv1d_transformers() -> Case:
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(*[Conv1D(768, 768) for _ in range(4)])
    x = torch.randn(8, 128, 768, requires_grad=True)
    return model, lambda m: m(x), [str(i) for i in range(4)]


CASES = {
    "nn.Conv2d 64→64 3×3 ×4, input 16×64×32×32": conv2d,
    "nn.Embedding 32000×256, ids 32×128": embedding,
    "transformers Conv1D 768→768 ×4, input 8×128×768": conv1d_transformers,
}


def step_seconds(model: nn.Module, run: Callable[[nn.Module], Tensor], steps: int = 10) -> float:
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        out = run(model)
        if out.requires_grad:
            out.square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    print("| layer stack | frozen (ms) | ours r=8 (ms) | PEFT r=8 (ms) | PEFT / ours |")
    print("|---|---|---|---|---|")
    for label, make in CASES.items():
        torch.manual_seed(0)
        base, run, targets = make()
        frozen = copy.deepcopy(base).requires_grad_(False)
        ours = copy.deepcopy(base)
        inject_lora(ours, r=8, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets))
        times: dict[str, list[float]] = {}
        for _ in range(3):  # round robin: the machine is shared
            for name, model in (("frozen", frozen), ("ours", ours), ("peft", peft)):
                times.setdefault(name, []).append(step_seconds(model, run))
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(
            f"| {label} | {ms['frozen']:.1f} | {ms['ours']:.1f} | {ms['peft']:.1f} | {ms['peft'] / ms['ours']:.2f}× |"
        )


if __name__ == "__main__":
    main()
