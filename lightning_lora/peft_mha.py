"""``nn.MultiheadAttention`` adapters in PEFT's file layout, both ways, exactly.

We give each of q, k, v its own ``A_i (r_i × E)``, ``B_i (E × r_i)`` over its third of the fused
``in_proj_weight (3E × E)``, and ``out_proj`` its own pair. PEFT keeps one pair over the whole
fused weight (``<mha>.lora_A.weight (R × E)``, ``<mha>.lora_B.weight (3E × R)``) and one over
``out_proj`` (``<mha>.base_layer.out_proj.lora_*``), both of rank ``R`` and one scale. The two
are the same update::

    A = [A_q; A_k; A_v]                 (Σrᵢ × E)
    B = ⎡B_q  0    0  ⎤                 (3E × Σrᵢ)     B A = ⎡B_q A_q⎤   (row blocks q, k, v)
        ⎢0    B_k  0  ⎥                                      ⎢B_k A_k⎥
        ⎣0    0    B_v⎦                                      ⎣B_v A_v⎦

so writing is exact at rank ``R = Σrᵢ`` (or ``R = r`` with ``B = [B_q; B_k; B_v]`` when the three
``A`` are one, as after loading a PEFT adapter). A block we do not adapt is a zero block, and
``out_proj`` is padded with zero rows/columns to rank ``R`` (zero when not adapted): PEFT always
adapts both, at one rank. Reading PEFT's pair gives each block ``A_i = A``, ``B_i = B[rows_i]``:
``B_i A = (B A)[rows_i]``, exact too. Our own files record the block layout in their metadata, so
they read back into exactly the blocks, ranks and alphas that were saved.

PEFT (0.21 and every release before it) adds ``out_proj``'s update **twice**: its MHA layer writes
``W + ΔW`` into ``out_proj`` and then calls the nested LoRA layer's own merge, which adds ``ΔW``
again, in ``forward`` as in ``merge_and_unload`` (huggingface/peft#3774, open). So that PEFT runs
what we trained, we write ``out_proj``'s ``B`` halved, and read PEFT's doubled; both are exact in
binary floating point. A PEFT file from a release newer than :data:`CHECKED_PEFT` is refused:
whether it counts ``out_proj`` once or twice cannot be known from the file.

Exactness needs one scale for the whole module; blocks with different scales are refused.
A module with separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` differ) keeps our names: PEFT
refuses to adapt such a module, loudly, rather than loading it wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import lora_scale
from .errors import AdapterFileError, LoRAStateError
from .names import PEFT_MHA_OUT, QKV, block_rows, file_key, parse_weight_name, peft_mha_owner, weight_name
from .state import adapted_weights

METADATA_FIELD = "peft_mha"
"""Key, in a file's metadata extras, of the block layout of each MHA written in PEFT's layout."""

PEFT_OUT_PROJ_COUNT = 2
"""How many times PEFT adds an MHA's ``out_proj`` update (huggingface/peft#3774)."""

CHECKED_PEFT = (0, 21)
"""The newest PEFT release whose MHA layer was checked to add ``out_proj``'s update
:data:`PEFT_OUT_PROJ_COUNT` times (peft 0.21.2, with a test)."""


@dataclass
class MHAGroup:
    """The adapted weights of one ``nn.MultiheadAttention`` for one adapter: ``blocks`` maps
    "q"/"k"/"v" (and "out" for ``out_proj``) to ``(A, B, r, alpha)``."""

    name: str
    fused: bool
    embed_dim: int
    use_rslora: bool
    blocks: dict[str, tuple[Tensor, Tensor, int, float]] = field(default_factory=dict)


def mha_groups(model: nn.Module, adapter_name: str) -> dict[str, MHAGroup]:
    """Every ``nn.MultiheadAttention`` of ``model`` that adapter ``adapter_name`` adapts."""
    groups: dict[str, MHAGroup] = {}
    for t in adapted_weights(model):
        if adapter_name not in t.layer.lora_A:
            continue
        parsed = parse_weight_name(t.name)
        owner, label = parsed.module, parsed.label
        if not label:
            owner, _, last = t.name.rpartition(".")
            if last != "out_proj" or not isinstance(model.get_submodule(owner), nn.MultiheadAttention):
                continue
            label = "out"
        mha = model.get_submodule(owner)
        spec = t.layer.specs[adapter_name]
        group = groups.setdefault(owner, MHAGroup(owner, mha._qkv_same_embed_dim, mha.embed_dim, spec.use_rslora))
        A, B = t.layer.lora_A[adapter_name].detach(), t.layer.lora_B[adapter_name].detach()
        group.blocks[label] = (A, B, spec.r, spec.alpha)
    return groups


