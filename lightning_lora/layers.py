"""The LoRA math: trainable low-rank updates beside frozen weights (Hu et al. 2021, §4.1).

::

    x ──► W (frozen, d_out × d_in) ─────────────────────────────────┐
    │                                                               (+)──► y
    └──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► × alpha/r ──┘

    y = x Wᵀ + b + (alpha/r) · dropout(x) Aᵀ Bᵀ        ΔW = (alpha/r) · B A

``A`` starts random and ``B`` at zero, so ``ΔW = 0`` and the model is unchanged at step 0; only
``A`` and ``B`` train. ``W ← W + ΔW`` (merge) gives a plain layer with no extra inference cost.

Two carriers share one parameter bank (:class:`LoRALayer`):

* a :class:`LoRAWrapper` calls the original module and adds the update on the activations:
  :class:`LoRALinear` for an ``nn.Linear`` (``x Aᵀ Bᵀ``: ``r · (d_in + d_out)`` multiply-adds per
  token, never a ``d_out × d_in`` matrix); :mod:`lightning_lora.layer_types` has the wrappers of
  the other layer types (transformers' ``Conv1D``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``).
* :class:`LoRAParametrization` adds ``ΔW`` to a weight *tensor* through
  ``torch.nn.utils.parametrize``. ``nn.MultiheadAttention`` needs this: it reads
  ``in_proj_weight`` and ``out_proj.weight`` directly (and ``nn.TransformerEncoderLayer``'s
  inference fast path never calls its ``forward``), so an update that lived in a wrapped
  ``forward`` would be skipped silently.

A layer holds any number of named adapters; ``active_adapters`` says which ones its forward adds.
``LoRALinear.forward`` runs one adapter over a plain frozen ``nn.Linear`` through the fast path
in :mod:`lightning_lora.fused` (same math, fewer passes over the activations) and everything else
through :meth:`LoRALinear.reference_forward`, the formula as written; tests compare the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .config import AdapterSpec
from .delta import Update, delta_weight, from_matrix, init_lora_, matrix_view, merged_block, with_block
from .errors import LoRAStateError


class LoRALayer(nn.Module):
    """The trainable part of LoRA for one frozen weight (or a block of its rows).

    Holds, per adapter name, ``lora_A[name]: (r, d_in)``, ``lora_B[name]: (d_out, r)`` and its
    :class:`~lightning_lora.config.AdapterSpec` (rank, alpha, dropout, init) in ``specs``.
    Subclasses decide where the update is applied. ``rows`` selects a block of rows of the host
    weight (q, k or v of a fused projection); ``None`` means the whole weight.

    ``A`` and ``B`` are stored in the shapes of PEFT's files (:meth:`adapter_shapes`: a conv's
    ``A`` is a kernel); the math sees them as matrices (:meth:`update`), and the host weight as
    the ``(d_out, d_in)`` matrix :func:`matrix_view` makes of it (``transposed`` for a weight
    stored ``(d_in, d_out)``).
    """

    transposed: ClassVar[bool] = False
    """Whether the host weight is stored ``(d_in, d_out)``, so that merging adds ``ΔWᵀ``."""

    embedding_keys: ClassVar[bool] = False
    """Whether adapter files key this layer's tensors ``lora_embedding_A`` / ``_B`` (PEFT's keys
    for ``nn.Embedding``) instead of ``lora_A.weight`` / ``lora_B.weight``."""

    def __init__(self, d_out: int, d_in: int, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.d_out, self.d_in, self.rows = d_out, d_in, rows
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    @property
    def r(self) -> dict[str, int]:
        """Rank per adapter name."""
        return {n: s.r for n, s in self.specs.items()}

    @property
    def scaling(self) -> dict[str, float]:
        """Scale (``alpha / r``, or ``alpha / sqrt(r)``) per adapter name."""
        return {n: s.scale for n, s in self.specs.items()}

    def add_adapter(
        self,
        name: str,
        spec: AdapterSpec,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Create adapter ``name`` with ``spec`` (not yet active: see :meth:`set_active`)."""
        if name in self.lora_A:
            raise LoRAStateError(f"this layer already has an adapter named {name!r}")
        a_shape, b_shape = self.adapter_shapes(spec.r)
        self.lora_A[name] = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.specs[name] = spec
        if self.lora_A[name].device.type != "meta":  # meta tensors are initialised by reset_parameters later
            self.init_adapter(name)

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``A`` and ``B`` at rank ``r``: ``(r, d_in)`` and ``(d_out, r)``."""
        return (r, self.d_in), (self.d_out, r)

    def init_adapter(self, name: str) -> None:
        """Draw adapter ``name``'s ``A`` and ``B`` as its spec's ``init`` says (:func:`init_lora_`)."""
        init_lora_(self.lora_A[name], self.lora_B[name], self.specs[name].init)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LoRAStateError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.lora_A[name], self.lora_B[name]
        del self.specs[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_active(self, names: Iterable[str]) -> None:
        names = list(names)
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise LoRAStateError(f"no adapter named {missing}; this layer has {self.adapter_names}")
        self.active_adapters = names

    def reset_parameters(self) -> None:
        """Re-draw every adapter as at creation: lets FSDP materialise meta-device adapters."""
        for name in self.adapter_names:
            self.init_adapter(name)

    def update(self, name: str) -> Update:
        """``(A (r, d_in), B (d_out, r), scale)`` of adapter ``name``: matrices (views of the
        stored tensors, so gradients reach them) whatever the layer type."""
        return self.lora_A[name].flatten(1), self.lora_B[name].flatten(1), self.specs[name].scale

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """``ΔW = scale · B A`` of shape ``(d_out, d_in)``, computed in ``dtype``."""
        return delta_weight(*self.update(name), dtype=dtype)

    def unmerged_active(self) -> list[str]:
        """Adapters the forward pass must add: active, not disabled, not already in ``W``."""
        if self.adapters_disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def region(self, weight: Tensor) -> Tensor:
        """The ``(d_out, d_in)`` matrix of the host ``weight`` this layer adapts: its rows, or the
        whole weight as :func:`matrix_view` sees it (a view where the layout allows one)."""
        if self.rows is not None:
            return weight[self.rows[0] : self.rows[1]]
        return matrix_view(weight, self.transposed)

    def write_region(self, weight: Tensor, block: Tensor) -> None:
        """Write the ``(d_out, d_in)`` ``block`` into the host ``weight`` (cast to its dtype)."""
        if self.rows is None:
            weight.copy_(from_matrix(block, weight.shape, self.transposed))
        else:
            self.region(weight).copy_(block)

    def merged_region(self, weight: Tensor, names: Iterable[str], sign: float = 1.0) -> Tensor:
        """``region(W) ± Σ ΔW`` in float32, without writing (see :func:`merged_block`)."""
        return merged_block(self.region(weight), [self.update(n) for n in names], sign)

    @torch.no_grad()
    def merge(self, weight: Tensor, names: Iterable[str]) -> None:
        """Write ``W ← W + Σ ΔW`` into ``weight`` (the host tensor) and mark ``names`` merged."""
        names = list(names)
        self.write_region(weight, self.merged_region(weight, names))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, weight: Tensor) -> list[str]:
        """Write ``W ← W − Σ ΔW`` for every merged adapter; returns their names."""
        names, self.merged_adapters = self.merged_adapters, []
        if names:
            self.write_region(weight, self.merged_region(weight, names, sign=-1.0))
        return names

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows[0]}:{self.rows[1]}"
        ranks = ", ".join(f"{n}: r={s.r}" for n, s in self.specs.items())
        return f"d_out={self.d_out}, d_in={self.d_in}{rows}, adapters=[{ranks}]"


class LoRAWrapper(LoRALayer):
    """A LoRA layer that wraps a module: calls it as is (``base_layer``), then adds the update.

    The base layer stays a module that is called, never re-implemented, so a subclass's own
    ``forward``, hooks, or a quantized replacement keep working. Unloading puts ``base_layer``
    back in its place.
    """

    def __init__(self, base_layer: nn.Module, d_out: int, d_in: int) -> None:
        super().__init__(d_out, d_in)
        self.base_layer = base_layer

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def host_weight(self) -> Tensor:
        return self.base_layer.weight

    def _adapter_input(self, x: Tensor, name: str) -> Tensor:
        """``dropout(x)`` for adapter ``name`` while training with dropout, else ``x`` itself
        (no dropout kernel at all when ``p == 0``)."""
        p = self.specs[name].dropout
        return F.dropout(x, p=p, training=True) if p > 0.0 and self.training else x


class LoRALinear(LoRAWrapper):
    """An ``nn.Linear`` (or subclass) plus LoRA updates applied on the activations.

    ``base_layer`` is the original module, called as is, so a subclass's own ``forward`` keeps
    working. ``weight`` and ``bias`` read through to it for code that inspects them.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if self.transposed:  # transformers' Conv1D: weight (d_in, d_out)
            d_in, d_out = base_layer.weight.shape
        else:  # the declared sizes: a quantized weight is stored packed, not (d_out, d_in)
            d_out, d_in = base_layer.out_features, base_layer.in_features
        super().__init__(base_layer, d_out, d_in)

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        """``dropout(x) Aᵀ Bᵀ`` for one adapter, unscaled, in the adapter's dtype."""
        A, B = self.lora_A[name], self.lora_B[name]
        return F.linear(F.linear(self._adapter_input(x, name).to(A.dtype), A), B)

    def forward(self, x: Tensor) -> Tensor:
        """``y = x Wᵀ + b + Σ_active (alpha/r) · dropout(x) Aᵀ Bᵀ``; ``x: (..., d_in)`` →
        ``y: (..., d_out)`` in ``x``'s dtype.

        One active adapter over a plain frozen ``nn.Linear`` or a frozen bitsandbytes 4/8-bit
        layer takes a fast path (:mod:`lightning_lora.fused`: the same math in fewer passes over
        the activations); everything else (several adapters, mixed dtypes outside autocast, a trainable
        or hooked base layer, another ``Linear`` subclass) takes :meth:`reference_forward`.
        """
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x)
        if len(names) == 1 and fused.fast_path_wanted():
            name = names[0]
            A, B = self.lora_A[name], self.lora_B[name]  # a Linear's are (r, d_in) and (d_out, r) as stored
            run = fused.fast_forward(self.base_layer, x, A, B)
            if run is not None:
                x_adapter = self._adapter_input(x, name)  # x itself without dropout: read once
                return run(x, A, B, self.specs[name].scale, None if x_adapter is x else x_adapter)
        return self.reference_forward(x, names)

    def reference_forward(self, x: Tensor, names: list[str] | None = None) -> Tensor:
        """The formula as written, through autograd: the base layer's own forward, then each
        adapter's update. The scale multiplies the ``(..., r)`` intermediate, not the output."""
        y = self.base_layer(x)
        for name in self.unmerged_active() if names is None else names:
            A, B, scale = self.update(name)
            y = y + F.linear(F.linear(self._adapter_input(x, name).to(A.dtype), A) * scale, B).to(y.dtype)
        return y


class LoRAParametrization(LoRALayer):
    """A parametrization ``W ↦ W + Σ ΔW`` on (a row block of) a weight tensor.

    Registered with ``torch.nn.utils.parametrize``, so every read of the tensor (a module's own
    forward, a fused fast path, an optimiser hook) sees the adapted weight. ``label`` names the
    block ("q", "k", "v" of a fused in-projection; "" for a whole tensor).
    """

    def __init__(self, d_out: int, d_in: int, rows: tuple[int, int] | None = None, label: str = "") -> None:
        super().__init__(d_out, d_in, rows)
        self.label = label

    def forward(self, weight: Tensor) -> Tensor:
        names = self.unmerged_active()
        if not names:
            return weight
        deltas = [self.delta_weight(n, dtype=self.lora_A[n].dtype) for n in names]
        delta = sum(deltas[1:], deltas[0]).to(weight.dtype)
        return with_block(weight, self.rows, self.region(weight) + delta)
