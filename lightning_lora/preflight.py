"""Before a long job: will the adapter be saved where asked, without destroying another one?

A fit saves its adapter at its end; discovering then that the place is a file, read-only, or
full loses every step. :func:`check_adapter_dir` answers at the start, with the fix in the
message. It also applies the overwrite policy: **an adapter directory that already holds an
adapter is refused unless ``overwrite=True``**, because a second ``fit`` into the same place
would replace the first adapter (and, after a merge at the first fit's end, with one trained on
``W + ΔW₁`` that fits only the merged weights).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from torch import nn

from .errors import AdapterSaveError
from .params import adapter_entries
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .provenance import merge_records

FALLBACK = "last"
"""Subdirectory of the adapter directory where an interrupted fit saves the adapter as it is."""


def adapter_bytes(model: nn.Module, adapter_name: str = "default") -> int:
    """Bytes of the tensors :func:`~lightning_lora.io.save_adapter` writes for ``adapter_name``."""
    return sum(e.tensor.numel() * e.tensor.element_size() for e in adapter_entries(model, adapter_name))


def holds_adapter(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).exists() or (path / ADAPTER_WEIGHTS).exists()


def check_adapter_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    needed_bytes: int = 0,
    model: nn.Module | None = None,
) -> Path:
    """Raise :class:`AdapterSaveError` unless an adapter can be saved to ``path`` (and its
    ``last/`` fallback) without replacing another: nothing but directories on the way, writable,
    ``needed_bytes`` free, and no adapter there unless ``overwrite``. ``model`` (optional) lets
    the message say when its weights hold a merged adapter. Changes nothing on disk."""
    path = check_writable(path, needed_bytes, what="LoRA adapter")
    check_writable(path / FALLBACK, what="LoRA adapter of an interrupted fit")
    if overwrite or not holds_adapter(path):
        return path
    files = [path / n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if (path / n).is_file()]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime for f in files))) if files else "?"
    merged = (
        " This model's weights already hold a merged adapter, so a new one trained on them fits only those merged "
        "weights: keep the first one."
        if model is not None and merge_records(model)
        else ""
    )
    raise AdapterSaveError(
        f"{str(path)!r} already holds an adapter (saved {when}); saving this fit's adapter there would replace "
        f"it.{merged} Choose another adapter_dir (the default, <log_dir>/lora_adapter, is new for every run), or "
        f"pass overwrite=True to replace it."
    )


def check_writable(path: str | os.PathLike, needed_bytes: int = 0, what: str = "directory") -> Path:
    """Check that :func:`~lightning_lora.atomic.replace_directory` can write ``path``: nothing but directories on the
    way, the nearest existing one writable (a real probe: a directory created and removed, so
    read-only file systems and root's permissions are judged as a save would be), and
    ``needed_bytes`` free. Creates nothing that stays. Raises :class:`AdapterSaveError`
    naming the obstacle and the fix."""
    path = Path(path).absolute()
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is a file, so {str(path)!r} cannot be created under it"
        raise AdapterSaveError(
            f"cannot save the {what} to {str(path)!r}: {str(existing)!r} {where}. Choose a directory path, "
            f"or move that file away."
        )
    probes = [existing] if existing != path else [path.parent, path]
    for directory in probes:
        _probe(directory, path, what)
    if needed_bytes:
        free = shutil.disk_usage(existing).free
        if free < needed_bytes:
            raise AdapterSaveError(
                f"cannot save the {what} to {str(path)!r}: it needs about {_size(needed_bytes)} and "
                f"{str(existing)!r} has {_size(free)} free. Free some space or choose another place."
            )
    return path


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _probe(directory: Path, path: Path, what: str) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lightning-lora-probe-", dir=directory))
    except OSError as err:
        why = {
            errno.EACCES: "this user may not write there (check its permissions, e.g. chmod u+w)",
            errno.EPERM: "this user may not write there (check its permissions, e.g. chmod u+w)",
            errno.EROFS: "it is on a read-only file system",
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exhausted",
        }.get(err.errno or 0, err.strerror or str(err))
        raise AdapterSaveError(
            f"cannot save the {what} to {str(path)!r}: {str(directory)!r} is not writable: {why}. "
            f"Choose a writable place, or fix that directory."
        ) from None
