"""``LoRACallback``: LoRA fine-tuning for an existing Lightning ``Trainer``, in one line.

A thin Lightning skin over the functional API, acting at documented hooks (Lightning 2.x
``fit`` order: callback ``setup`` → module ``setup`` → ``configure_model`` → checkpoint
restore → strategy setup (DDP/FSDP wrapping, ``configure_optimizers``) → ``on_fit_start``):

* ``setup``: inject LoRA and freeze the base. A module that builds its layers in
  ``configure_model`` is injected right after that hook instead, still before any checkpoint is
  restored and before the strategy wraps the model.
* ``on_fit_start``: every optimizer keeps only the LoRA (and ``trainable_modules``) parameters;
  log parameter counts and the config to every logger.
* ``on_fit_end``: save the adapter (rank 0), then merge ``ΔW`` into ``W`` and unload, so what
  follows (test, predict, export) runs a plain model.
* ``on_exception``: save the adapter to ``<adapter_dir>/last`` before the error propagates.
* ``on_save_checkpoint``: a checkpoint keeps only the LoRA weights and trainable modules of the
  model (plus, as always, optimizer, scheduler, loop and callback state), not the frozen base;
  ``full_checkpoints=True`` keeps everything. Restoring one (``trainer.fit(model,
  ckpt_path=...)`` on a freshly built model) injects LoRA first and checks that every LoRA and
  trainable tensor was in the file; the base comes from the model as built.
"""

from __future__ import annotations

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
from torch.utils.hooks import RemovableHandle

