"""The Hydra entry point: ``python -m lightning_lora.train [overrides]`` (``-m`` for multirun).

It composes ``conf/train.yaml`` and instantiates what the config names: data, model, the LoRA
callback (``lora``), other callbacks, loggers and the Trainer. All behaviour lives in those
objects; this file only wires them and writes the job's figures to ``<output_dir>/metrics.json``,
so a user's own config tree can reuse it unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .callback import LoRACallback
from .hydra_config import register_configs
from .io import atomic_write
from .stats import parameter_stats

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def sweep_group(mode: Any, task_name: str, output_dir: str) -> str | None:
    """The W&B group of a job: ``<task_name>@<sweep dir>`` shared by every job of one multirun
    (the sweep's name and start time), ``None`` for a single run."""
    if str(mode).rsplit(".", 1)[-1] != "MULTIRUN":
        return None
    return f"{task_name}@{Path(output_dir).parent.name}"


def run_name(overrides: str, task_name: str) -> str:
    """The W&B run name: the job's overrides (``lora.r=8,seed=1``), else the task name."""
    return overrides or task_name


OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
register_configs()  # the `lora` node's schema, before anything composes


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and, with ``cfg.test``, test the final model); return the metrics as floats."""
    started = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, class_names=datamodule.label_names)
    # A node set to null on the command line (callbacks.model_checkpoint=null) is switched off.
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if cfg.get("lora"):
        if "_target_" not in cfg.lora:
            raise ValueError(
                f"cfg.lora has no _target_ (it holds only {sorted(cfg.lora)}): a config set fields of a "
                f"`lora` node that method/experiment removed. Drop those fields, or pick a LoRA method."
            )
        callbacks.append(instantiate(cfg.lora))
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for logger in trainer.loggers:  # not `loggers`: fast_dev_run swaps them for a dummy
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(model, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            # The model as fit left it: merged and unloaded when LoRA's merge_on_fit_end is on.
            for results in trainer.test(model, datamodule=datamodule):
                metrics.update({k: float(v) for k, v in results.items()})
        metrics.update(job_figures(trainer, model, callbacks))
        metrics["perf/job_wall_s"] = time.perf_counter() - started
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k.startswith(("lora/", "perf/"))})
        if trainer.is_global_zero:
            write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    finally:
        finish_wandb()
    return metrics


def job_figures(trainer: L.Trainer, model: L.LightningModule, callbacks: list[Any]) -> dict[str, float]:
    """Parameter counts (LoRA's as injected; else the model's own), adapter bytes, run stats."""
    figures: dict[str, float] = {}
    lora = next((c for c in callbacks if isinstance(c, LoRACallback)), None)
    stats = lora.stats if lora is not None and lora.stats is not None else parameter_stats(model)
    figures.update(stats.as_metrics())
    if lora is not None:
        adapter = lora.resolve_adapter_dir(trainer)
        figures["lora/adapter_bytes"] = float(sum(f.stat().st_size for f in adapter.glob("*") if f.is_file()))
    for callback in callbacks:
        if hasattr(callback, "summary"):
            figures.update(callback.summary())
    return figures


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """The job's figures and identity (overrides) as JSON, for scripts that tabulate sweeps."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called outside a Hydra app (e.g. from tests)
        overrides = []
    text = json.dumps({"overrides": overrides, "metrics": metrics}, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def finish_wandb() -> None:
    """End the process's W&B run, so the next job of a multirun starts its own run instead of
    silently logging into this one (wandb#1314, lightning-hydra-template#289)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
