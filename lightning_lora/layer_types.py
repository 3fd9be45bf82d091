"""LoRA for the layer types beyond ``nn.Linear``: transformers' ``Conv1D``, ``nn.Conv1d/2d/3d``,
``nn.Embedding``. Each wraps the original module (called as is) and keeps ``ΔW = scale · B A`` a
``(d_out, d_in)`` matrix product, so merging, files and analysis share one formula
(:func:`~lightning_lora.layers.merged_block`); only how the update meets the input differs.

* transformers' ``Conv1D`` (GPT-2): weight ``(d_in, d_out)``, the matrix is ``Wᵀ``; the update
  is ``(x Aᵀ) Bᵀ``, as for an ``nn.Linear``.
* ``nn.ConvNd``: kernel ``(d_out, in, *k)``, the matrix is the kernel flattened to
  ``(d_out, in · |k|)``; the update is ``conv_B(conv_A(x))``.
* ``nn.Embedding``: table ``(V, D)``, the matrix is ``Wᵀ (D, V)``; the update is
  ``A[:, ids]ᵀ Bᵀ``.

Each class says, in :meth:`refusal`, which modules of its type it cannot adapt exactly (a
grouped conv, an embedding with ``max_norm``, a subclass with its own ``forward``): they are
refused by name before anything changes (:mod:`lightning_lora.targets`). DoRA (``use_dora``)
runs on ``nn.Linear`` and ``Conv1D`` only; :attr:`LayerType.dora_refusal` says why not elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quantized
from .delta import init_lora_
from .layers import LoRALinear, LoRAWrapper

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
"""Parents that read their Linear children's ``.weight`` directly instead of calling them:
MultiheadAttention (``out_proj``) and TransformerEncoderLayer's inference fast path (``linear1``,
``linear2``). Their Linears are adapted through a weight parametrization, never a wrapper."""


def _own_forward(module: nn.Module, base: type[nn.Module]) -> str | None:
    """A reason to refuse a subclass of ``base`` that computes its own forward: ``W + ΔW`` in
    its weight would not equal the update added to its output (e.g. timm's weight-standardised
    ``StdConv2d``, or an embedding that scales its output)."""
    if type(module).forward is base.forward:
        return None
    return (
        f"{type(module).__name__} subclasses {base.__name__} with a forward of its own, so ΔW merged into its "
        f"weight would not equal the update added to its output"
    )


class _ReadsThrough:
    """Public attributes the wrapper lacks (``in_channels``, ``padding_idx``, ``nf``, ...) read
    through to the base layer, for model code that inspects its layers. (Not on ``LoRALinear``,
    whose hot path should not pay for another ``__getattr__`` frame.)"""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module: parameters, buffers, submodules
        except AttributeError:
            if name.startswith("_") or name == "base_layer":  # never torch's private protocol
                raise
            return getattr(self._modules["base_layer"], name)


class LoRAConv1D(_ReadsThrough, LoRALinear):
    """transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): ``y = x W + b`` with
    ``W`` stored ``(d_in, d_out)``, the transpose of an ``nn.Linear`` weight (PEFT's
    ``fan_in_fan_out``). ``A (r, d_in)``, ``B (d_out, r)`` and the forward are ``LoRALinear``'s;
    merging adds ``ΔWᵀ``. Recognised by its layout (class ``Conv1D``, ``nf`` outputs, weight
    ``(nx, nf)``), so the core never imports transformers. The fused fast path is for
    ``nn.Linear`` only: this layer takes the reference path."""

    transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D"
            and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and weight.shape[1] == module.nf
        )


class LoRAConv(_ReadsThrough, LoRAWrapper):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (LoCon: LoRA on every kernel offset)::

        x ──► conv(W) ─────────────────────────────────────────────────────────┐
        └──► dropout ──► conv(A) (r channels) ──► × scale ──► 1×1 conv(B) ──(+)──► y

    ``A: (r, in, *kernel)`` is convolved exactly as the base convolves (kernel size, stride,
    padding, ``padding_mode``, dilation; ``groups = 1``), ``B: (d_out, r, 1, ...)`` is a 1×1
    conv: PEFT's layout, so files are PEFT's. Since ``B`` mixes channels pixel by pixel,
    ``conv_B(conv_A(x)) = conv(x, ΔW)`` with ``ΔW[o, i, k…] = Σ_ρ B[o, ρ] A[ρ, i, k…]``: the
    matrix ``B A`` of shape ``(d_out, in · |kernel|)`` reshaped to the kernel, merged exactly.
    Unlike PEFT 0.21, the base's ``dilation`` and ``padding_mode`` are followed (PEFT's ``A``
    drops both: a dilated target fails with a shape error, a reflect-padded one computes
    zero-padded updates that its own merge does not reproduce). Reference path only.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        weight = base_layer.weight
        super().__init__(base_layer, weight.shape[0], weight[0].numel())
        self.kernel_shape = tuple(weight.shape[1:])  # (in_channels, *kernel_size)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, _CONV_TYPES)

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        base = next(t for t in _CONV_TYPES if isinstance(module, t))
        if module.groups != 1:
            return (
                f"groups={module.groups}: a LoRA A over all input channels does not fit a grouped kernel, so the "
                f"update could not be merged (PEFT cannot merge it either)"
            )
        return _own_forward(module, base)

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``A: (r, in, *kernel)``, ``B: (d_out, r, 1, ...)``: PEFT's ``lora_A`` / ``lora_B`` convs."""
        return (r, *self.kernel_shape), (self.d_out, r) + (1,) * (len(self.kernel_shape) - 1)

    def write_region(self, weight: Tensor, block: Tensor) -> None:
        weight.copy_(block.reshape(weight.shape))  # any memory format (channels_last too)

    def _conv_as_base(self, x: Tensor, kernel: Tensor) -> Tensor:
        """``x`` convolved with ``kernel`` as the base layer convolves (groups = 1)."""
        base, conv = self.base_layer, _CONV[len(self.kernel_shape) - 1]
        if base.padding_mode == "zeros":
            return conv(x, kernel, None, base.stride, base.padding, base.dilation)
        x = F.pad(x, _explicit_padding(base), mode=base.padding_mode)
        return conv(x, kernel, None, base.stride, 0, base.dilation)

    def forward(self, x: Tensor) -> Tensor:
        """``y = conv(x, W) + b + Σ_active scale · conv_B(conv_A(dropout(x)))``;
        ``x: (N, in, *spatial)`` → ``y: (N, d_out, *spatial_out)`` in ``x``'s dtype."""
        if self.per_sample is not None:  # a mixed batch: one adapter per row (mixed_batches)
            return self.per_sample(self, x)
        y = self.base_layer(x)
        conv = _CONV[len(self.kernel_shape) - 1]
        for name in self.unmerged_active():
            A, B, scale = self.lora_A[name], self.lora_B[name], self.specs[name].scale
            h = self._conv_as_base(self._adapter_input(x, name).to(A.dtype), A)  # (N, r, *spatial_out)
            y = y + conv(h * scale, B).to(y.dtype)
        return y


