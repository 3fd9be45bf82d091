"""Parameters that FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) has sharded.

Under FSDP2 every parameter is a ``DTensor``: between steps each rank holds one shard of it
(``Shard(0)``), and the module tree keeps its names. The rest of the package computes on plain
tensors; this module is the one place that turns a DTensor into its whole value and writes a
whole value back into one. Both are collectives: every rank of the mesh must call them, on the
same parameters, in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dtensor_type() -> type | None:
    """The ``DTensor`` class, or ``None`` where ``torch.distributed`` is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: object) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(tensor: Tensor) -> Tensor:
    """``tensor``'s whole value as a plain tensor (all-gathered from the shards of a DTensor)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def copy_whole_(dst: Tensor, src: Tensor) -> None:
    """``dst ← src`` without autograd, where ``src`` is a whole value and ``dst`` a tensor or a
    DTensor. Into a DTensor, rank 0's ``src`` is scattered, so the shards agree even where
    ranks computed ``src`` differently (random draws)."""
    with torch.no_grad():
        if is_dtensor(dst):
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements)
        dst.copy_(src)
