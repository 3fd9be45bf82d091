"""LoRA over a quantized base (QLoRA): bitsandbytes' 4-bit and 8-bit Linear layers.

A quantized layer keeps its weight packed (4-bit: ``uint8`` pairs plus a quantization state;
8-bit: ``int8`` rows plus one scale each), so nothing may ever write ``ΔW`` into it. What LoRA
needs from it is small, and lives here:

* whether a module is such a layer (:func:`is_quantized`), recognised by its class's module, so
  bitsandbytes is imported only when a model already holds one of its layers;
* the dtype it computes in (:func:`compute_dtype`), which the adapters follow by default;
* its weight as a dense ``(d_out, d_in)`` float32 tensor (:func:`dequantized`), for the input
  gradient of the fast path, for merging and for analysis;
* a plain ``nn.Linear`` holding a given dense weight (:func:`dense_linear`), which is what
  ``unload_lora(merge=True)`` gives back for a quantized layer: the merged model in the compute
  dtype (dequantize → merge in fp32 → cast once), and, on request, :func:`requantized`: the same
  layer type again, holding ``Q(W + ΔW)``, with the error that the requantization adds.

Checked against bitsandbytes 0.50.2 (CPU and CUDA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _bnb_class(module: nn.Module) -> str | None:
    """The name of the bitsandbytes Linear class ``module`` is (or derives from), else ``None``."""
    return _bnb_class_of(type(module))


@functools.cache
def _bnb_class_of(kind: type) -> str | None:  # asked on every forward: once per class
    for cls in kind.__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return cls.__name__
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit Linear (Lightning's
    ``BitsandbytesPrecision`` layers derive from these)."""
    return _bnb_class(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in: a 4-bit layer's ``compute_dtype`` (else the dtype
    it was quantized from), float16 for 8-bit layers (bitsandbytes' int8 matmul computes in it)."""
    if _bnb_class(module) == "Linear4bit":
        if getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
        state = getattr(module.weight, "quant_state", None)
        return state.dtype if state is not None else torch.float32
    return torch.float16


def is_packed(weight: Tensor) -> bool:
    """Whether ``weight`` holds packed integers (a quantized layer's storage), not real numbers."""
    return not weight.is_floating_point()


def logical_numel(param: Tensor) -> int:
    """How many numbers ``param`` stands for: a packed 4-bit weight holds two per byte (its
    quantization state knows the original shape); anything else, its ``numel()``."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None and is_packed(param) else param.numel()


def dequantized(module: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight of quantized ``module`` as a dense ``(d_out, d_in)`` tensor in ``dtype``,
    exactly the values its forward pass multiplies with. A weight not yet quantized (bitsandbytes
    quantizes when the layer moves to its device) is returned as it is."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if not is_packed(weight):
        return weight.detach().to(dtype)
    if _bnb_class(module) == "Linear4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU inference kernel (0.50.2); undo it.
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        dense = bnbf.dequantize_4bit(data, state)  # in the dtype it was quantized from
        return dense.to(dtype).reshape(module.out_features, module.in_features)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales).to(dtype)


def dense_linear(module: nn.Module, weight: Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` and ``module``'s bias, in ``dtype`` (default: the
    compute dtype of ``module``), on ``module``'s device."""
    dtype = dtype or compute_dtype(module)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
    return dense


@dataclass(frozen=True)
class RequantizationError:
    """How far ``Q(W + ΔW)`` lies from ``W + ΔW`` for one layer: the largest absolute difference
    and the Frobenius norm of the difference relative to ``‖W + ΔW‖``."""

    name: str
    max_abs: float
    relative: float


def requantized(module: nn.Module, weight: Tensor, name: str = "") -> tuple[nn.Module, RequantizationError]:
    """A layer of ``module``'s own quantized type holding ``weight`` (a dense float tensor),
    quantized on ``weight``'s device, and the error the quantization added."""
    import bitsandbytes as bnb

    device = weight.device
    if _bnb_class(module) == "Linear4bit":
        state = module.weight.quant_state
        new = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype(module),
            compress_statistics=state.nested if state is not None else True,
            quant_type=state.quant_type if state is not None else "nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu", compute_dtype(module)),
            requires_grad=False,
            compress_statistics=new.weight.compress_statistics,
            quant_type=new.weight.quant_type,
        )
    else:
        new = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False
        )
        new.weight = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().to("cpu", compute_dtype(module)), requires_grad=False)
    new = new.to(device)  # bitsandbytes quantizes here
    error = dequantized(new) - weight.float()
    reference = weight.float().norm().clamp_min(torch.finfo(torch.float32).tiny)
    return new, RequantizationError(name, float(error.abs().max()), float(error.norm() / reference))