def _explicit_padding(conv: nn.Module) -> list[int]:
    """``F.pad``'s list for a conv's padding (last dimension first, left and right each): what
    ``nn.ConvNd`` pads with for a ``padding_mode`` other than zeros, from its public fields
    (``"same"`` puts the odd element on the right, as torch does)."""
    pairs = []
    for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation, strict=True)):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = d * (k - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = conv.padding[i]
        pairs.append((left, right))
    return [p for pair in reversed(pairs) for p in pair]


class LoRAEmbedding(_ReadsThrough, LoRAWrapper):
    """``nn.Embedding``: the weight ``(V, D)`` is a linear map from a one-hot token to its row,
    i.e. the matrix ``Wᵀ (D, V)``, so ``A: (r, V)``, ``B: (D, r)`` (PEFT's ``lora_embedding_A``
    / ``_B``) and ``y = W[ids] + scale · A[:, ids]ᵀ Bᵀ``; merging adds ``ΔWᵀ`` exactly.

    ``padding_idx`` is respected as ``nn.Embedding`` respects it: the adapter's column for that
    token starts at zero and gets no gradient (the lookup of ``A`` uses the base's
    ``padding_idx``), so training never changes the padding vector and the merged weight keeps
    the base's padding row. ``scale_grad_by_freq`` applies to ``A``'s gradient as to the base's;
    ``sparse`` does not (``A`` gets dense gradients, which every optimiser takes). Dropout does
    not apply (the input is token ids), as in PEFT. ``max_norm`` is refused: it renormalises
    looked-up rows of ``W`` in place, which no additive update can match.

    ``init="zeros_b"`` draws ``A ~ N(0, 1)`` (as ``nn.Embedding`` draws its rows; Kaiming over
    ``fan_in = V`` would make them tiny and ``B`` learn slowly) and ``B = 0``.
    """

    transposed = True
    embedding_keys = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, base_layer.embedding_dim, base_layer.num_embeddings)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm}: its forward renormalises the looked-up rows of the weight in place, "
                f"which no additive update can reproduce"
            )
        return _own_forward(module, nn.Embedding)

    def init_adapter(self, name: str) -> None:
        init_lora_(self.lora_A[name], self.lora_B[name], self.specs[name].init, a_std=1.0)
        if self.base_layer.padding_idx is not None:
            with torch.no_grad():
                self.lora_A[name][:, self.base_layer.padding_idx] = 0

    def forward(self, ids: Tensor) -> Tensor:
        """``y = W[ids] + Σ_active scale · A[:, ids]ᵀ Bᵀ``; ``ids: (...)`` → ``y: (..., D)``."""
        if self.per_sample is not None:  # a mixed batch: one adapter per row (mixed_batches)
            return self.per_sample(self, ids)
        y = self.base_layer(ids)
        base = self.base_layer
        for name in self.unmerged_active():
            A, B, scale = self.update(name)
            a = F.embedding(ids, A.T, base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)  # (..., r)
            y = y + F.linear(a * scale, B).to(y.dtype)
        return y


