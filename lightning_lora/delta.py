"""ΔW and the merge, as pure functions over tensors: the one home of the update's arithmetic.

``ΔW = scale · B A`` with ``A: (r, d_in)``, ``B: (d_out, r)``; a merge writes ``W + Σ ΔW``
formed in float32 and cast once. A DoRA adapter (magnitude ``m: (d_out,)``) merges as
``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``, row by row (:func:`dora_merged_block`). Every merge goes through :func:`merged_block`: a model's
layers (:mod:`lightning_lora.layers`), adapter files merged into checkpoints
(:mod:`lightning_lora.export`) and the merge report. A host weight of any layer type is seen as
the ``(d_out, d_in)`` matrix the update adds to (:func:`matrix_view`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .dtensors import copy_whole_

Update = tuple[Tensor, Tensor, float]
"""One adapter's ``(A (r, d_in), B (d_out, r), scale)``: what ΔW is made of."""


def init_lora_(A: Tensor, B: Tensor, init: str, a_std: float | None = None) -> None:
    """Initialise ``A: (r, d_in)`` and ``B: (d_out, r)`` in place (or their conv shapes
    ``(r, in, *kernel)``, ``(d_out, r, 1, ...)``: Kaiming's fan-in is ``in · |kernel|`` either way).

    ``"zeros_b"``: ``A`` Kaiming-uniform as ``nn.Linear`` initialises its weight (the paper's
    code), or ``N(0, a_std²)`` when ``a_std`` is given; ``B = 0``. ``"gaussian"``: both
    ``N(0, 0.01²)``. Drawn in float32 and then cast, so a bf16 adapter starts from the same
    numbers as an fp32 one.
    """
    a, b = torch.empty(A.shape, device=A.device), torch.empty(B.shape, device=B.device)
    if init == "zeros_b":
        if a_std is None:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=a_std)
        nn.init.zeros_(b)
    elif init == "gaussian":
        nn.init.normal_(a, std=0.01)
        nn.init.normal_(b, std=0.01)
    else:  # LoRAConfig validates this; direct callers get the same answer.
        raise ValueError(f"unknown init {init!r}; use 'zeros_b' or 'gaussian'")
    copy_whole_(A, a)  # into an FSDP2 shard too: every rank keeps its rows of rank 0's draw
    copy_whole_(B, b)


def delta_weight(A: Tensor, B: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``ΔW = scale · B A``, ``(d_out, d_in)``, computed in ``dtype``."""
    return (B.to(dtype) @ A.to(dtype)) * scale


@torch.no_grad()
def merged_block(block: Tensor, updates: Iterable[Update], sign: float = 1.0) -> Tensor:
    """``block ± Σ scale · B A`` in float32, as a new tensor (``block`` is never written).

    Every merge goes through here (layers, files, the command line): the sum is formed in fp32
    and the caller casts once, so a bf16 merge rounds once instead of once per adapter."""
    out = block.float() if block.dtype != torch.float32 else block.clone()
    for A, B, scale in updates:  # one GEMM per adapter, in place: out += sign · s · (B A)
        out.addmm_(B.float(), A.float(), alpha=sign * scale)
    return out


@torch.no_grad()
def weight_norm(block: Tensor, update: Update) -> Tensor:
    """DoRA's ``‖W + s·B A‖`` of every row of the ``(d_out, d_in)`` ``block``: ``(d_out,)`` in
    float32, never part of a graph (the paper's §4.3 treats it as a constant). The sum is a
    temporary freed on return: nothing of the weight's size outlives the call."""
    return torch.linalg.vector_norm(merged_block(block, [update]), dim=1)


@torch.no_grad()
def dora_merged_block(block: Tensor, update: Update, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """DoRA's merge ``(m / ‖W + s·B A‖) ⊙ (W + s·B A)`` of the ``(d_out, d_in)`` ``block`` in
    float32 (a new tensor), and the row norms used, which :func:`dora_unmerged_block` needs."""
    out = merged_block(block, [update])
    norm = torch.linalg.vector_norm(out, dim=1)
    out.mul_((magnitude.float() / norm).unsqueeze(1))
    return out, norm


@torch.no_grad()
def dora_unmerged_block(block: Tensor, update: Update, magnitude: Tensor, norm: Tensor) -> Tensor:
    """Inverse of :func:`dora_merged_block` given the norms it used: ``W' / (m / n) − s·B A``, in
    float32 (the norms cannot be recomputed from ``W'``, so the merge keeps them, as PEFT does)."""
    factor = magnitude.float() / norm.to(magnitude.device)  # the norms stay where the merge left them
    out = block.float() / factor.unsqueeze(1)
    A, B, scale = update
    return out.addmm_(B.float(), A.float(), alpha=-scale)


def matrix_view(weight: Tensor, transposed: bool = False) -> Tensor:
    """A host weight as the ``(d_out, d_in)`` matrix that ``ΔW = scale · B A`` is added to: an
    ``nn.Linear`` weight as it is; a conv kernel ``(d_out, in, *kernel)`` flattened to
    ``(d_out, in · |kernel|)``; a weight stored ``(d_in, d_out)`` (transformers' ``Conv1D``,
    ``nn.Embedding``'s ``(num_embeddings, embedding_dim)``) transposed. A view wherever the
    memory layout allows one (always for 2-D weights), so writes into it reach ``weight``."""
    return weight.T if transposed else weight.flatten(1)


def from_matrix(block: Tensor, shape: torch.Size | tuple[int, ...], transposed: bool = False) -> Tensor:
    """Inverse of :func:`matrix_view`: the ``(d_out, d_in)`` ``block`` in the host's ``shape``."""
    return block.T if transposed else block.reshape(shape)


def with_block(weight: Tensor, rows: tuple[int, int] | None, block: Tensor) -> Tensor:
    """``weight`` with rows ``rows`` replaced by ``block`` (all of it for ``None``), out of place
    (autograd-friendly, and safe on a state dict's tensors)."""
    if rows is None:
        return block
    start, end = rows
    return torch.cat([weight[:start], block, weight[end:]])


def first_nonfinite(tensors: Iterable[Tensor]) -> int | None:
    """Index of the first tensor holding NaN or Inf, else ``None``: one device synchronisation
    for all of them (a flag each, read back together), not one per tensor."""
    flags = [torch.isfinite(t).all() for t in tensors]
    if not flags:
        return None
    bad = [i for i, ok in enumerate(torch.stack(flags).tolist()) if not ok]
    return bad[0] if bad else None
