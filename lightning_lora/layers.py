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

DoRA (Liu et al. 2024, weight-decomposed LoRA; ``use_dora``) adds a trainable magnitude
``m: (d_out,)`` per adapter and rescales each output feature of the adapted weight to it::

    W' = (m / ‖W + s·B A‖) ⊙ (W + s·B A)        ‖·‖ per row, a constant (no gradient, §4.3)
    y  = x W'ᵀ + b = base(x) + (g − 1) ⊙ x Wᵀ + g ⊙ s · x Aᵀ Bᵀ,    g = m / ‖W + s·B A‖

(:meth:`LoRALinear.dora_output`; PEFT's ``DoraLinearLayer``, exactly).

A layer holds any number of named adapters; ``active_adapters`` says which ones its forward adds.
``LoRALinear.forward`` runs one adapter over a plain frozen ``nn.Linear`` through the fast path
in :mod:`lightning_lora.fused` (same math, fewer passes over the activations) and everything else
through :meth:`LoRALinear.reference_forward`, the formula as written; tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, fused_dora, quantized, shared_inputs
from .base_init import changes_base, principal_factors
from .config import AdapterSpec
from .delta import (
    Update,
    delta_weight,
    dora_merged_block,
    dora_unmerged_block,
    from_matrix,
    init_lora_,
    matrix_view,
    merged_block,
    weight_norm,
    with_block,
)
from .errors import LoRAStateError


class AdapterParameters(nn.ParameterDict):
    """A LoRA layer's ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector``: a ``ParameterDict``
    whose ``reset_parameters`` re-draws its layer's adapters. Lightning's meta-device
    materialisation (``ModelParallelStrategy``, Fabric) calls ``reset_parameters`` only on modules
    that own parameters directly, which a LoRA layer does not: without this, adapters injected
    on the meta device would train from uninitialised memory. The layer's ``lora_A`` re-draws it
    (every adapter has an ``A``); the other dicts leave it to that one, so it is drawn once."""

    def __init__(self, layer: LoRALayer) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: the layer owns this dict, not the reverse

    def reset_parameters(self) -> None:
        layer = self.__dict__["_layer"]
        if layer.lora_A is self:
            layer.reset_parameters()


class LoRALayer(nn.Module):
    """The trainable part of LoRA for one frozen weight (or a block of its rows).

    Holds, per adapter name, ``lora_A[name]: (r, d_in)``, ``lora_B[name]: (d_out, r)``, for a
    DoRA adapter ``lora_magnitude_vector[name]: (d_out,)`` (PEFT's names), and its
    :class:`~lightning_lora.config.AdapterSpec` (rank, alpha, dropout, init, ...) in ``specs``;
    :meth:`adapter_parameters` lists an adapter's tensors, for everything that enumerates them.
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

    supports_dora: ClassVar[bool] = False

    supports_base_init: ClassVar[bool] = False
    """Whether ``init="pissa"``/``"olora"`` can run here (a wrapper that owns its host weight)."""
    """Whether this layer computes DoRA adapters (:class:`LoRALinear` does)."""

    def __init__(self, d_out: int, d_in: int, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.d_out, self.d_in, self.rows = d_out, d_in, rows
        self.lora_A = AdapterParameters(self)
        self.lora_B = AdapterParameters(self)
        self.lora_magnitude_vector = AdapterParameters(self)  # DoRA adapters only
        self.merge_norms: dict[str, Tensor] = {}  # ‖W + s·B A‖ of each merged DoRA adapter, to unmerge it
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.initial: dict[str, tuple[Tensor, Tensor]] = {}  # A₀, B₀ of adapters whose init changed W
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
        if spec.use_dora and not self.supports_dora:  # injection refuses these first, naming the module
            raise LoRAStateError(f"{type(self).__name__} does not implement DoRA (use_dora=True)")
        if changes_base(spec.init) and not self.supports_base_init:
            raise LoRAStateError(f"{type(self).__name__} does not implement init={spec.init!r}")
        a_shape, b_shape = self.adapter_shapes(spec.r)
        self.lora_A[name] = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        if spec.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(self.d_out, dtype=dtype, device=device))
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
        if name in self.initial:
            raise LoRAStateError(
                f"adapter {name!r} was initialised with init={self.specs[name].init!r}, which moved the principal "
                f"part of W into it: deleting it would leave the residual weight, not the pretrained one. Merge it "
                f"(unload_lora(model, merge=True)) instead."
            )
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.specs[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_active(self, names: Iterable[str]) -> None:
        names = list(names)
        self.check_active(names)
        self.active_adapters = names

    def check_active(self, names: list[str]) -> None:
        """Refuse names this layer lacks, and a DoRA adapter together with another one: DoRA
        rescales the whole weight, so its update does not add to another's (PEFT rescales the
        previous adapter's output too, in activation order); nothing is set."""
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise LoRAStateError(f"no adapter named {missing}; this layer has {self.adapter_names}")
        dora = [n for n in names if self.specs[n].use_dora]
        if dora and len(names) > 1:
            raise LoRAStateError(
                f"DoRA adapter {dora[0]!r} cannot be active together with {[n for n in names if n != dora[0]]}: "
                f"DoRA rescales each row of W + ΔW, so the updates of several adapters do not add. Activate one "
                f"at a time (set_adapter(model, {dora[0]!r})), or merge one into the weights first."
            )

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s trainable tensors by part (:data:`~lightning_lora.names.PARTS`):
        ``"A"``, ``"B"`` and, for DoRA, the magnitude ``"m"``. The one list of what an adapter
        holds: training, checkpoints, files and counts all read it."""
        params = {"A": self.lora_A[name], "B": self.lora_B[name]}
        if name in self.lora_magnitude_vector:
            params["m"] = self.lora_magnitude_vector[name]
        return params

    def magnitude(self, name: str) -> Tensor | None:
        """DoRA's magnitude ``m: (d_out,)`` of adapter ``name``; ``None`` for a plain LoRA adapter."""
        return self.lora_magnitude_vector.get(name)

    def reset_parameters(self) -> None:
        """Re-draw every adapter as at creation: lets FSDP materialise meta-device adapters.
        Refused for an adapter whose init changed ``W``: re-running it would subtract twice."""
        if self.initial:
            raise LoRAStateError(
                f"adapters {sorted(self.initial)} were initialised from W (init={self.specs[next(iter(self.initial))].init!r}) "
                f"and W was changed; they cannot be re-drawn. Inject them after the pretrained weights are loaded."
            )
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

    def merged_region(self, weight: Tensor, names: Iterable[str]) -> Tensor:
        """``region(W) + Σ ΔW`` in float32, without writing (see :func:`merged_block`); for a DoRA
        adapter, which merges alone, ``(m / ‖W + ΔW‖) ⊙ (W + ΔW)`` (:func:`dora_merged_block`)."""
        return self._merged(weight, list(names))[0]

    def _merged(self, weight: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The merged region in float32, and the norms of the DoRA adapter merged (if one)."""
        dora = [n for n in names if self.specs[n].use_dora]
        if not dora:
            return merged_block(self.region(weight), [self.update(n) for n in names]), {}
        if len(names) > 1:  # merge_plan refuses this before anything is written
            raise LoRAStateError(f"DoRA adapter {dora[0]!r} merges alone, not together with {names}")
        name = dora[0]
        block, norm = dora_merged_block(self.region(weight), self.update(name), self.lora_magnitude_vector[name])
        return block, {name: norm}

    @torch.no_grad()
    def merge(self, weight: Tensor, names: Iterable[str]) -> None:
        """Write ``W ← W + Σ ΔW`` (DoRA: ``W ← (m / ‖W + ΔW‖) ⊙ (W + ΔW)``, keeping the norms for
        :meth:`unmerge`) into ``weight`` (the host tensor) and mark ``names`` merged."""
        names = list(names)
        block, norms = self._merged(weight, names)
        self.write_region(weight, block)
        self.merge_norms.update(norms)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, weight: Tensor) -> list[str]:
        """Write ``W ← W − Σ ΔW`` for every merged adapter, undoing DoRA merges in reverse order
        with the norms they used; formed in float32 and cast once. Returns the adapters' names."""
        names, self.merged_adapters = self.merged_adapters, []
        if not any(n in self.merge_norms for n in names):
            if names:
                self.write_region(weight, merged_block(self.region(weight), [self.update(n) for n in names], -1.0))
            return names
        block = self.region(weight).float()
        for name in reversed(names):
            if name in self.merge_norms:
                block = dora_unmerged_block(block, self.update(name), self.magnitude(name), self.merge_norms.pop(name))
            else:
                block = merged_block(block, [self.update(name)], -1.0)
        self.write_region(weight, block)
        return names

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows[0]}:{self.rows[1]}"
        ranks = ", ".join(f"{n}: r={s.r}{', DoRA' if s.use_dora else ''}" for n, s in self.specs.items())
        return f"d_out={self.d_out}, d_in={self.d_in}{rows}, adapters=[{ranks}]"


class LoRAWrapper(LoRALayer):
    """A LoRA layer that wraps a module: calls it as is (``base_layer``), then adds the update.

    The base layer stays a module that is called, never re-implemented, so a subclass's own
    ``forward``, hooks, or a quantized replacement keep working. Unloading puts ``base_layer``
    back in its place.
    """

    per_sample: Callable[[LoRAWrapper, Tensor], Tensor] | None = None
    """Set on the layer only inside :func:`~lightning_lora.mixed_batches.per_sample_adapters`:
    the forward that runs each row of the batch with its own adapter."""

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
    working. ``weight`` and ``bias`` read through to it for code that inspects them. DoRA
    adapters (:meth:`dora_output`) are computed here, on the reference path.
    """

    supports_dora = True
    supports_base_init = True

    def __init__(self, base_layer: nn.Module) -> None:
        if self.transposed:  # transformers' Conv1D: weight (d_in, d_out)
            d_in, d_out = base_layer.weight.shape
        else:  # the declared sizes: a quantized weight is stored packed, not (d_out, d_in)
            d_out, d_in = base_layer.out_features, base_layer.in_features
        super().__init__(base_layer, d_out, d_in)
        self._norm_cache: dict[str, dict] = {}  # DoRA's fast path: ‖Wᵢ‖² per adapter (fused_dora.row_norms)

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    def init_adapter(self, name: str) -> None:
        """``A`` and ``B`` as :meth:`LoRALayer.init_adapter` draws them; a DoRA magnitude starts at
        ``‖W + s·B A‖``, so that ``W' = W + s·B A`` at step 0 (``W`` itself with ``B = 0``)."""
        if changes_base(self.specs[name].init):
            self.move_principal_part(name)
        else:
            super().init_adapter(name)
        if name in self.lora_magnitude_vector:
            with torch.no_grad():
                self.lora_magnitude_vector[name].copy_(self.weight_norm(name))

    @torch.no_grad()
    def move_principal_part(self, name: str) -> None:
        """PiSSA / OLoRA (:mod:`lightning_lora.base_init`): ``A``, ``B`` from ``W``'s principal
        part, ``W ← W − s·B A`` with the ``A``/``B`` as stored (so ``W + s·B A`` is the old ``W``
        up to one rounding of ``W``'s dtype); ``A₀``, ``B₀`` are kept for the conversion to a
        plain LoRA adapter at save."""
        spec, weight = self.specs[name], self.host_weight()
        A0, B0 = principal_factors(self.region(weight), spec.r, spec.scale, spec.init)
        A, B = self.lora_A[name], self.lora_B[name]
        A.copy_(A0.reshape(A.shape))
        B.copy_(B0.reshape(B.shape))
        self.write_region(weight, merged_block(self.region(weight), [self.update(name)], sign=-1.0))
        self.initial[name] = (A.detach().clone(), B.detach().clone())

    def weight_norm(self, name: str) -> Tensor:
        """DoRA's ``‖W + s·B A‖`` per output feature, ``(d_out,)`` float32, computed without
        autograd (:func:`~lightning_lora.delta.weight_norm`): no tensor of ``W``'s size is kept."""
        if quantized.is_quantized(self.base_layer):  # injection refuses it; a base quantized after it lands here
            raise LoRAStateError(
                f"DoRA adapter {name!r} sits on a quantized {type(self.base_layer).__name__}: lightning-lora does not "
                f"implement DoRA over 4/8-bit weights (it needs the dequantized W's row norms every step). Train it "
                f"on the dense base, or use plain LoRA (use_dora=False) for QLoRA."
            )
        return weight_norm(self.region(self.host_weight()), self.update(name))

    def dora_output(self, x: Tensor, x_adapter: Tensor, base_output: Tensor, name: str) -> Tensor:
        """What DoRA adapter ``name`` adds to ``base_output = base(x)``, in the adapter's dtype::

            g = m / ‖W + s·B A‖                   (d_out,), the norm a constant (§4.3)
            h = x_a Wᵀ + s · x_a Aᵀ Bᵀ            (..., d_out): x_a (W + s·B A)ᵀ
            out = g ⊙ h − x_a Wᵀ                   = (g − 1) ⊙ x_a Wᵀ + g ⊙ s · x_a Aᵀ Bᵀ

        ``x_a`` is the adapter's input: ``x``, whose ``x Wᵀ`` is ``base(x) − b`` (no second
        product), or ``dropout(x)`` while training with dropout, whose ``x_a Wᵀ`` PEFT computes
        again, and so does this. PEFT's ``DoraLinearLayer`` in another order of the same terms:
        autograd keeps ``h`` and ``g`` here (one ``(..., d_out)`` tensor beside LoRA's
        ``(..., r)``), where PEFT's ``(g − 1) · base + g · lora`` keeps two."""
        A, B, scale = self.update(name)
        x_a = x_adapter.to(A.dtype)
        lora = F.linear(F.linear(x_a, A) * scale, B)
        if x_adapter is x:
            bias = self.base_layer.bias
            base = (base_output if bias is None else base_output - bias).to(A.dtype)
        else:
            base = F.linear(x_a, self.region(self.host_weight()).to(A.dtype))
        m = self.lora_magnitude_vector[name]
        g = (m.float() / self.weight_norm(name)).to(A.dtype)
        return g * (base + lora) - base

    def plain_fast_A(self, x: Tensor) -> Tensor | None:
        """The ``A`` of the one adapter that :meth:`forward` would run on ``x`` through the plain
        LoRA Function in one dtype (no DoRA, no dropout drawn, outside autocast), else ``None``:
        what :mod:`~lightning_lora.shared_inputs` may compute ahead for this layer."""
        names = self.unmerged_active()
        if self.per_sample is not None or len(names) != 1 or not fused.fast_path_wanted():
            return None
        spec = self.specs[names[0]]
        if spec.use_dora or (spec.dropout > 0.0 and self.training):
            return None
        A, B = self.lora_A[names[0]], self.lora_B[names[0]]
        return A if fused.fits(self.base_layer, x, A, B) else None

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        """``dropout(x) Aᵀ Bᵀ`` for one adapter, unscaled, in the adapter's dtype."""
        A, B = self.lora_A[name], self.lora_B[name]
        return F.linear(F.linear(self._adapter_input(x, name).to(A.dtype), A), B)

    def forward(self, x: Tensor) -> Tensor:
        """``y = x Wᵀ + b + Σ_active (alpha/r) · dropout(x) Aᵀ Bᵀ``; ``x: (..., d_in)`` →
        ``y: (..., d_out)`` in ``x``'s dtype.

        One active adapter over a plain frozen ``nn.Linear`` or a frozen bitsandbytes 4/8-bit
        layer takes a fast path (:mod:`lightning_lora.fused`: the same math in fewer passes over
        the activations); everything else (several adapters, mixed dtypes outside autocast, a
        trainable or hooked base layer, another ``Linear`` subclass, a DoRA adapter with dropout
        while training) takes :meth:`reference_forward`; a DoRA adapter otherwise takes
        :mod:`lightning_lora.fused_dora`.
        """
        if self.per_sample is not None:  # a mixed batch: one adapter per row (mixed_batches)
            return self.per_sample(self, x)
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x)
        if len(names) == 1 and fused.fast_path_wanted():
            name = names[0]
            A, B = self.lora_A[name], self.lora_B[name]  # a Linear's are (r, d_in) and (d_out, r) as stored
            spec = self.specs[name]
            if spec.use_dora:  # its own Function; with dropout drawn while training, the reference
                if not (spec.dropout > 0.0 and self.training):
                    cache = self._norm_cache.setdefault(name, {})
                    y = fused_dora.fast_forward(self.base_layer, x, A, B, self.magnitude(name), spec.scale, cache)
                    if y is not None:
                        return y
                return self.reference_forward(x, names)
            run = fused.fast_forward(self.base_layer, x, A, B)
            if run is not None:
                x_adapter = self._adapter_input(x, name)  # x itself without dropout: read once
                shareable = shared_inputs.input_sharing() and self.plain_fast_A(x) is A
                projected = shared_inputs.projection(self, x, A) if shareable else None
                if projected is not None:  # x Aᵀ from one GEMM shared with sibling layers
                    base = self.base_layer
                    return fused.LoRALinearFunction.apply(
                        x, base.weight, base.bias, None, B, spec.scale, None, None, projected
                    )
                return run(x, A, B, self.specs[name].scale, None if x_adapter is x else x_adapter)
        return self.reference_forward(x, names)

    def reference_forward(self, x: Tensor, names: list[str] | None = None) -> Tensor:
        """The formula as written, through autograd: the base layer's own forward, then each
        adapter's update (a DoRA adapter's: :meth:`dora_output`). The scale multiplies the
        ``(..., r)`` intermediate, not the output."""
        y = base_output = self.base_layer(x)
        for name in self.unmerged_active() if names is None else names:
            x_adapter = self._adapter_input(x, name)
            if self.specs[name].use_dora:
                y = y + self.dora_output(x, x_adapter, base_output, name).to(y.dtype)
                continue
            A, B, scale = self.update(name)
            y = y + F.linear(F.linear(x_adapter.to(A.dtype), A) * scale, B).to(y.dtype)
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
