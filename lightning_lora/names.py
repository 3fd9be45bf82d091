"""How an adapted weight is named, in tables, files and state dicts: the one grammar.

An adapted weight is named after the module that owns it:

* ``encoder.layer.0.query``: the ``weight`` of a module (an ``nn.Linear``, an ``out_proj``);
* ``blocks.0.attn.in_proj_weight[q]``: the q (k, v) rows of the fused in-projection of an
  ``nn.MultiheadAttention``, one third of ``in_proj_weight`` each;
* ``blocks.0.attn.q_proj_weight``: a separate q/k/v weight (MHA with ``kdim``/``vdim``).

In an adapter file the tensors of weight ``<name>`` are ``base_model.model.<name>.lora_A.weight``
and ``.lora_B.weight`` (PEFT's keys, so a layer's name is exactly PEFT's), or
``base_model.model.<name>.lora_embedding_A`` and ``.lora_embedding_B`` for an ``nn.Embedding``
(PEFT's keys for it), a DoRA adapter's magnitude is ``base_model.model.<name>.lora_magnitude_vector``
(PEFT's key), and a trained module's tensors are ``base_model.model.<state-dict key>``.
An ``nn.MultiheadAttention`` is written in PEFT's layout (:mod:`lightning_lora.peft_mha`): one
pair named after the module over its fused ``in_proj_weight``, and one named
``<mha>.base_layer.out_proj``. Everything that builds or reads such a name calls this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

QKV = ("q", "k", "v")
"""The blocks of a fused in-projection, in the order of its rows."""

FILE_PREFIX = "base_model.model."
"""PEFT's prefix of every tensor key in ``adapter_model.safetensors``."""

PEFT_MHA_OUT = ".base_layer.out_proj"
"""Suffix of the ``out_proj`` pair of an ``nn.MultiheadAttention`` in PEFT's file layout."""

WRAPPED_CHILD = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
"""Attribute names under which wrappers keep the module they wrap (FSDP, activation
checkpointing, torch.compile's OptimizedModule; private names, checked against torch 2.13). DDP
keeps it as ``module``. A name segment of these is not part of the bare module name."""

CHECKPOINT_KEY = "lightning_lora"
"""Key of the LoRA record in a Lightning checkpoint written with ``LoRACallback``
(``checkpoint[CHECKPOINT_KEY]``: whether it is adapter-only, its keys and config)."""

_NAME = re.compile(r"(?P<module>.+)\.(?:in_proj_weight\[(?P<fused>[qkv])\]|(?P<separate>[qkv])_proj_weight)")
_FILE_KEY = re.compile(
    r"(?P<name>.+)\.(?:lora_(?P<embedding>embedding_)?(?P<part>[AB])(?:\.weight)?|(?P<magnitude>lora_magnitude_vector))"
)

PARTS = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}
"""An adapter's tensors in a LoRA layer: part (``A``, ``B``, DoRA's magnitude ``m``) → the
attribute holding them by adapter name, which is also their segment in state-dict keys
(``<layer>.lora_magnitude_vector.<adapter>``)."""


@dataclass(frozen=True)
class WeightName:
    """A parsed adapted-weight name: the owning module, the tensor's attribute, its q/k/v label
    (``""`` for a whole tensor) and whether the label selects rows of a fused tensor."""

    module: str
    tensor: str = "weight"
    label: str = ""

    @property
    def fused(self) -> bool:
        return self.tensor == "in_proj_weight"

    def state_dict_key(self, prefix: str = "") -> str:
        """Key of the host tensor in the owning model's state dict (behind ``prefix``)."""
        return f"{prefix}{self.module}.{self.tensor}"


def weight_name(module: str, tensor: str = "weight", label: str = "") -> str:
    """The name of the adapted ``module.tensor`` (rows ``label`` of a fused in-projection)."""
    if tensor == "weight":
        return module
    return f"{module}.{tensor}" + (f"[{label}]" if tensor == "in_proj_weight" else "")


def parse_weight_name(name: str) -> WeightName:
    """Inverse of :func:`weight_name`: ``"a.attn.in_proj_weight[q]"`` → module ``"a.attn"``,
    tensor ``"in_proj_weight"``, label ``"q"``; ``"a.query"`` → module ``"a.query"``."""
    m = _NAME.fullmatch(name)
    if m is None:
        return WeightName(name)
    if m["fused"]:
        return WeightName(m["module"], "in_proj_weight", m["fused"])
    return WeightName(m["module"], f"{m['separate']}_proj_weight", m["separate"])


def block_rows(label: str, total_rows: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of block ``label`` (q, k or v) in a fused ``(3E, E)`` in-projection."""
    third = total_rows // 3
    i = QKV.index(label)
    return i * third, (i + 1) * third


class FileKey(NamedTuple):
    """A parsed adapter-file key: the adapted weight's name, its part (``"A"``, ``"B"``, or
    ``"m"``: DoRA's magnitude) and whether it is spelled as PEFT spells an ``nn.Embedding``'s
    (``lora_embedding_A``)."""

    name: str
    part: str
    embedding: bool = False


def file_key(name: str, part: str, embedding: bool = False) -> str:
    """Key of ``lora_A`` (``part="A"``), ``lora_B`` or DoRA's magnitude (``"m"``) of weight
    ``name`` in an adapter file (``lora_embedding_A`` / ``_B`` for an ``nn.Embedding``, as PEFT
    writes them)."""
    if part == "m":
        return f"{FILE_PREFIX}{name}.{PARTS['m']}"
    if embedding:
        return f"{FILE_PREFIX}{name}.lora_embedding_{part}"
    return f"{FILE_PREFIX}{name}.lora_{part}.weight"


def peft_mha_owner(name: str) -> str | None:
    """The ``nn.MultiheadAttention`` whose ``out_proj`` pair ``name`` is in PEFT's layout, else ``None``."""
    return name.removesuffix(PEFT_MHA_OUT) if name.endswith(PEFT_MHA_OUT) else None


def parse_file_key(key: str) -> FileKey | None:
    """Inverse of :func:`file_key`; ``None`` for any other tensor."""
    m = _FILE_KEY.fullmatch(key.removeprefix(FILE_PREFIX))
    if m is None:
        return None
    return FileKey(m["name"], "m" if m["magnitude"] else m["part"], bool(m["embedding"]))