def _peft_alpha(scale: float, rank: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank ``rank`` (inverse of :func:`lora_scale`)."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


def to_peft(group: MHAGroup) -> tuple[dict[str, Tensor], int, float, dict[str, Any]]:
    """PEFT's tensors for one fused MHA (file keys), their rank ``R``, the ``lora_alpha`` that
    keeps the scale, and the layout record for the metadata."""
    scales = {lora_scale(alpha, r, group.use_rslora) for _, _, r, alpha in group.blocks.values()}
    if len(scales) > 1:
        raise LoRAStateError(
            f"cannot write the adapter of {group.name!r} in PEFT's nn.MultiheadAttention layout exactly: "
            f"its blocks have different scales {sorted(scales)}, and PEFT's layout has one scale per module. "
            f"Give its q/k/v/out_proj adapters the same r and alpha."
        )
    scale = scales.pop()
    E = group.embed_dim
    qkv = [(p, *group.blocks[p]) for p in QKV if p in group.blocks]
    ref = group.blocks[next(iter(group.blocks))][0]
    dtype, device = ref.dtype, ref.device
    shared = len(qkv) > 1 and all(a.shape == qkv[0][1].shape and torch.equal(a, qkv[0][1]) for _, a, *_ in qkv)
    if shared:
        rank = qkv[0][3]
        A = qkv[0][1]
        B = torch.zeros(3 * E, rank, dtype=dtype, device=device)
        for label, _, b, _, _ in qkv:
            start, end = block_rows(label, 3 * E)
            B[start:end] = b
    else:
        rank = sum(r for *_, r, _ in qkv)
        A = torch.cat([a for _, a, *_ in qkv]) if qkv else torch.zeros(0, E, dtype=dtype, device=device)
        B = torch.zeros(3 * E, rank, dtype=dtype, device=device)
        col = 0
        for label, _, b, r, _ in qkv:
            start, end = block_rows(label, 3 * E)
            B[start:end, col : col + r] = b
            col += r
    out = group.blocks.get("out")
    R = max(rank, out[2] if out else 0)
    A, B = _pad(A, B, R)
    A_out, B_out = (out[0], out[1] / PEFT_OUT_PROJ_COUNT) if out else (A.new_zeros(0, E), B.new_zeros(E, 0))
    A_out, B_out = _pad(A_out, B_out, R)
    layout = {
        "shared_a": shared,
        "blocks": [[label, r, alpha] for label, _, _, r, alpha in qkv],
        "out": [out[2], out[3]] if out else None,
    }
    out_name = f"{group.name}{PEFT_MHA_OUT}"
    tensors = {
        file_key(group.name, "A"): A,
        file_key(group.name, "B"): B,
        file_key(out_name, "A"): A_out,
        file_key(out_name, "B"): B_out,
    }
    return tensors, R, _peft_alpha(scale, R, group.use_rslora), layout


def _pad(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A (r × d_in)``, ``B (d_out × r)`` grown to rank ``rank`` with zeros: ``B A`` unchanged."""
    extra = rank - A.shape[0]
    if extra <= 0:
        return A, B
    return (
        torch.cat([A, A.new_zeros(extra, A.shape[1])]),
        torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1),
    )


def _newer_than_checked(peft_version: Any) -> bool:
    numbers = re.findall(r"\d+", str(peft_version or "0").partition("@")[0])[:2]
    return tuple(int(n) for n in numbers) > CHECKED_PEFT


def from_peft(
    pairs: dict[str, tuple[Tensor, Tensor]],
    alpha_of: Any,
    expected_rank: Any,
    layouts: dict[str, Any] | None,
    file: Any,
    peft_version: Any = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
    """Pairs in PEFT's MHA layout (``<mha>`` and ``<mha>.base_layer.out_proj``) as our blocks, with
    each new weight's alpha. ``alpha_of(name)`` and ``expected_rank(name)`` read the file's
    config; ``layouts`` is the metadata record of our own files (exact blocks back; ``None`` for
    a file PEFT wrote, whose ``peft_version`` says how it counts ``out_proj``)."""
    owners = {peft_mha_owner(n) for n in pairs} - {None}
    if owners and layouts is None and _newer_than_checked(peft_version):
        raise AdapterFileError(
            f"{file} adapts nn.MultiheadAttention {sorted(owners)[0]!r} and was written by PEFT {peft_version}. "
            f"PEFT up to {'.'.join(map(str, CHECKED_PEFT))} adds out_proj's update twice (huggingface/peft#3774); "
            f"a newer release may add it once, and the file cannot say which, so loading it could give a model "
            f"that differs from the one PEFT runs. Load it with PEFT, or with a lightning-lora that knows this release."
        )
    layouts = layouts or {}
    out_pairs = {n: ab for n, ab in pairs.items() if n not in owners and peft_mha_owner(n) is None}
    alphas: dict[str, float] = {}
    for owner in sorted(owners):
        if owner not in pairs:
            raise AdapterFileError(
                f"{file} has the out_proj tensors of the nn.MultiheadAttention {owner!r} in PEFT's layout "
                f"but not its in_proj lora_A/lora_B ({owner}.lora_A.weight); the file is incomplete."
            )
        (A, B), (A_o, B_o) = pairs[owner], pairs[f"{owner}{PEFT_MHA_OUT}"]
        R, E = A.shape
        if expected_rank(owner) != R or B.shape != (3 * E, R) or A_o.shape != (R, E) or B_o.shape != (E, R):
            raise AdapterFileError(
                f"{file}: the nn.MultiheadAttention adapter {owner!r} has lora_A {tuple(A.shape)}, lora_B "
                f"{tuple(B.shape)}, out_proj lora_A {tuple(A_o.shape)}, lora_B {tuple(B_o.shape)}; PEFT's layout "
                f"needs (R, E), (3E, R), (R, E), (E, R) with R = r = {expected_rank(owner)} from the config."
            )
        alpha = alpha_of(owner)
        layout = layouts.get(owner)
        if layout is None:  # PEFT's own: every block reads the one A
            blocks = [(label, A, B[slice(*block_rows(label, 3 * E))], alpha) for label in QKV]
            blocks.append(("out", A_o, B_o * PEFT_OUT_PROJ_COUNT, alpha))
        else:
            blocks, col = [], 0
            for label, r, block_alpha in layout["blocks"]:
                rows = slice(*block_rows(label, 3 * E))
                cols = slice(0, r) if layout["shared_a"] else slice(col, col + r)
                blocks.append((label, A[cols], B[rows, cols], block_alpha))
                col += r
            if layout["out"]:
                r, block_alpha = layout["out"]
                blocks.append(("out", A_o[:r], B_o[:, :r] * PEFT_OUT_PROJ_COUNT, block_alpha))
        for label, a, b, block_alpha in blocks:
            name = f"{owner}.out_proj" if label == "out" else weight_name(owner, "in_proj_weight", label)
            out_pairs[name] = (a.contiguous(), b.contiguous())
            alphas[name] = float(block_alpha)
    return out_pairs, alphas


@dataclass
class PeftLayout:
    """What writing an adapter in PEFT's layout changes for its MHAs: the fused ``tensors``
    (file keys), the weight names they replace (``covered``), each MHA's rank and ``lora_alpha``
    for the config, and the block ``records`` for the metadata."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    covered: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # every MHA weight name -> its module


def peft_layout(model: nn.Module, adapter_name: str) -> PeftLayout:
    """:func:`to_peft` for every fused MHA adapter ``adapter_name`` adapts (full names)."""
    layout = PeftLayout()
    for owner, group in mha_groups(model, adapter_name).items():
        names = [f"{owner}.out_proj" if p == "out" else weight_name(owner, "in_proj_weight", p) for p in group.blocks]
        if not group.fused:
            names = [n for n in names if n.endswith(".out_proj")]
        layout.owners.update(dict.fromkeys(names, owner))
        if group.fused:
            tensors, rank, alpha, record = to_peft(group)
            layout.tensors.update(tensors)
            layout.covered.update(names)
            layout.ranks[owner], layout.alphas[owner], layout.records[owner] = rank, alpha, record
    return layout
