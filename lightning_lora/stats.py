"""Parameter counts of an adapted model, for loggers and the callback's table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .quantized import logical_numel
from .state import adapted_weights
from .tables import render_table, repeated_block


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted weight as reported: name, ``(d_out, d_in)``, rank, added parameters."""

    name: str
    shape: tuple[int, int]
    r: int
    params: int


@dataclass(frozen=True)
class ParameterStats:
    """Trainable vs total parameters (LoRA's included in both) and the adapted weights."""

    trainable: int
    total: int
    modules: list[AdaptedModule]

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_metrics(self, prefix: str = "lora/") -> dict[str, float]:
        return {
            f"{prefix}trainable_params": float(self.trainable),
            f"{prefix}total_params": float(self.total),
            f"{prefix}trainable_ratio": self.ratio,
        }

    def table(self) -> str:
        """Adapted weights grouped across repeated blocks (``layer.*.query  ×6``)."""
        groups: dict[tuple[str, tuple[int, int], int], list[AdaptedModule]] = {}
        for m in self.modules:
            key = (repeated_block(m.name), m.shape, m.r)
            groups.setdefault(key, []).append(m)
        rows = [("module", "shape", "r", "added params")]
        for (name, shape, r), ms in groups.items():
            count = f"  ×{len(ms)}" if len(ms) > 1 else ""
            rows.append((name + count, f"{shape[0]}×{shape[1]}", str(r), f"{sum(m.params for m in ms):,}"))
        lines = render_table(rows, rule=True)
        lines.append(f"trainable {self.trainable:,} / total {self.total:,} parameters ({100 * self.ratio:.3f}%)")
        return "\n".join(lines)


def parameter_stats(model: nn.Module) -> ParameterStats:
    """Counts for logging: every parameter once, LoRA's included; one row per adapted weight
    and adapter (with several adapters, each has its own row)."""
    params = list(model.parameters())
    modules = [
        AdaptedModule(
            t.name,
            (t.layer.d_out, t.layer.d_in),
            t.layer.specs[name].r,
            sum(p.numel() for p in t.layer.adapter_parameters(name).values()),
        )
        for t in adapted_weights(model)
        for name in t.layer.adapter_names
    ]
    return ParameterStats(
        trainable=sum(logical_numel(p) for p in params if p.requires_grad),
        total=sum(logical_numel(p) for p in params),
        modules=modules,
    )
