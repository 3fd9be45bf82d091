"""The Hydra entry point: ``python -m lightning_lora.train [overrides]`` (``-m`` for multirun).

It composes ``conf/train.yaml`` (another tree with ``--config-path DIR --config-name NAME``, as in
any Hydra app) and instantiates what the config names: ``data``, ``model``, every node under
``callbacks`` and ``logger``, and ``trainer``. It knows no task and no callback; the config says
how parts meet:

* a node reads an attribute of the instantiated data module with ``${datamodule:NAME}``
  (``conf/model/minilm.yaml``: ``num_classes: ${datamodule:num_classes}``): data is built first;
* a ``callbacks`` entry may point at a node kept elsewhere for short overrides
  (``lora: ${oc.select:lora,null}`` in ``conf/callbacks``, so ``lora.r=4`` and ``~lora`` work);
* a callback with a ``summary()`` adds its figures to ``<output_dir>/metrics.json``.

The resolved config is the run's hyper-parameters, logged to every logger before ``fit``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_write
from .hydra_config import register_configs
from .stats import parameter_stats

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_DATAMODULES: list[Any] = []  # the data module of the job running now, for ${datamodule:NAME}


def datamodule_attribute(name: str) -> Any:
    """``${datamodule:NAME}``: attribute ``NAME`` of the data module ``train`` built from ``cfg.data``."""
    if not _DATAMODULES:
        raise ValueError(
            f"${{datamodule:{name}}} reads the data module that lightning_lora.train builds from cfg.data, "
            f"so it resolves only while train() runs; elsewhere, pass {name}=... when you instantiate the node."
        )
    return getattr(_DATAMODULES[-1], name)


@contextmanager
def datamodule_attributes(datamodule: Any) -> Iterator[None]:
    _DATAMODULES.append(datamodule)
    try:
        yield
    finally:
        _DATAMODULES.pop()


def sweep_group(mode: Any, task_name: str, output_dir: str) -> str | None:
    """The W&B group of a job: ``<task_name>@<sweep dir>`` shared by every job of one multirun
    (the sweep's name and start time), ``None`` for a single run."""
    if str(mode).rsplit(".", 1)[-1] != "MULTIRUN":
        return None
    return f"{task_name}@{Path(output_dir).parent.name}"


def run_name(overrides: str, task_name: str) -> str:
    """The W&B run name: the job's overrides (``lora.r=8,seed=1``), else the task name."""
    return overrides or task_name


OmegaConf.register_new_resolver("datamodule", datamodule_attribute, replace=True)
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
register_configs()  # the `lora` node's schema, before anything composes


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and, with ``cfg.test``, test the final model); return the metrics as floats."""
    started = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    with datamodule_attributes(datamodule):
        model = instantiate(cfg.model)
        callbacks = instantiate_nodes(cfg, "callbacks")
        loggers = instantiate_nodes(cfg, "logger")
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:  # not `loggers`: fast_dev_run swaps them for a dummy
        logger.log_hyperparams(hyperparameters)
    try:
        trainer.fit(model, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):  # the model as fit left it (a LoRA callback merges it at fit end)
            for results in trainer.test(model, datamodule=datamodule):
                metrics.update({k: float(v) for k, v in results.items()})
        figures = job_figures(model, callbacks)
        figures["perf/job_wall_s"] = time.perf_counter() - started
        metrics.update(figures)
        for logger in trainer.loggers:
            logger.log_metrics(figures)
        if trainer.is_global_zero:
            write_metrics(Path(OmegaConf.select(cfg, "paths.output_dir") or output_dir()) / "metrics.json", metrics)
    finally:
        finish_wandb()
    return metrics


def instantiate_nodes(cfg: DictConfig, group: str) -> list[Any]:
    """One object per node of ``cfg[group]``; a node set to null (``callbacks.model_checkpoint=null``,
    or a reference to a removed node) is switched off."""
    nodes = cfg.get(group) or {}
    for key, node in nodes.items():
        if node is not None and "_target_" not in node:
            raise ValueError(
                f"cfg.{group}.{key} has no _target_ (it holds only {sorted(node)}): a config set fields of a "
                f"node that a defaults list removed (e.g. `override /lora: null`). Drop those fields, or keep the node."
            )
    return [instantiate(node) for node in nodes.values() if node is not None]


def job_figures(model: L.LightningModule, callbacks: list[Any]) -> dict[str, float]:
    """The model's parameter counts, then every callback's ``summary()`` (a LoRA callback's
    counts as injected, its adapter's bytes; run stats), later ones overriding earlier ones."""
    figures = parameter_stats(model).as_metrics()
    for callback in callbacks:
        if callable(getattr(callback, "summary", None)):
            figures.update(callback.summary())
    return figures


def output_dir() -> str:
    """The Hydra job's output directory (a tree may set ``paths.output_dir`` instead)."""
    return HydraConfig.get().runtime.output_dir


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
