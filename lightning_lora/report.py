"""How far a merge moves the model: the merge report.

Merging writes ``W + ΔW``, computed in float32, into ``W``'s dtype: one rounding per weight. In
float32 the merged model computes what the adapted one did up to float32 rounding; in bfloat16
it differs visibly, and users of other libraries report that as a bug (PEFT #1388, #2502). The
report puts a number on it, for one probe batch, and says whether the dtype explains it:

* ``weight_max_ulps``: the largest error of the merged weights (the fp32 sum ``W + ΔW`` cast to
  ``W``'s dtype, which is what ``merge_lora`` writes) against the exact fp32 merge, in units in
  the last place of the weight's dtype. A merge rounds once, so at most 0.5.
* ``output_max_abs_diff`` / ``output_max_rel_diff``: the largest difference between the
  unmerged and the merged model's outputs (relative: to the largest output magnitude).
* ``output_tolerance``: the relative difference the dtype explains, :func:`dtype_tolerance`:
  ``DRIFT_ULPS`` units of the dtype's machine epsilon, at least ``DRIFT_FLOOR``. Far beyond it,
  the merged model computes
  something else than the trained one (a layer that does not use its weight as ``x Wᵀ``, a
  weight read elsewhere), which is exactly what a silently wrong merge looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .delta import matrix_view
from .errors import LoRAStateError
from .merge import merge_lora, merge_plan, refuse_nonfinite, refuse_tied
from .names import block_rows, parse_weight_name
from .state import require_adapted

if TYPE_CHECKING:
    from .adapter_file import AdapterFile

DRIFT_ULPS = 4
"""Output drift the dtype explains, in machine epsilons of the lowest-precision merged weight,
relative to the largest output: each merged weight is rounded once. Measured
(``experiments/merge_drift/drift.py``): at most 1.2 eps in bfloat16 and float16 on tiny Llama,
BERT, T5, GPT-2 and all-MiniLM-L6-v2."""

DRIFT_FLOOR = 2.0**-14
"""The smallest relative drift :func:`dtype_tolerance` allows (≈ 6.1e-5): in float32 the forward
pass's own rounding, not the weights', sets the drift (at most 4.8 eps in the experiment; 25 eps
≈ 3e-6 in the GPT-2 case of ``tests/test_merge_report.py``, whose adapters outweigh its weights),
while a merge that computes something else moves the outputs by ΔW's own share, orders of
magnitude more."""


def dtype_tolerance(dtype: torch.dtype) -> float:
    """The relative output drift a merge in ``dtype`` explains: ``DRIFT_ULPS · eps(dtype)``, at
    least ``DRIFT_FLOOR`` (float32: 6.1e-5, bfloat16: 0.031, float16: 0.0039)."""
    return max(DRIFT_ULPS * torch.finfo(dtype).eps, DRIFT_FLOOR)


@dataclass(frozen=True)
class MergeReport:
    """What merging did to the model, on one probe batch (see the module docstring)."""

    dtype: str
    weights: int
    weight_max_abs_error: float
    weight_max_ulps: float
    worst_weight: str
    output_max_abs_diff: float | None = None
    output_max_rel_diff: float | None = None
    output_tolerance: float | None = None

    @property
    def within_dtype(self) -> bool:
        """Whether the dtype's rounding explains every difference."""
        weights_ok = self.weight_max_ulps <= 0.5
        outputs_ok = self.output_max_rel_diff is None or self.output_max_rel_diff <= (self.output_tolerance or 0.0)
        return weights_ok and outputs_ok

    def as_metrics(self) -> dict[str, float]:
        """``lora/merge_*`` figures for a logger."""
        metrics = {
            "lora/merge_weight_max_abs_error": self.weight_max_abs_error,
            "lora/merge_weight_max_ulps": self.weight_max_ulps,
            "lora/merge_within_dtype": float(self.within_dtype),
        }
        if self.output_max_abs_diff is not None:
            metrics["lora/merge_output_max_abs_diff"] = self.output_max_abs_diff
            metrics["lora/merge_output_max_rel_diff"] = float(self.output_max_rel_diff or 0.0)
            metrics["lora/merge_output_tolerance"] = float(self.output_tolerance or 0.0)
        return metrics

    def text(self) -> str:
        """A few lines for a terminal or a log."""
        lines = [
            f"merge report ({self.weights} weight(s), {self.dtype}): merged weights within "
            f"{self.weight_max_ulps:.3g} ulp of an exact fp32 merge (max abs error {self.weight_max_abs_error:.3g}, "
            f"at {self.worst_weight!r})"
        ]
        if self.output_max_abs_diff is not None:
            lines.append(
                f"outputs, merged vs unmerged: max abs diff {self.output_max_abs_diff:.3g}, max rel diff "
                f"{self.output_max_rel_diff:.3g} (the dtype explains up to {self.output_tolerance:.3g})"
            )
        if not self.within_dtype:
            lines.append(
                "the merged model differs from the unmerged one by more than its dtype explains: some layer does not "
                "compute x·Wᵀ with the weight the merge wrote into (or reads it elsewhere). Keep the adapter unmerged."
            )
        return "\n".join(lines)


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` at ``|x|`` (float32 tensor of the same shape; normal numbers)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))
    return torch.exp2(exponent) * info.eps


def weight_errors(exact: Tensor, merged: Tensor) -> tuple[float, float]:
    """``(max |merged − exact|, the same in ulps of merged's dtype)`` for one weight."""
    error = (merged.float() - exact).abs()
    return float(error.max()), float((error / ulp(exact, merged.dtype)).max())


class _Weights:
    """Running maxima over the merged weights."""

    def __init__(self) -> None:
        self.count, self.abs, self.ulps, self.worst, self.dtypes = 0, 0.0, 0.0, "", set()

    def add(self, name: str, exact: Tensor, merged: Tensor) -> None:
        abs_error, ulps = weight_errors(exact, merged)
        self.count += 1
        self.dtypes.add(merged.dtype)
        self.abs = max(self.abs, abs_error)
        if ulps >= self.ulps:
            self.ulps, self.worst = ulps, name

    @property
    def dtype(self) -> torch.dtype:
        return max(self.dtypes, key=lambda d: torch.finfo(d).eps)

    def report(self, **outputs: float) -> MergeReport:
        """The :class:`MergeReport` of these weights (and, for a model, its outputs)."""
        return MergeReport(
            dtype=str(self.dtype).removeprefix("torch."),
            weights=self.count,
            weight_max_abs_error=self.abs,
            weight_max_ulps=self.ulps,
            worst_weight=self.worst,
            **outputs,
        )


def _tensors(output: Any) -> Iterator[Tensor]:
    """Every floating tensor in a model's output (a tensor, a tuple, a dict, a ModelOutput)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _outputs(
    model: nn.Module, inputs: Any, forward: Callable[[nn.Module, Any], Any], watch: nn.Module | None
) -> Tensor:
    """The probe's outputs, flattened to one float32 vector: what ``watch`` returns during the
    call (every call), else what ``forward`` returns. The RNG is forked, so every probe sees the
    same random state and training's stream is untouched."""
    captured: list[Any] = []
    handle = watch.register_forward_hook(lambda _m, _i, out: captured.append(out)) if watch is not None else None
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            result = forward(model, inputs)
    finally:
        if handle is not None:
            handle.remove()
    tensors = list(_tensors(captured if captured else result))
    if not tensors:
        raise LoRAStateError(
            "merge_report found no floating-point tensor in the model's output; pass forward=... that returns "
            "the outputs to compare (e.g. lambda m, batch: m(batch['input_ids']).logits)."
        )
    return torch.cat([t.detach().float().flatten() for t in tensors])


def merge_report(
    model: nn.Module,
    inputs: Any,
    *,
    forward: Callable[[nn.Module, Any], Any] = call_model,
    watch: nn.Module | None = None,
    keep_merged: bool = False,
) -> MergeReport:
    """Merge the active adapters and measure, on the probe batch ``inputs``, how far the merged
    model's outputs are from the unmerged one's and how far its weights are from an exact fp32
    merge (:class:`MergeReport`).

    ``forward(model, inputs)`` runs the probe (default :func:`call_model`); with ``watch`` (a
    submodule), the outputs compared are what ``watch`` returns during that call, e.g. the
    Hugging Face model inside a LightningModule whose ``training_step`` calls it. Runs in eval
    mode without autograd (each module's mode is restored).

    ``keep_merged=False`` (default) gives the model back exactly as it was, unmerged: the
    adapted weights are copied to the CPU before the merge and copied back (an unmerge would be
    exact in float32 only). ``keep_merged=True`` leaves the merge in place (as ``merge_lora``),
    copying nothing: what ``LoRACallback`` does at the end of ``fit`` just before it unloads.
    A merge that ``merge_lora`` refuses (NaN/Inf, a shared weight) raises and changes nothing.
    """
    plan = merge_plan(require_adapted(model, "report on a merge"), None)  # what merge_lora will do
    refuse_tied(model, plan)  # its refusals first: nothing below runs on a merge it would refuse
    refuse_nonfinite(plan)
    weights = _Weights()
    for t, names in plan:  # one weight at a time: never a second copy of the model
        exact = t.layer.merged_region(t.weight, names)
        weights.add(t.name, exact, exact.to(t.weight.dtype))  # what merge_lora writes: the fp32 sum, cast once
    with _probing(model):
        before = _outputs(model, inputs, forward, watch)
        saved = None if keep_merged else [(t, t.layer.region(t.weight).detach().cpu().clone()) for t, _ in plan]
        merge_lora(model, safe=True)
        try:
            after = _outputs(model, inputs, forward, watch)
        finally:
            if saved is not None:
                _restore(saved)
    diff = float((after - before).abs().max()) if before.numel() else 0.0
    scale = float(before.abs().max()) if before.numel() else 0.0
    return weights.report(
        output_max_abs_diff=diff,
        output_max_rel_diff=diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")),
        output_tolerance=dtype_tolerance(weights.dtype),
    )


@torch.no_grad()
def _restore(saved: list[tuple[Any, Tensor]]) -> None:
    """Put the pre-merge weights back, bit for bit, and mark nothing merged."""
    for target, region in saved:
        target.layer.write_region(target.weight, region.to(target.weight.device))
        target.layer.merged_adapters = []


def file_merge_report(
    base: Mapping[str, Tensor],
    merged: Mapping[str, Tensor],
    adapter: AdapterFile,
    prefix: str = "",
    transposed: Collection[str] = (),
) -> MergeReport:
    """The weight part of the report for a merge of files (``lightning-lora merge``: no model,
    so no outputs): each merged tensor written against the exact fp32 merge of the base's.
    ``transposed`` names the weights stored ``(d_in, d_out)`` (transformers' ``Conv1D``)."""
    weights = _Weights()
    for name in adapter.pairs:
        parsed = parse_weight_name(name)
        key = parsed.state_dict_key(prefix)
        rows = block_rows(parsed.label, base[key].shape[0]) if parsed.fused else None

        def region(weight: Tensor, rows: tuple[int, int] | None = rows, flip: bool = name in transposed) -> Tensor:
            return weight[rows[0] : rows[1]] if rows is not None else matrix_view(weight, flip)

        exact = adapter.merged(name, region(base[key]))
        weights.add(name, exact, region(merged[key]))
    return weights.report()
