"""``LoRACallback``: LoRA fine-tuning for an existing Lightning ``Trainer``, in one line.

A thin Lightning skin over the functional API, shaped like Lightning's ``BaseFinetuning``: each
hook is a few lines calling named functions, in Lightning 2.6's ``fit`` order: ``setup``
(checkpoints load as data; inject and freeze), the restore (:mod:`lightning_lora.restore`),
``on_fit_start`` (optimizers keep the adapters; the adapter directory is checked before any
step, :mod:`lightning_lora.fit_saves`; options and counts logged), ``on_fit_end`` (save; what the
adapter learned and how far the merge moves the model, :mod:`lightning_lora.reporting`; merge
and unload), ``on_exception`` (save to ``last/``) and ``on_save_checkpoint`` (adapter-only).
The README's table says what each hook does and why.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn

from . import fit_saves, reporting, restore
from .adapters import adapter_names
from .checkpoint_io import enforce_weights_only
from .config import LoRAConfig
from .distributed import is_sharded, merge_gathered, save_adapter_gathered
from .errors import LoRAConfigError, LoRAStateError, LoRATargetError
from .inject import inject_lora, unload_lora
from .loraplus import apply_loraplus, check_ratio
from .names import CHECKPOINT_KEY
from .optim import strip_frozen_parameters
from .params import mark_only_lora_as_trainable
from .roots import AUTO, resolve_root
from .state import has_lora, lora_config
from .stats import ParameterStats, parameter_stats

__all__ = ["CHECKPOINT_KEY", "LoRACallback", "strip_frozen_parameters"]

TARGET = "lightning_lora.LoRACallback"  # the public import path: the Hydra node's `_target_`

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Probe = Callable[[pl.LightningModule, Any], Any]


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
        init: ``"zeros_b"`` (``B = 0``), ``"gaussian"``, or PEFT's base-changing ``"pissa"``,
            ``"pissa_niter_<K>"``, ``"olora"`` (the fit-end save converts them to plain LoRA).
        mha_projections: which of q, k, v in an ``nn.MultiheadAttention`` get ``A``/``B`` (``None``: all).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        adapter_dtype: dtype of ``A`` and ``B``; ``None`` follows the base weight.
        rank_pattern: per-weight ranks, ``{name or pattern: r}`` (PEFT's rule; ``None``: none).
        alpha_pattern: per-weight ``alpha``, matched as ``rank_pattern`` (``None``: none).
        use_dora: DoRA: also train a magnitude per output feature (``nn.Linear``/``Conv1D`` only).
        freeze_a: LoRA-FA: ``A`` keeps its initial value, only ``B`` trains, and backward keeps
            ``x Aᵀ`` instead of each adapted layer's input.
        merge_on_fit_end: merge ``ΔW`` into ``W`` and remove the LoRA layers once ``fit`` ends.
        adapter_dir: where ``fit`` saves the adapter; ``None``: ``<trainer.log_dir>/lora_adapter``
            (``default_root_dir`` without a logger). Checked at fit start: writable, and holding
            no adapter already unless ``overwrite``.
        adapter_root: the submodule that will be served (``"model"`` for a LightningModule that
            holds a Hugging Face model as ``self.model``): the adapter file names weights
            relative to it, so ``PeftModel.from_pretrained(hf_model, adapter_dir)`` loads it.
            ``"auto"`` finds it (a single Hugging Face model holding every adapted layer);
            ``None`` writes full names.
        overwrite: let this fit replace an adapter already in ``adapter_dir`` (refused at fit
            start otherwise; this callback's own save from an earlier, unmerged fit excepted).
        optimizer: a factory ``params -> Optimizer`` (a Hydra ``_partial_: true`` node) used
            instead of the module's ``configure_optimizers``, over the trainable parameters only.
        lr_scheduler: with ``optimizer``, a factory ``optimizer -> LRScheduler``.
        scheduler_interval: when ``lr_scheduler`` steps: ``"step"`` or ``"epoch"``.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): ``B`` gets this many times the learning
            rate of its param group, in a group of its own named ``<group>.lora_B``
            (:func:`~lightning_lora.loraplus.apply_loraplus`); ``None``: plain LoRA.
        adapter_name: name of the adapter in the model and its files.
        full_checkpoints: keep the frozen base in Lightning checkpoints too. Off, a checkpoint
            holds the LoRA weights and ``trainable_modules`` (and optimizer, scheduler and loop
            state), and resuming needs the base model built as before.
        log_analysis: at fit end, log what the adapter learned (``analysis.delta_stats``): mean
            effective rank and ‖ΔW‖/‖W‖ to every logger, a per-weight table to W&B.
        log_rank_advice: at fit end, log the ranks the adapter suggests for 90/95/99% of each
            ‖ΔW‖² (``advisor.suggest_ranks``): parameter counts to every logger, a table to W&B.
        report_merge: before the fit-end merge, measure on the first training batch how far the
            merge moves the model's outputs (``report.merge_report``), log ``lora/merge_*`` and
            warn when the drift exceeds what the dtype explains.
        merge_probe: ``probe(module, batch)`` that runs the model for the merge report;
            ``None``: the module's ``training_step`` (with ``self.log`` muted).
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
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        use_dora: bool = LoRAConfig.use_dora,
        freeze_a: bool = LoRAConfig.freeze_a,
        merge_on_fit_end: bool = True,
        adapter_dir: str | None = None,
        adapter_root: str | None = AUTO,
        overwrite: bool = False,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        loraplus_lr_ratio: float | None = None,
        adapter_name: str = "default",
        full_checkpoints: bool = False,
        log_analysis: bool = False,
        log_rank_advice: bool = False,
        report_merge: bool = True,
        merge_probe: Probe | None = None,
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
        if loraplus_lr_ratio is not None:
            check_ratio(loraplus_lr_ratio)
        for name in callback_options():
            setattr(self, name, arguments[name])
        self.adapted: list[str] = []
        self.stats: ParameterStats | None = None
        self._root: str | None = None  # adapter_root, resolved at injection (before any wrapping)
        self._adapter_dir: Path | None = None  # resolved at fit start, on every rank
        self._saved_to: Path | None = None  # where this callback saved, with the model left unmerged
        self._probe_batch: Any = None  # the first training batch, for the merge report
        self._strict_loading: bool | None = None  # the module's own, while an adapter-only restore runs

    # ------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        enforce_weights_only(trainer)  # before any restore: checkpoints load as data
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy):
            # the module's configure_model applies fully_shard, which must find the adapters there
            restore.chain_module_hook(pl_module, "configure_model", lambda: self.inject_first(pl_module), first=True)
        elif stage == "fit" and is_overridden("configure_model", pl_module):
            restore.chain_module_hook(pl_module, "configure_model", lambda: self.inject(pl_module))
        elif stage == "fit":
            self.inject(pl_module)
        restore.chain_module_hook(
            pl_module, "on_load_checkpoint", lambda ckpt: self.before_restore(pl_module, ckpt), first=True
        )

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._strict_loading is not None:  # an adapter-only state dict was just loaded
            pl_module.strict_loading, self._strict_loading = self._strict_loading, None
            restore.check_adapter_restored(pl_module, checkpoint, self.config.to_dict())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAStateError("LoRACallback found no LoRA layers at fit start; was the model replaced after setup?")
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed built its engine's optimizer from configure_optimizers in setup, over the
            # parameters that require grad only (the adapters): it can be neither replaced nor edited.
            if self.optimizer is not None or self.loraplus_lr_ratio is not None:
                raise LoRAConfigError(
                    "LoRACallback(optimizer=..., loraplus_lr_ratio=...) cannot act under DeepSpeedStrategy: "
                    "DeepSpeed has wrapped the module's optimizer before the fit starts. Build it in "
                    "configure_optimizers instead (lightning_lora.apply_loraplus there for LoRA+)."
                )
        elif self.optimizer is not None:
            self.replace_optimizers(trainer, pl_module)
        else:
            strip_frozen_parameters(trainer.optimizers, pl_module)
            if self.loraplus_lr_ratio is not None:
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
                for optimizer in trainer.optimizers:
                    apply_loraplus(optimizer, pl_module, self.loraplus_lr_ratio, schedulers)
        self._adapter_dir = self.resolve_adapter_dir(trainer)  # a collective: now, not in on_exception
        again = self._saved_to == self._adapter_dir  # continuing this callback's own, unmerged adapter
        fit_saves.check_before_fit(trainer, pl_module, self._adapter_dir, self.adapter_name, self.overwrite or again)
        assert self.stats is not None
        reporting.log_options_and_counts(trainer, self.hyperparameters(), self.stats, self.adapter_name)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._probe_batch is None and self.report_merge and self.merge_on_fit_end:
            self._probe_batch = batch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank takes part (a sharded model is gathered to save and to merge), rank 0
        writes. Under FSDP the merged LoRA layers stay, marked merged: FSDP owns the layout."""
        directory = self._adapter_dir or self.resolve_adapter_dir(trainer)
        root, sharded = trainer.strategy.model, is_sharded(trainer.strategy.model)
        save_adapter_gathered(root, pl_module, directory, self.adapter_name, trainer.is_global_zero, self._root)
        self._saved_to = directory
        rank_zero_info(f"LoRA adapter saved to {directory}")
        if sharded and (self.log_analysis or self.log_rank_advice):
            rank_zero_warn("log_analysis/log_rank_advice skipped: the model is sharded; analyse the saved adapter.")
        if self.log_analysis and not sharded:
            reporting.log_delta_analysis(trainer, pl_module, self.adapter_name)
        if self.log_rank_advice and not sharded:
            reporting.log_rank_advice(trainer, pl_module, self.adapter_name)
        if self.merge_on_fit_end:
            if self.report_merge and self._probe_batch is not None and not sharded:
                probe = self.merge_probe or reporting.training_step_probe
                reporting.report_on_merge(trainer, pl_module, self._probe_batch, probe, self._root)
            merge_gathered(root, pl_module)
            self._saved_to = None  # the model now holds ΔW: a next fit's adapter fits only that
        self._probe_batch = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release(pl_module)  # Lightning skips `teardown` after an error
        if trainer.global_step > 0 and self.adapter_name in adapter_names(pl_module):
            # the directory resolved at fit start: resolving log_dir now could hang the healthy ranks
            directory = self._adapter_dir or self.resolve_adapter_dir(trainer, log_dir=False)
            fit_saves.save_on_exception(trainer, pl_module, exception, directory, self.adapter_name, self._root)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Lightning calls this for full checkpoints only (not ``save_weights_only``)."""
        if has_lora(pl_module):  # else merged and unloaded at fit end: a plain model, saved whole
            # ModelParallelStrategy restores through torch.distributed.checkpoint, which needs every
            # key of the model in the checkpoint: adapter-only ones could be written, never resumed.
            full = self.full_checkpoints or isinstance(trainer.strategy, ModelParallelStrategy)
            restore.mark_checkpoint(pl_module, checkpoint, self.adapter_name, self.config, full)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "adapter_name": self.adapter_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        if saved is not None and LoRAConfig.build(saved) != self.config:
            rank_zero_warn(
                f"the checkpoint was trained with LoRA config {saved}, this callback has "
                f"{self.config.to_dict()}; resuming uses this callback's."
            )

    def summary(self) -> dict[str, float]:
        """The job's figures for ``metrics.json``: parameter counts as injected, adapter bytes."""
        figures = self.stats.as_metrics() if self.stats is not None else {}
        return figures | reporting.adapter_bytes_figure(self._adapter_dir)

    # ------------------------------------------------------------------------- steps the hooks take

    def inject(self, pl_module: nn.Module) -> None:
        """Inject this callback's adapter into ``pl_module`` (once: a second ``fit`` finds it)."""
        if is_sharded(pl_module) and self.adapter_name not in adapter_names(pl_module):
            raise LoRAStateError(
                "the model is already sharded (fully_shard / DTensor parameters): LoRA must be injected "
                "before sharding, so the adapters are sharded and reduced with the rest. With "
                "ModelParallelStrategy the callback injects before your configure_model; outside "
                "Lightning call inject_lora before fully_shard."
            )
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
        self._root = resolve_root(pl_module, self.adapter_root)  # names while nothing wraps the model
        self.stats = parameter_stats(pl_module)  # counted now, before a sharding strategy splits them

    def inject_first(self, pl_module: nn.Module) -> None:
        """:meth:`inject` before the module's ``configure_model`` (``ModelParallelStrategy``): the
        layers must exist by then, built in ``__init__``."""
        try:
            self.inject(pl_module)
        except LoRATargetError as err:
            raise LoRATargetError(
                f"{err} Under ModelParallelStrategy LoRA is injected before your configure_model, since "
                f"fully_shard there must find the adapters: build the layers in __init__ (on the meta device "
                f"under trainer.init_module(empty_init=True) if they are large), and shard them in configure_model."
            ) from err

    def before_restore(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Ready ``pl_module`` for the LoRA checkpoint about to load: inject the adapter into a
        model built fresh (``trainer.test(model, ckpt_path=...)``), refuse weights that already
        hold a merged adapter or are not the base it was trained on, and let an adapter-only
        state dict load without the base weights the model already holds (``strict_loading``
        off until ``on_load_checkpoint`` has checked it)."""
        if not restore.is_lora_checkpoint(checkpoint):
            return  # a plain model's checkpoint
        restore.refuse_merged(pl_module)
        fresh = self.adapter_name not in adapter_names(pl_module)
        if fresh:
            self.inject(pl_module)
        try:
            restore.check_fingerprint(pl_module, checkpoint, self.adapter_name)
        except LoRAStateError:
            if fresh:  # a refused restore changes nothing
                unload_lora(pl_module, merge=False)
            raise
        if restore.is_adapter_only(checkpoint) and self._strict_loading is None:
            self._strict_loading, pl_module.strict_loading = pl_module.strict_loading, False

    def release(self, pl_module: pl.LightningModule) -> None:
        """Give the module its own hooks and ``strict_loading`` back."""
        restore.release_module_hooks(pl_module)
        if self._strict_loading is not None:
            pl_module.strict_loading, self._strict_loading = self._strict_loading, None

    def replace_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``optimizer(trainable parameters)`` (and its ``lr_scheduler``) instead of the module's."""
        optimizer = self.optimizer([p for p in pl_module.parameters() if p.requires_grad])
        if self.loraplus_lr_ratio is not None:  # before the scheduler is built over its groups
            apply_loraplus(optimizer, pl_module, self.loraplus_lr_ratio)
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
        factories = ("optimizer", "lr_scheduler", "merge_probe")
        options.update({name: reporting.factory_node(options[name]) for name in factories})
        target = TARGET if type(self) is LoRACallback else f"{type(self).__module__}.{type(self).__qualname__}"
        return {"_target_": target, **self.config.to_dict(), **options}

    def resolve_adapter_dir(self, trainer: pl.Trainer, log_dir: bool = True) -> Path:
        """``adapter_dir``, or ``<log_dir>/lora_adapter`` (see :func:`fit_saves.adapter_dir_of`)."""
        return fit_saves.adapter_dir_of(trainer, self.adapter_dir, log_dir)


def callback_options() -> list[str]:
    """The callback's own options: its keyword parameters that are not LoRAConfig fields."""
    return [name for name in _KEYWORD_DEFAULTS if name not in _LORA_DEFAULTS]


_KEYWORD_DEFAULTS = {
    p.name: p.default for p in inspect.signature(LoRACallback.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
}
_LORA_DEFAULTS = {
    name: _KEYWORD_DEFAULTS[name] for name in LoRAConfig.field_names()
}  # a field with no parameter fails here
