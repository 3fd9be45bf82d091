"""``LoRACallback``: LoRA fine-tuning for an existing Lightning ``Trainer``, in one line.

A thin Lightning skin over the functional API, shaped like Lightning's ``BaseFinetuning``: each
hook is a few lines calling named methods. In Lightning 2.6's ``fit`` order:

* ``setup``: inject LoRA and freeze the base (right after ``configure_model`` for a module that
  builds its layers there), before any restore and before the strategy wraps the model.
* checkpoint restore: :meth:`LoRACallback.before_restore` runs first in the module's
  ``on_load_checkpoint`` (no callback hook runs before the weights load); the callback's own
  ``on_load_checkpoint`` runs after them and checks that every LoRA tensor arrived.
* ``on_fit_start`` (after the strategy built the optimizers): every optimizer keeps only the
  trainable parameters; log the options and parameter counts.
* ``on_fit_end``: save the adapter (rank 0), then merge ``ΔW`` into ``W`` and unload, so what
  follows (test, predict, export) runs a plain model. ``on_exception``: save it to ``.../last``.
* ``on_save_checkpoint``: keep the LoRA weights and trainable modules, not the frozen base.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn

from .adapters import adapter_names
from .analysis import delta_stats, summary_metrics
from .config import LoRAConfig
from .distributed import is_sharded, merge_gathered, save_adapter_gathered
from .errors import LoRAConfigError, LoRAStateError
from .inject import inject_lora
from .io import save_adapter
from .names import CHECKPOINT_KEY
from .optim import strip_frozen_parameters
from .params import lora_state_dict, mark_only_lora_as_trainable
from .state import has_lora, lora_config
from .stats import ParameterStats, parameter_stats

__all__ = ["CHECKPOINT_KEY", "LoRACallback", "strip_frozen_parameters"]

TARGET = "lightning_lora.LoRACallback"  # the public import path: the Hydra node's `_target_`

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class LoRACallback(Callback):
    """Inject LoRA at ``setup``, train only the adapters, save and merge at the end of ``fit``.

    Every :class:`LoRAConfig` field is a keyword parameter, with LoRAConfig's default and
    validation (``None`` for a list field stands for its default), so LightningCLI
    (``--trainer.callbacks.r=4``) and Hydra (``{_target_: lightning_lora.LoRACallback, r: 4}``)
    reach each one. What each field means is documented on :class:`LoRAConfig`.

    Args:
        config: a whole :class:`LoRAConfig` (or a mapping of its fields) instead of the flat
            fields; together with a flat field changed from its default it is an error.
        r: rank of ``A`` and ``B``.
        alpha: scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        target_modules: module names or dotted suffixes, one regular expression, or ``"all-linear"``.
        exclude_modules: modules never adapted (``None``: none).
        trainable_modules: modules trained in full and saved with the adapter (``None``: none).
        init: ``"zeros_b"`` (``B = 0``) or ``"gaussian"``.
        mha_projections: which of q, k, v in an ``nn.MultiheadAttention`` get ``A``/``B`` (``None``: all).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        adapter_dtype: dtype of ``A`` and ``B``; ``None`` follows the base weight.
        merge_on_fit_end: merge ``ΔW`` into ``W`` and remove the LoRA layers once ``fit`` ends.
        adapter_dir: where ``fit`` saves the adapter; ``None``: ``<trainer.log_dir>/lora_adapter``
            (``default_root_dir`` without a logger).
        optimizer: a factory ``params -> Optimizer`` (a Hydra ``_partial_: true`` node) used
            instead of the module's ``configure_optimizers``, over the trainable parameters only.
        lr_scheduler: with ``optimizer``, a factory ``optimizer -> LRScheduler``.
        scheduler_interval: when ``lr_scheduler`` steps: ``"step"`` or ``"epoch"``.
        adapter_name: name of the adapter in the model and its files.
        full_checkpoints: keep the frozen base in Lightning checkpoints too. Off, a checkpoint
            holds the LoRA weights and ``trainable_modules`` (and optimizer, scheduler and loop
            state), and resuming needs the base model built as before.
        log_analysis: at fit end, log what the adapter learned (``analysis.delta_stats``): mean
            effective rank and ‖ΔW‖/‖W‖ to every logger, a per-weight table to W&B.
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        r: int = LoRAConfig.r,
        alpha: float = LoRAConfig.alpha,
        dropout: float = LoRAConfig.dropout,
        target_modules: str | list[str] = LoRAConfig.target_modules,
        exclude_modules: list[str] | None = None,
        trainable_modules: list[str] | None = None,
        init: str = LoRAConfig.init,
        mha_projections: list[str] | None = None,
        use_rslora: bool = LoRAConfig.use_rslora,
        adapter_dtype: str | None = LoRAConfig.adapter_dtype,
        merge_on_fit_end: bool = True,
        adapter_dir: str | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        adapter_name: str = "default",
        full_checkpoints: bool = False,
        log_analysis: bool = False,
        **unknown: Any,
    ) -> None:
        arguments = locals()
        if unknown:  # LoRAConfig's teaching error ("no field 'lora_alpha' (did you mean 'alpha'?)")
            LoRAConfig.build(**unknown)
        changed = {name: arguments[name] for name, default in _LORA_DEFAULTS.items() if arguments[name] != default}
        if config is not None and changed:
            raise LoRAConfigError(
                f"LoRACallback got config=... and flat LoRA fields {changed}: give the config one way, e.g. "
                f"LoRACallback(config=dataclasses.replace(config, ...)), so that neither value is dropped."
            )
        self.config = LoRAConfig.build(config, **changed)
        if lr_scheduler is not None and optimizer is None:
            raise LoRAStateError("LoRACallback(lr_scheduler=...) needs optimizer=... as well.")
        if scheduler_interval not in ("step", "epoch"):
            raise LoRAStateError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}.")
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_dir = adapter_dir
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.adapter_name = adapter_name
        self.full_checkpoints = full_checkpoints
        self.log_analysis = log_analysis
        self.adapted: list[str] = []
        self.stats: ParameterStats | None = None
        self._adapter_dir: Path | None = None  # resolved at fit start, on every rank
        self._merged: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # merged and unloaded by us
        self._strict_loading: bool | None = None  # the module's own, while an adapter-only restore runs

    # ------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and is_overridden("configure_model", pl_module):
            chain_module_hook(pl_module, "configure_model", lambda: self.inject(pl_module))
        elif stage == "fit":
            self.inject(pl_module)
        chain_module_hook(
            pl_module, "on_load_checkpoint", lambda ckpt: self.before_restore(pl_module, ckpt), first=True
        )

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._strict_loading is not None:  # an adapter-only state dict was just loaded
            pl_module.strict_loading, self._strict_loading = self._strict_loading, None
            self.check_adapter_restored(pl_module, checkpoint)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAStateError("LoRACallback found no LoRA layers at fit start; was the model replaced after setup?")
        if self.optimizer is not None:
            self.replace_optimizers(trainer, pl_module)
        else:
            strip_frozen_parameters(trainer.optimizers, pl_module)
        self._adapter_dir = self.resolve_adapter_dir(trainer)  # a collective: now, not in on_exception
        self.log_options_and_counts(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank takes part (a sharded model is gathered to save and to merge), rank 0
        writes. Under FSDP the merged LoRA layers stay, marked merged: FSDP owns the layout."""
        directory = self._adapter_dir or self.resolve_adapter_dir(trainer)
        save_adapter_gathered(trainer.strategy.model, pl_module, directory, self.adapter_name, trainer.is_global_zero)
        rank_zero_info(f"LoRA adapter saved to {directory}")
        if self.log_analysis:
            self.log_delta_analysis(trainer, pl_module)
        if self.merge_on_fit_end:
            merge_gathered(trainer.strategy.model, pl_module)
            self._merged.add(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release(pl_module)  # Lightning skips `teardown` after an error
        if trainer.global_step > 0 and self.adapter_name in adapter_names(pl_module):
            self.save_on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Lightning calls this for full checkpoints only (not ``save_weights_only``)."""
        if not has_lora(pl_module):
            return  # merged and unloaded at fit end: a plain model, saved whole
        adapter_keys = [k for k in lora_state_dict(pl_module) if k in checkpoint["state_dict"]]
        if not self.full_checkpoints:
            keep = set(adapter_keys)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = {
            "adapter_only": not self.full_checkpoints,
            "adapter_keys": adapter_keys,
            "adapter_names": adapter_names(pl_module),
            "adapter_name": self.adapter_name,
            "config": self.config.to_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "adapter_name": self.adapter_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        if saved is not None and LoRAConfig.build(saved) != self.config:
            rank_zero_warn(
                f"the checkpoint was trained with LoRA config {saved}, this callback has "
                f"{self.config.to_dict()}; resuming uses this callback's."
            )

    # ------------------------------------------------------------------------- injection and restore

    def inject(self, pl_module: nn.Module) -> None:
        """Inject this callback's adapter into ``pl_module`` (once: a second ``fit`` finds it)."""
        if self.adapter_name in adapter_names(pl_module):
            existing = lora_config(pl_module, self.adapter_name)
            if existing != self.config:
                raise LoRAStateError(
                    f"the model already holds adapter {self.adapter_name!r} with another config "
                    f"({existing}); use adapter_name=... for a second adapter, or unload_lora first."
                )
            mark_only_lora_as_trainable(pl_module, self.adapter_name, self.config.trainable_modules)
        else:
            self.adapted = inject_lora(pl_module, self.config, adapter_name=self.adapter_name)
        self.stats = parameter_stats(pl_module)  # counted now, before a sharding strategy splits them

    def before_restore(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Ready ``pl_module`` for the LoRA checkpoint about to load: inject the adapter into a
        model built fresh (``trainer.test(model, ckpt_path=...)``), refuse a model this callback
        merged, and let an adapter-only state dict load without the base weights the model
        already holds (``strict_loading`` off until ``on_load_checkpoint`` has checked it)."""
        if not any(".lora_A." in key for key in checkpoint.get("state_dict", {})):
            return  # a plain model's checkpoint
        if pl_module in self._merged:
            raise LoRAStateError(
                "cannot restore a LoRA checkpoint into this model: its adapter was merged "
                "into its weights at the end of fit (merge_on_fit_end=True), so loading "
                "the checkpoint's adapter would add ΔW twice. Evaluate the merged model "
                "with ckpt_path=None, use a freshly built model, or set merge_on_fit_end=False."
            )
        if self.adapter_name not in adapter_names(pl_module):
            self.inject(pl_module)
        if (checkpoint.get(CHECKPOINT_KEY) or {}).get("adapter_only") and self._strict_loading is None:
            self._strict_loading, pl_module.strict_loading = pl_module.strict_loading, False

    def check_adapter_restored(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Every LoRA and trainable tensor of the model came from the adapter-only checkpoint,
        and nothing in it was left over: otherwise it was written with another config."""
        saved = set(checkpoint["state_dict"])
        lacking = sorted(set(lora_state_dict(pl_module)) - saved)
        surplus = sorted(saved - set(pl_module.state_dict()))
        if not lacking and not surplus:
            return
        what = f"lacks {len(lacking)} of this model's LoRA/trainable tensors (e.g. {lacking[:2]})" if lacking else ""
        kind = "LoRA tensors" if all(".lora_" in k for k in surplus) else "tensors"
        more = f"holds {kind} this model has no place for (e.g. {surplus[:2]})" if surplus else ""
        marker = checkpoint[CHECKPOINT_KEY]
        raise LoRAStateError(
            f"this adapter-only checkpoint {' and '.join(w for w in (what, more) if w)}: it was written "
            f"with another LoRA config, {marker.get('config')} (adapters {marker.get('adapter_names')}), "
            f"this callback has {self.config.to_dict()}. Build LoRACallback with the checkpoint's config "
            f"(checkpoint['{CHECKPOINT_KEY}']['config']) to restore it."
        )

    def release(self, pl_module: pl.LightningModule) -> None:
        """Give the module its own hooks and ``strict_loading`` back."""
        for name in ("configure_model", "on_load_checkpoint"):
            pl_module.__dict__.pop(name, None)
        if self._strict_loading is not None:
            pl_module.strict_loading, self._strict_loading = self._strict_loading, None

    # ------------------------------------------------------------------------- optimizers, logging, saving

    def replace_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``optimizer(trainable parameters)`` (and its ``lr_scheduler``) instead of the module's."""
        optimizer = self.optimizer([p for p in pl_module.parameters() if p.requires_grad])
        if trainer.lr_scheduler_configs and self.lr_scheduler is None:
            rank_zero_warn(
                "LoRACallback(optimizer=...) replaces the module's optimizers; the LR schedulers "
                "from configure_optimizers are dropped. Pass lr_scheduler=... to keep one."
            )
        trainer.strategy.optimizers = [optimizer]
        trainer.strategy.lr_scheduler_configs = (
            [LRSchedulerConfig(self.lr_scheduler(optimizer), interval=self.scheduler_interval)]
            if self.lr_scheduler is not None
            else []
        )

    def hyperparameters(self) -> dict[str, Any]:
        """This callback as its Hydra node states it (``_target_``, every LoRAConfig field, every
        option, factories as ``_partial_`` nodes): logged under ``lora``, where it agrees key for
        key with the resolved Hydra config the callback may have been built from."""
        options = {name: getattr(self, name) for name in callback_options()}
        options.update(optimizer=factory_node(self.optimizer), lr_scheduler=factory_node(self.lr_scheduler))
        target = TARGET if type(self) is LoRACallback else f"{type(self).__module__}.{type(self).__qualname__}"
        return {"_target_": target, **self.config.to_dict(), **options}

    def log_options_and_counts(self, trainer: pl.Trainer) -> None:
        assert self.stats is not None
        for logger in trainer.loggers:
            logger.log_hyperparams({"lora": self.hyperparameters()})
            logger.log_metrics(self.stats.as_metrics(), step=trainer.global_step)
        rank_zero_info(f"LoRA adapter {self.adapter_name!r}:\n{self.stats.table()}")

    def log_delta_analysis(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_sharded(trainer.strategy.model):
            rank_zero_warn("log_analysis skipped: the model is sharded; analyse the saved adapter instead.")
            return
        stats = delta_stats(pl_module, self.adapter_name)
        columns = ["weight", "r", "effective_rank", "relative_norm", "delta_norm", "top_singular_values"]
        top = [str([round(v, 5) for v in s.singular_values[:8]]) for s in stats]
        rows = [
            [s.name, s.r, s.effective_rank, s.relative_norm, s.delta_norm, t] for s, t in zip(stats, top, strict=True)
        ]
        for logger in trainer.loggers:
            logger.log_metrics(summary_metrics(stats), step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_table(key="lora/delta_stats", columns=columns, data=rows, step=trainer.global_step)

    def summary(self) -> dict[str, float]:
        """The job's figures for ``metrics.json``: parameter counts as injected, adapter bytes."""
        figures = self.stats.as_metrics() if self.stats is not None else {}
        if self._adapter_dir is not None:
            files = [f for f in self._adapter_dir.glob("*") if f.is_file()]
            figures["lora/adapter_bytes"] = float(sum(f.stat().st_size for f in files))
        return figures

    def resolve_adapter_dir(self, trainer: pl.Trainer, log_dir: bool = True) -> Path:
        """``adapter_dir``, or ``<log_dir>/lora_adapter`` (``default_root_dir`` without a logger
        or with ``log_dir=False``). Reading ``trainer.log_dir`` broadcasts: call it on every rank."""
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        return Path((trainer.log_dir if log_dir else None) or trainer.default_root_dir) / "lora_adapter"

    def save_on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Nothing trained is lost: the adapter as it is now goes to ``<adapter_dir>/last``."""
        # Resolved at fit start: resolving log_dir now could wait forever on the healthy ranks.
        directory = (self._adapter_dir or self.resolve_adapter_dir(trainer, log_dir=False)) / "last"
        stopped = f"fit stopped ({type(exception).__name__})"
        if is_sharded(trainer.strategy.model):  # gathering is a collective the healthy ranks will not join
            rank_zero_warn(f"{stopped} with a sharded (FSDP) model: nothing saved to {directory}; use a checkpoint.")
        elif trainer.is_global_zero:
            try:
                save_adapter(pl_module, directory, self.adapter_name)
                rank_zero_warn(f"{stopped}; LoRA adapter saved to {directory}")
            except Exception as err:  # never hide the original error behind ours
                rank_zero_warn(f"{stopped} and saving the LoRA adapter to {directory} failed too: {err}")


def chain_module_hook(
    pl_module: pl.LightningModule, name: str, extra: Callable[..., None], first: bool = False
) -> None:
    """Run ``extra`` with the arguments of the module's hook ``name`` right after (``first``:
    before) it, until :meth:`LoRACallback.release`. Lightning (checked against 2.6.6) has no
    callback hook between ``configure_model`` and the model's ``load_state_dict`` at restore, and
    calls module hooks through ``getattr(pl_module, name)``: an instance attribute runs instead."""
    own = getattr(pl_module, name)

    def chained(*args: Any) -> None:
        if first:
            extra(*args)
        own(*args)
        if not first:
            extra(*args)

    pl_module.__dict__[name] = chained  # bypasses nn.Module.__setattr__: a plain attribute


def factory_node(factory: Callable[..., Any] | None) -> dict[str, Any] | None:
    """A factory as the Hydra node that builds it: ``{_target_, _partial_: true, **keywords}``."""
    if factory is None:
        return None
    func, args, keywords = factory, (), {}
    if isinstance(factory, functools.partial):
        func, args, keywords = factory.func, factory.args, factory.keywords
    target = f"{func.__module__}.{getattr(func, '__qualname__', type(func).__qualname__)}"
    return {"_target_": target, "_partial_": True, **({"_args_": list(args)} if args else {}), **keywords}


def callback_options() -> list[str]:
    """The callback's own options: its keyword parameters that are not LoRAConfig fields."""
    return [name for name in _KEYWORD_DEFAULTS if name not in _LORA_DEFAULTS]


_KEYWORD_DEFAULTS = {
    p.name: p.default for p in inspect.signature(LoRACallback.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
}
_LORA_DEFAULTS = {
    name: _KEYWORD_DEFAULTS[name] for name in LoRAConfig.field_names()
}  # a field with no parameter fails here
