"""What :class:`~lightning_lora.LoRACallback` tells the loggers: its options and parameter
counts at fit start; at fit end, what the adapter learned (ΔW spectra), the ranks it suggests,
and how far the merge moved the model. Figures go to every logger (``lora/...``); tables to
Weights & Biases, and as text to the console."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from . import quantized
from .advisor import ENERGIES, suggest_ranks
from .analysis import delta_stats, summary_metrics
from .errors import LoRAStateError
from .report import MergeReport, merge_report
from .state import adapted_weights
from .stats import ParameterStats


def factory_node(factory: Callable[..., Any] | None) -> dict[str, Any] | None:
    """A factory as the Hydra node that builds it: ``{_target_, _partial_: true, **keywords}``."""
    if factory is None:
        return None
    func, args, keywords = factory, (), {}
    if isinstance(factory, functools.partial):
        func, args, keywords = factory.func, factory.args, factory.keywords
    target = f"{func.__module__}.{getattr(func, '__qualname__', type(func).__qualname__)}"
    return {"_target_": target, "_partial_": True, **({"_args_": list(args)} if args else {}), **keywords}


def log_options_and_counts(
    trainer: pl.Trainer, hyperparameters: dict[str, Any], stats: ParameterStats, adapter_name: str
) -> None:
    """The callback's node under ``lora`` (hyper-parameters) and the parameter counts."""
    for logger in trainer.loggers:
        logger.log_hyperparams({"lora": hyperparameters})
        logger.log_metrics(stats.as_metrics(), step=trainer.global_step)
    rank_zero_info(f"LoRA adapter {adapter_name!r}:\n{stats.table()}")


def _log_table(trainer: pl.Trainer, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=rows, step=trainer.global_step)


def log_delta_analysis(trainer: pl.Trainer, pl_module: nn.Module, adapter_name: str) -> None:
    """Mean effective rank and ‖ΔW‖/‖W‖ to every logger; a per-weight table to W&B."""
    stats = delta_stats(pl_module, adapter_name)
    columns = ["weight", "r", "effective_rank", "relative_norm", "delta_norm", "top_singular_values"]
    rows = [
        [
            s.name,
            s.r,
            s.effective_rank,
            s.relative_norm,
            s.delta_norm,
            str([round(v, 5) for v in s.singular_values[:8]]),
        ]
        for s in stats
    ]
    for logger in trainer.loggers:
        logger.log_metrics(summary_metrics(stats), step=trainer.global_step)
    _log_table(trainer, "lora/delta_stats", columns, rows)


def log_rank_advice(trainer: pl.Trainer, pl_module: nn.Module, adapter_name: str) -> None:
    """The ranks the trained adapter suggests (:func:`~lightning_lora.advisor.suggest_ranks`) at
    90/95/99% of each ‖ΔW‖²: the parameters each needs, as a share of today's, to every logger
    (``lora_advice/params_share_at_90`` …); a per-weight table to W&B and the console."""
    figures, by_weight = {}, {}
    for energy in ENERGIES:
        suggestion = suggest_ranks(pl_module, energy=energy, adapter_name=adapter_name)
        tag = f"{round(energy * 100)}"
        figures[f"lora_advice/params_at_{tag}"] = float(suggestion.params)
        figures[f"lora_advice/params_share_at_{tag}"] = suggestion.params / max(suggestion.params_before, 1)
        figures[f"lora_advice/mean_rank_at_{tag}"] = sum(suggestion.ranks.values()) / len(suggestion.ranks)
        by_weight[tag] = suggestion
    for logger in trainer.loggers:
        logger.log_metrics(figures, step=trainer.global_step)
    middle = by_weight[f"{round(ENERGIES[1] * 100)}"]
    columns = ["weight", "r", "effective_rank", *(f"rank_at_{round(e * 100)}" for e in ENERGIES)]
    rows = [[s.name, s.r, s.effective_rank, *(s.rank_for(e) for e in ENERGIES)] for s in middle.spectra]
    _log_table(trainer, "lora/rank_advice", columns, rows)
    rank_zero_info(f"LoRA rank advice for adapter {adapter_name!r}:\n{middle.table()}")


def log_merge_report(trainer: pl.Trainer, report: MergeReport) -> None:
    """``lora/merge_*`` to every logger; the text to the console, and as a warning when the
    merged model differs from the trained one by more than its dtype explains."""
    for logger in trainer.loggers:
        logger.log_metrics(report.as_metrics(), step=trainer.global_step)
    (rank_zero_info if report.within_dtype else rank_zero_warn)(report.text())


def training_step_probe(module: pl.LightningModule, batch: Any) -> Any:
    """``training_step`` on ``batch`` with ``self.log`` muted: Lightning refuses logging outside
    its loops, and the merge report runs the step after ``fit``."""
    module.__dict__["log"] = module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        return module.training_step(batch, 0)
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def adapter_bytes_figure(directory: Path | None) -> dict[str, float]:
    """``lora/adapter_bytes``: the size of the saved adapter's files."""
    if directory is None or not directory.is_dir():
        return {}
    return {"lora/adapter_bytes": float(sum(f.stat().st_size for f in directory.glob("*") if f.is_file()))}


def report_on_merge(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, probe: Callable[..., Any], root: str | None
) -> None:
    """The merge report on ``batch``, merging as it measures (``keep_merged``; the callback
    then only unloads). Skipped for a quantized base, which merges into new dense layers; a
    merge that ``merge_lora`` refuses (NaN/Inf) raises, having changed nothing."""
    if any(quantized.is_packed(t.weight) for t in adapted_weights(pl_module)):
        return
    watch = pl_module.get_submodule(root) if root else None
    try:
        report = merge_report(pl_module, batch, forward=probe, watch=watch, keep_merged=True)
    except LoRAStateError:
        raise
    except Exception as err:  # the probe failed: skip the report, never the merge
        rank_zero_warn(
            f"merge report skipped: the probe batch failed ({type(err).__name__}: {err}); pass "
            f"LoRACallback(merge_probe=lambda module, batch: ...) to say how to run the model."
        )
        return
    log_merge_report(trainer, report)