def _linear_dora_refusal(module: nn.Module) -> str | None:
    """Why DoRA cannot run on this ``nn.Linear`` (subclass), if it cannot: DoRA reads ``W`` (its
    row norms, and ``x Wᵀ = base(x) − b``), which a packed weight or a forward of its own hides."""
    if quantized.is_quantized(module):
        return (
            f"its weight is quantized ({type(module).__name__}); DoRA needs the row norms of the dequantized "
            f"W + s·B A at every step, which lightning-lora does not implement for 4/8-bit bases"
        )
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has a forward of its own, so base(x) − b need not be x Wᵀ, which DoRA rescales"
    return None


def _not_implemented(what: str) -> Callable[[nn.Module], str]:
    return lambda module: f"DoRA is implemented for nn.Linear and transformers' Conv1D only, not for {what}"


@dataclass(frozen=True)
class LayerType:
    """A type of layer LoRA adapts: how to recognise it, the wrapper that adapts it (``None``:
    ``nn.MultiheadAttention``, whose weights get a parametrization instead, see
    :mod:`lightning_lora.surgery`), whether ``"all-linear"`` includes it, and which modules of
    the type are refused (a reason, or ``None``), and which with ``use_dora``."""

    label: str
    matches: Callable[[nn.Module], bool]
    wrapper: type[LoRAWrapper] | None
    all_linear: bool
    refusal: Callable[[nn.Module], str | None] = lambda module: None
    dora_refusal: Callable[[nn.Module], str | None] = lambda module: None


LAYER_TYPES = (
    LayerType(
        "nn.Linear (and its subclasses)",
        lambda m: isinstance(m, nn.Linear),
        LoRALinear,
        True,
        dora_refusal=_linear_dora_refusal,
    ),
    LayerType("transformers Conv1D", LoRAConv1D.matches, LoRAConv1D, True),
    LayerType(
        "nn.MultiheadAttention",
        lambda m: isinstance(m, nn.MultiheadAttention),
        None,
        True,
        dora_refusal=lambda m: (
            "its adapters act on its weight tensors through a parametrization, where DoRA is not implemented "
            "(PEFT refuses DoRA on nn.MultiheadAttention too)"
        ),
    ),
    LayerType("nn.Conv1d/2d/3d", LoRAConv.matches, LoRAConv, False, LoRAConv.refusal, _not_implemented("convs")),
    LayerType(
        "nn.Embedding",
        LoRAEmbedding.matches,
        LoRAEmbedding,
        False,
        LoRAEmbedding.refusal,
        _not_implemented("embeddings"),
    ),
)
"""Every layer type LoRA adapts, in one place. ``"all-linear"`` follows PEFT: linear layers
(transformers' ``Conv1D`` included, GPT-2's projections), never conv or embedding layers."""

SUPPORTED = ", ".join(t.label for t in LAYER_TYPES)
LINEAR_TYPES = ", ".join(t.label for t in LAYER_TYPES if t.all_linear)


def layer_type(module: nn.Module) -> LayerType | None:
    """The :class:`LayerType` of ``module`` (of the module it wraps, for a LoRA wrapper)."""
    if isinstance(module, LoRAWrapper):
        module = module.base_layer
    return next((t for t in LAYER_TYPES if t.matches(module)), None)
