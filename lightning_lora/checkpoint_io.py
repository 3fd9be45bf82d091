"""Lightning checkpoints loaded as data: ``torch.load(weights_only=True)``, whatever the environment says.

A Lightning-side module (it imports Lightning; the core does not). Lightning 2.6 restores a
checkpoint (``trainer.fit(ckpt_path=...)``, and ``validate``/``test``/``predict`` with
``ckpt_path``) through ``Strategy.load_checkpoint`` → ``CheckpointIO.load_checkpoint(path,
weights_only=...)`` → ``lightning.fabric.utilities.cloud_io._load`` → ``torch.load(f,
weights_only=weights_only)``. ``weights_only`` is ``None`` all the way down unless the user
passes it, and torch turns ``None`` into ``False`` when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is
set: a pickle in ``ckpt_path`` then runs. An explicit ``True`` is honoured whatever that variable
says (torch 2.13, ``torch/serialization.py``), so :class:`WeightsOnlyCheckpointIO` passes ``True``.

``FSDPStrategy`` reads a full-state checkpoint file with its own lazy unpickler, past any
CheckpointIO; :func:`enforce_weights_only` therefore also makes such strategies check the file
with torch's weights-only unpickler before they read it.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.strategies import Strategy

from .errors import CheckpointError


class WeightsOnlyCheckpointIO(CheckpointIO):
    """A CheckpointIO that loads every checkpoint with ``weights_only=True`` and delegates all
    else (saving, removing, remote file systems) to the CheckpointIO it wraps (default: Lightning's
    ``TorchCheckpointIO``). Use it alone, ``Trainer(plugins=[WeightsOnlyCheckpointIO()])``, or let
    :func:`enforce_weights_only` wrap whatever the strategy has."""

    def __init__(self, inner: CheckpointIO | None = None) -> None:
        from lightning.fabric.plugins import TorchCheckpointIO

        self.inner = inner if inner is not None else TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        with refusing_pickles(path):
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


@contextlib.contextmanager
def refusing_pickles(path: Any) -> Iterator[None]:
    """Turn torch's weights-only refusal into a :class:`CheckpointError` that says why and how."""
    try:
        yield
    except pickle.UnpicklingError as error:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (m.group(1) if m else text.strip().split("\n")[0]).split(". ")[0].strip()[:200]
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded with torch.load(weights_only=True) ({detail}): it holds "
            f"pickled Python objects besides tensors and plain data, which could run code when loaded. "
            f"lightning-lora loads checkpoints only as data, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says. If you "
            f"trust this file and need those objects, allow their types with torch.serialization.add_safe_globals([...])."
        ) from None


def verify_weights_only(path: str | Path) -> None:
    """Read ``path`` once with torch's weights-only unpickler (memory-mapped: tensors are not
    copied), refusing it if it holds anything else."""
    with refusing_pickles(path):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def enforce_weights_only(trainer: pl.Trainer) -> None:
    """Make every checkpoint ``trainer`` restores load with ``weights_only=True``: wrap the
    strategy's CheckpointIO in :class:`WeightsOnlyCheckpointIO`, and where the strategy reads
    files past it (FSDP full-state checkpoints), check each file first. Call before the restore
    (a callback's ``setup``); calling again changes nothing."""
    strategy = trainer.strategy
    io = strategy.checkpoint_io  # the getter completes a wrapping CheckpointIO (async) first
    if not isinstance(io, WeightsOnlyCheckpointIO):
        strategy.checkpoint_io = WeightsOnlyCheckpointIO(io)
    if type(strategy).load_checkpoint is Strategy.load_checkpoint or "load_checkpoint" in vars(strategy):
        return  # the base path goes through the CheckpointIO; or wrapped already
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(str(checkpoint_path)).is_file():
            verify_weights_only(checkpoint_path)
        return original(checkpoint_path, weights_only=True)

    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
