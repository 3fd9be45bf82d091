"""Where ``LoRACallback`` saves the adapter, checked before a fit trains and used when it fails.

Rank 0 writes; every rank must agree on the path, and on a refusal: a refusal raised on rank 0
alone would leave the others waiting in their first collective, so the check's verdict is
broadcast and raised everywhere.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .distributed import is_sharded
from .errors import AdapterSaveError
from .io import save_adapter
from .preflight import FALLBACK, adapter_bytes, check_adapter_dir


def adapter_dir_of(trainer: pl.Trainer, adapter_dir: str | None, log_dir: bool = True) -> Path:
    """``adapter_dir``, or ``<log_dir>/lora_adapter`` (``default_root_dir`` without a logger or
    with ``log_dir=False``). Reading ``trainer.log_dir`` broadcasts: call it on every rank."""
    if adapter_dir is not None:
        return Path(adapter_dir)
    return Path((trainer.log_dir if log_dir else None) or trainer.default_root_dir) / "lora_adapter"


def check_before_fit(
    trainer: pl.Trainer, pl_module: nn.Module, directory: Path, adapter_name: str, overwrite: bool
) -> None:
    """Before any step trains: the adapter can be saved to ``directory`` (and its ``last``
    fallback), with room for it, and nothing there would be lost unless ``overwrite``
    (:func:`~lightning_lora.preflight.check_adapter_dir`). Rank 0 looks; every rank raises."""
    problem = None
    if trainer.is_global_zero:
        try:
            needed = adapter_bytes(pl_module, adapter_name)
            check_adapter_dir(directory, overwrite=overwrite, needed_bytes=needed, model=pl_module)
        except AdapterSaveError as err:
            problem = str(err)
    problem = trainer.strategy.broadcast(problem, src=0)
    if problem is not None:
        raise AdapterSaveError(problem)


def save_on_exception(
    trainer: pl.Trainer,
    pl_module: nn.Module,
    exception: BaseException,
    directory: Path,
    adapter_name: str,
    root: str | None,
) -> None:
    """Nothing trained is lost: the adapter as it is now goes to ``<directory>/last``; a failure
    to save is a warning, never a second error hiding the first."""
    directory = directory / FALLBACK
    stopped = f"fit stopped ({type(exception).__name__})"
    if is_sharded(trainer.strategy.model):  # gathering is a collective the healthy ranks will not join
        rank_zero_warn(
            f"{stopped} with a sharded model (FSDP, ZeRO-3): nothing saved to {directory}; use a checkpoint."
        )
    elif trainer.is_global_zero:
        try:
            save_adapter(pl_module, directory, adapter_name, root=root)
            rank_zero_warn(f"{stopped}; LoRA adapter saved to {directory}")
        except Exception as err:  # never hide the original error behind ours
            rank_zero_warn(f"{stopped} and saving the LoRA adapter to {directory} failed too: {err}")