from .adapters import adapter_names
from .analysis import delta_stats, summary_metrics
from .config import LoRAConfig
from .distributed import is_sharded, merge_gathered, save_adapter_gathered
from .errors import LoRAStateError
from .inject import inject_lora
from .io import save_adapter
from .names import CHECKPOINT_KEY
from .params import lora_state_dict, mark_only_lora_as_trainable
from .state import has_lora, lora_config
from .stats import ParameterStats, parameter_stats

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class LoRACallback(Callback):
    """Inject LoRA at ``setup``, train only the adapters, save and merge at the end of ``fit``.

    Args:
        config: a :class:`LoRAConfig` or a mapping of its fields; flat keyword arguments
            (``r=4, target_modules=["query", "value"]``) override it, so a Hydra node
            ``{_target_: lightning_lora.LoRACallback, r: 4}`` works as is.
        merge_on_fit_end: merge ``ΔW`` into ``W`` and remove the LoRA layers once ``fit`` ends.
        adapter_dir: where the adapter is saved at the end of ``fit``; default
            ``<trainer.log_dir>/lora_adapter`` (``default_root_dir`` without a logger).
        optimizer: a factory ``params -> Optimizer`` (a Hydra ``_partial_: true`` node) used
            instead of the module's ``configure_optimizers``, over the trainable parameters only.
        lr_scheduler: with ``optimizer``, a factory ``optimizer -> LRScheduler`` stepped every
            ``scheduler_interval`` ("step" or "epoch").
        adapter_name: name of the adapter in the model and its files.
        full_checkpoints: keep the frozen base weights in Lightning checkpoints too. Off by
            default: a checkpoint then holds the LoRA weights and ``trainable_modules`` (and the
            optimizer, scheduler and loop state), and resuming needs the base model built as
            before.
        log_analysis: at the end of fit, log what the adapter learned (``analysis.delta_stats``):
            mean effective rank and ‖ΔW‖/‖W‖ to every logger, and a per-weight table (singular
            values, effective rank, relative norm) to Weights & Biases.
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        merge_on_fit_end: bool = True,
        adapter_dir: str | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        adapter_name: str = "default",
        full_checkpoints: bool = False,
        log_analysis: bool = False,
        **config_fields: Any,
    ) -> None:
        self.config = LoRAConfig.build(config, **config_fields)
        self.log_analysis = log_analysis
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
        self.adapted: list[str] = []
        self.stats: ParameterStats | None = None
        self._merged_modules: set[int] = set()
        self._adapter_dir: Path | None = None  # resolved at fit start, on every rank
        self._pending_restore: dict[int, dict[str, Any]] = {}  # module id -> checkpoint marker
        self._load_hooks: dict[int, RemovableHandle] = {}

    # ------------------------------------------------------------------------- injection

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_checkpoints_before_restore(pl_module)
        if stage != "fit":
            return
        if is_overridden("configure_model", pl_module):
            self._inject_after_configure_model(pl_module)
        else:
            self.inject(pl_module)

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
        # Counted now, before a sharding strategy splits the parameters.
        self.stats = parameter_stats(pl_module)

    def _inject_after_configure_model(self, pl_module: pl.LightningModule) -> None:
        """Wrap the instance's ``configure_model`` so injection follows it, inside the same
        strategy init contexts, before checkpoint restore and wrapping. Undone at teardown."""
        if "configure_model" in pl_module.__dict__:
            return
        build = pl_module.configure_model

        def configure_model_then_inject() -> None:
            build()
            self.inject(pl_module)

        pl_module.__dict__["configure_model"] = configure_model_then_inject

    def _check_checkpoints_before_restore(self, pl_module: pl.LightningModule) -> None:
        """Wrap the instance's ``on_load_checkpoint`` (Lightning calls it before loading the
        state dict) so a LoRA checkpoint finds LoRA layers to load into: injected on a fresh
        model (e.g. ``trainer.test(model, ckpt_path=...)``), refused on one merged at fit end."""
        if "on_load_checkpoint" in pl_module.__dict__:
            return
        hook = pl_module.on_load_checkpoint

        def check_then_load(checkpoint: dict[str, Any]) -> None:
            lora_keys = any(".lora_A." in key for key in checkpoint.get("state_dict", {}))
            if lora_keys and not has_lora(pl_module):
                if id(pl_module) in self._merged_modules:
                    raise LoRAStateError(
                        "cannot restore a LoRA checkpoint into this model: its adapter was merged "
                        "into its weights at the end of fit (merge_on_fit_end=True), so loading "
                        "the checkpoint's adapter would add ΔW twice. Evaluate the merged model "
                        "with ckpt_path=None, use a freshly built model, or set merge_on_fit_end=False."
                    )
                self.inject(pl_module)
            hook(checkpoint)
            marker = checkpoint.get(CHECKPOINT_KEY) or {}
            if marker.get("adapter_only"):
                self._expect_adapter_only(pl_module, marker)

        pl_module.__dict__["on_load_checkpoint"] = check_then_load

    def _expect_adapter_only(self, pl_module: nn.Module, marker: dict[str, Any]) -> None:
        """Let the next ``load_state_dict`` of ``pl_module`` (Lightning's, right after
        ``on_load_checkpoint``) accept an adapter-only state dict: a post-hook excuses the base
        keys, which the model already holds, and raises if any LoRA or trainable tensor is
        missing or left over. ``strict`` loading stays on for everything else, so nothing needs
        restoring afterwards."""
        self._pending_restore[id(pl_module)] = marker
        if id(pl_module) not in self._load_hooks:
            self._load_hooks[id(pl_module)] = pl_module.register_load_state_dict_post_hook(self._check_adapter_keys)

    def _check_adapter_keys(self, module: nn.Module, incompatible: Any) -> None:
        marker = self._pending_restore.pop(id(module), None)
        if marker is None:
            return  # a load_state_dict that is not restoring an adapter-only checkpoint
        needed = set(lora_state_dict(module))
        lacking = sorted(k for k in incompatible.missing_keys if k in needed)
        surplus = sorted(k for k in incompatible.unexpected_keys if ".lora_" in k)
        if lacking or surplus:
            what = (
                f"lacks {len(lacking)} of this model's LoRA/trainable tensors (e.g. {lacking[:2]})" if lacking else ""
            )
            more = f"holds LoRA tensors this model has no place for (e.g. {surplus[:2]})" if surplus else ""
            raise LoRAStateError(
                f"this adapter-only checkpoint {' and '.join(w for w in (what, more) if w)}: it was written "
                f"with another LoRA config, {marker.get('config')} (adapters {marker.get('adapter_names')}), "
                f"this callback has {self.config.to_dict()}. Build LoRACallback with the checkpoint's config "
                f"(checkpoint['{CHECKPOINT_KEY}']['config']) to restore it."
            )
        incompatible.missing_keys.clear()  # only base weights were missing: the model holds them

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in ("configure_model", "on_load_checkpoint"):
            pl_module.__dict__.pop(hook, None)
        self._pending_restore.pop(id(pl_module), None)
        handle = self._load_hooks.pop(id(pl_module), None)
        if handle is not None:
            handle.remove()

    # ------------------------------------------------------------------------- optimizers

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAStateError("LoRACallback found no LoRA layers at fit start; was the model replaced after setup?")
        if self.optimizer is not None:
            self._build_optimizer(trainer, pl_module)
        else:
            strip_frozen_parameters(trainer.optimizers, pl_module)
        self._adapter_dir = self.resolve_adapter_dir(trainer)  # a collective: now, not in on_exception
        self._log(trainer)

    def _build_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
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

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.stats is not None
        for logger in trainer.loggers:
            logger.log_hyperparams({"lora": self.config.to_dict()})
            logger.log_metrics(self.stats.as_metrics(), step=trainer.global_step)
        rank_zero_info(f"LoRA adapter {self.adapter_name!r}:\n{self.stats.table()}")

    # ------------------------------------------------------------------------- saving

    def resolve_adapter_dir(self, trainer: pl.Trainer) -> Path:
        """``adapter_dir``, or ``<log_dir>/lora_adapter``. Call on every rank: ``log_dir``
        broadcasts."""
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "lora_adapter"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank takes part (a sharded model is gathered to save and to merge); rank 0
        writes. Under FSDP the merged LoRA layers stay in place, marked merged: FSDP owns the
        parameter layout. (Lightning calls this after the strategy's teardown, so under DDP the
        model is back on the CPU and the merge runs there.)"""
        directory = self.resolve_adapter_dir(trainer)
        save_adapter_gathered(trainer.strategy.model, pl_module, directory, self.adapter_name, trainer.is_global_zero)
        rank_zero_info(f"LoRA adapter saved to {directory}")
        if self.log_analysis:
            self._log_delta_analysis(trainer, pl_module)
        if self.merge_on_fit_end:
            merge_gathered(trainer.strategy.model, pl_module)
            self._merged_modules.add(id(pl_module))

    def _log_delta_analysis(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_sharded(trainer.strategy.model):
            rank_zero_warn("log_analysis skipped: the model is sharded; analyse the saved adapter instead.")
            return
        stats = delta_stats(pl_module, self.adapter_name)
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
            if isinstance(logger, WandbLogger):
                logger.log_table(key="lora/delta_stats", columns=columns, data=rows, step=trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Nothing trained is lost: the adapter as it is now goes to ``<adapter_dir>/last``."""
        if trainer.global_step == 0 or self.adapter_name not in adapter_names(pl_module):
            return  # nothing trained yet (e.g. a config error at fit start): nothing to keep
        # The directory resolved at fit start: resolving it here could wait forever on ranks
        # that did not fail (trainer.log_dir broadcasts).
        fallback = Path(self.adapter_dir) if self.adapter_dir else Path(trainer.default_root_dir) / "lora_adapter"
        directory = (self._adapter_dir or fallback) / "last"
        if is_sharded(trainer.strategy.model):
            # Gathering the shards is a collective the healthy ranks will not join now; saving
            # the local shards would write fragments under wrapper names. Checkpoints cover this.
            rank_zero_warn(
                f"fit stopped ({type(exception).__name__}) with a sharded (FSDP) model: the adapter "
                f"cannot be gathered now, so nothing was saved to {directory}; use the last checkpoint."
            )
            return
        if trainer.is_global_zero:
            try:
                save_adapter(pl_module, directory, self.adapter_name)
                rank_zero_warn(f"fit stopped ({type(exception).__name__}); LoRA adapter saved to {directory}")
            except Exception as err:  # never hide the original error behind ours
                rank_zero_warn(f"fit stopped and saving the LoRA adapter to {directory} failed too: {err}")

    # ------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep only the LoRA weights and trainable modules in ``checkpoint["state_dict"]``
        (unless ``full_checkpoints``) and mark the checkpoint, so restoring knows what to expect.

        Lightning calls callbacks' ``on_save_checkpoint`` for full checkpoints only: with
        ``ModelCheckpoint(save_weights_only=True)`` the state dict stays whole.
        """
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


def strip_frozen_parameters(optimizers: Iterable[torch.optim.Optimizer], module: nn.Module) -> None:
    """Keep in every param group only parameters with ``requires_grad`` (LoRA's and the
    trainable modules'), keeping the optimizers' types, hyper-parameters and schedulers.

    Raises if a group or an optimizer ends up empty (a group that held only frozen weights,
    say LayerNorm parameters excluded from weight decay), or if a trainable parameter is in no
    optimizer (it would silently never train).
    """
    names = {id(p): n for n, p in module.named_parameters()}
    covered: set[int] = set()
    for index, optimizer in enumerate(optimizers):
        kind = type(optimizer).__name__
        groups = optimizer.param_groups
        if kind == "_MockOptimizer" or not groups:
            raise LoRAStateError(
                "configure_optimizers returned no optimizer; return one over self.parameters(), "
                "or pass LoRACallback(optimizer=...)."
            )
        for g, group in enumerate(groups):
            kept = [p for p in group["params"] if p.requires_grad]
            if not kept:
                example = next((names.get(id(p), "?") for p in group["params"]), "nothing")
                raise LoRAStateError(
                    f"param group {g} of optimizer {index} ({kind}) holds only frozen parameters "
                    f"(e.g. {example!r}), so it is empty once LoRA freezes the base. Drop that group "
                    f"from configure_optimizers, add its modules to trainable_modules, or pass "
                    f"LoRACallback(optimizer=...) to build the optimizer over the LoRA parameters."
                )
            group["params"] = kept
            covered.update(id(p) for p in kept)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise LoRAStateError(
            f"{len(missing)} trainable parameter(s) are in no optimizer and would never train "
            f"(e.g. {missing[:3]}). Build the optimizer over self.parameters() (frozen ones are "
            f"removed for you), or pass LoRACallback(optimizer=...)."
        )
